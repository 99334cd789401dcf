//! The work image: an ext4 disk L1 mounts at /kiln, holding the workspace's release binaries (bin/)
//! with their shared libraries (lib/), the guest kernel (vmlinux), the shared folder (share/), the
//! command file (cmd), the caller's extra files, `nft` and `ip` (network sandboxes need them) and,
//! on request, QEMU with its firmware and strace.
//!
//! Built without root by `mke2fs -d` from a staging folder, fresh for every run: L1 may write to it.

use super::init;
use crate::util::{self, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Everything that goes into one work image.
pub struct ImageSpec<'a> {
    /// CMD's argv, written to /kiln/cmd.
    pub cmd: &'a [String],
    /// The guest vmlinux, copied to /kiln/vmlinux.
    pub guest_kernel: Option<&'a Path>,
    /// A host folder whose contents become /kiln/share (and /share in L1).
    pub share: Option<&'a Path>,
    /// `(host path, path below /kiln)` pairs; a host folder is copied whole.
    pub files: &'a [(PathBuf, String)],
    /// Build the workspace's release binaries and put them in bin/.
    pub build_bins: bool,
    /// Add qemu-system-x86_64, its libraries and /usr/share/{qemu,seabios}.
    pub with_qemu: bool,
    /// Add strace and its libraries (in usr/bin, on L1's PATH).
    pub with_strace: bool,
}

/// The e2fsprogs tools kilnd runs in L1 to make template images.
const E2FSPROGS: &[&str] = &["mke2fs", "e2fsck", "resize2fs", "debugfs"];

/// Room for what L1 writes (logs, L2 disk images, kilnd's templates under /kiln/state) beyond
/// what the image holds at the start. The file is sparse, so unused headroom costs nothing on
/// the host.
const HEADROOM: u64 = 4 << 30;

/// The workspace binary the lab gets statically linked ([`crate::static_exe`]).
const STATIC_VMM: &str = "kiln-vmm";

/// Builds the image at `<run_dir>/work.img` and returns its path.
pub fn build(spec: &ImageSpec, run_dir: &Path) -> Result<PathBuf> {
    let staging = run_dir.join("staging");
    util::mkdir(&staging.join("bin"))?;
    util::mkdir(&staging.join("lib"))?;
    let mut executables = Vec::new();

    if spec.build_bins {
        for mut bin in workspace_bins()? {
            let name = bin.file_name().unwrap_or_default().to_owned();
            if name == STATIC_VMM {
                // Shipped static, as Firecracker is: no libc pages in each VMM's memory.
                bin = crate::static_exe::build(STATIC_VMM, STATIC_VMM)?;
            }
            copy(&bin, &staging.join("bin").join(&name))?;
            executables.push(bin);
        }
    }
    if spec.build_bins {
        // kilnd makes template images with e2fsprogs (busybox has none of it).
        util::ensure_packages(&["e2fsprogs"])?;
        util::mkdir(&staging.join("usr/bin"))?;
        for tool in E2FSPROGS {
            let path = PathBuf::from("/usr/sbin").join(tool);
            copy(&path, &staging.join("usr/bin").join(tool))?;
            executables.push(path);
        }
    }
    if spec.with_qemu {
        // usr/bin, not bin: QEMU finds its data relative to its binary (`../share/qemu`), and
        // /kiln/share is the shared folder.
        let qemu = PathBuf::from("/usr/bin/qemu-system-x86_64");
        util::mkdir(&staging.join("usr/bin"))?;
        copy(&qemu, &staging.join("usr/bin/qemu-system-x86_64"))?;
        executables.push(qemu);
        util::mkdir(&staging.join("usr/share"))?;
        for dir in ["/usr/share/qemu", "/usr/share/seabios"] {
            // -L: the firmware folder is full of symlinks into other packages; L1 has none of those.
            util::run(
                Command::new("cp")
                    .args(["-rL", dir])
                    .arg(staging.join("usr/share")),
            )?;
        }
    }
    // Network sandboxes load their rules with nft and, for --allow-net, make veths with ip; the
    // lab's tests build their small internet with ip.
    util::ensure_packages(&["nftables", "iproute2"])?;
    util::mkdir(&staging.join("usr/bin"))?;
    for tool in ["/usr/sbin/nft", "/usr/sbin/ip"] {
        let tool = PathBuf::from(tool);
        copy(
            &tool,
            &staging
                .join("usr/bin")
                .join(tool.file_name().unwrap_or_default()),
        )?;
        executables.push(tool);
    }
    if spec.with_strace {
        util::ensure_packages(&["strace"])?;
        let strace = PathBuf::from("/usr/bin/strace");
        util::mkdir(&staging.join("usr/bin"))?;
        copy(&strace, &staging.join("usr/bin/strace"))?;
        executables.push(strace);
    }
    for exe in &executables {
        for (name, path) in ldd_closure(exe)? {
            let to = staging.join("lib").join(&name);
            if !to.exists() {
                copy(&path, &to)?;
            }
        }
    }
    if let Some(vmlinux) = spec.guest_kernel {
        copy(vmlinux, &staging.join("vmlinux"))?;
    }
    if let Some(share) = spec.share {
        if !share.is_dir() {
            return Err(format!("--share {} is not a folder", share.display()));
        }
        util::mkdir(&staging.join("share"))?;
        let from = format!("{}/.", share.display());
        util::run(
            Command::new("cp")
                .args(["-a", &from])
                .arg(staging.join("share")),
        )?;
    }
    for (host, path) in spec.files {
        let to = staging.join(image_path(path)?);
        util::mkdir(to.parent().unwrap_or(&staging))?;
        util::run(Command::new("cp").args(["-a", "-T"]).arg(host).arg(&to))?;
    }
    util::write_atomic(
        &staging.join("cmd"),
        init::command_file(spec.cmd).as_bytes(),
    )?;

    let image = run_dir.join("work.img");
    let used = disk_usage(&staging)?;
    let size = used + used / 8 + HEADROOM;
    util::ensure_packages(&["e2fsprogs"])?;
    // A sparse file of the right size first: mke2fs then takes its size and does not announce that it
    // created a file.
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(size))
        .map_err(|e| format!("cannot create {}: {e}", image.display()))?;
    util::run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(&staging)
            .arg(&image),
    )?;
    let _ = std::fs::remove_dir_all(&staging);
    Ok(image)
}

/// A caller's path below /kiln, made relative; `..` is refused so nothing lands outside the image.
fn image_path(path: &str) -> Result<PathBuf> {
    util::below_root(path, "/kiln").map(PathBuf::from)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .map(drop)
        .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))
}

/// Bytes the tree takes on disk, counting each file and folder in whole 4 KiB blocks.
fn disk_usage(dir: &Path) -> Result<u64> {
    let mut total = 4096;
    for entry in
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?
    {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let meta = entry
            .metadata()
            .map_err(|e| format!("cannot stat {}: {e}", entry.path().display()))?;
        total += if meta.is_dir() {
            disk_usage(&entry.path())?
        } else {
            meta.len().div_ceil(4096) * 4096 + 4096
        };
    }
    Ok(total)
}

/// Builds the workspace's binaries (xtask excluded) in release mode and returns their paths; none is
/// fine (the VMM may not exist yet).
fn workspace_bins() -> Result<Vec<PathBuf>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = util::workspace_root();
    let text = util::output(
        Command::new(&cargo)
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .current_dir(&root),
    )?;
    let (target_dir, names) = bin_targets(&text)?;
    if names.is_empty() {
        eprintln!("xtask lab: the workspace has no binaries yet; bin/ stays empty");
        return Ok(Vec::new());
    }
    eprintln!("xtask lab: cargo build --release ({})", names.join(", "));
    util::run(
        Command::new(&cargo)
            .args([
                "build",
                "--quiet",
                "--release",
                "--workspace",
                "--exclude",
                "xtask",
                "--bins",
            ])
            .current_dir(&root),
    )?;
    Ok(names
        .iter()
        .map(|n| target_dir.join("release").join(n))
        .collect())
}

/// The target folder and the names of the bin targets a plain build makes (outside xtask, none
/// behind a required feature), from `cargo metadata` JSON.
fn bin_targets(metadata: &str) -> Result<(PathBuf, Vec<String>)> {
    let json: serde_json::Value = serde_json::from_str(metadata)
        .map_err(|e| format!("cargo metadata printed invalid JSON: {e}"))?;
    let target_dir = json["target_directory"]
        .as_str()
        .ok_or("cargo metadata printed no target_directory")?;
    let mut names = Vec::new();
    for package in json["packages"].as_array().into_iter().flatten() {
        if package["name"] == "xtask" {
            continue;
        }
        for target in package["targets"].as_array().into_iter().flatten() {
            let is_bin = target["kind"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k == "bin");
            // A bin behind a feature that is not a default one (the libFuzzer driver) is not
            // built by a plain build.
            let defaults = package["features"]["default"].as_array();
            let gated = target["required-features"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|f| !defaults.is_some_and(|d| d.contains(f)));
            if let (true, false, Some(name)) = (is_bin, gated, target["name"].as_str()) {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    Ok((PathBuf::from(target_dir), names))
}

/// The shared libraries `exe` loads, as (file name to use in lib/, host path); empty for static files.
fn ldd_closure(exe: &Path) -> Result<Vec<(String, PathBuf)>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .map_err(|e| format!("cannot start ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd fails for static executables ("not a dynamic executable"); those need nothing.
        return Ok(Vec::new());
    }
    parse_ldd(&text).map_err(|lib| format!("{} needs {lib}, which ldd cannot find", exe.display()))
}

/// Parses ldd output; `Err(name)` for a library ldd reports as not found.
fn parse_ldd(text: &str) -> std::result::Result<Vec<(String, PathBuf)>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        let line = line.split(" (0x").next().unwrap_or(line);
        if let Some((name, path)) = line.split_once(" => ") {
            if path.trim() == "not found" {
                return Err(name.trim().to_string());
            }
            libs.push((name.trim().to_string(), PathBuf::from(path.trim())));
        } else if line.starts_with('/') {
            // The dynamic loader: keep it under its own file name.
            let path = PathBuf::from(line);
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            libs.push((name, path));
        }
        // Anything else (linux-vdso.so.1, "statically linked") is not a file to copy.
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_libraries_and_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd2b1f0000)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0a1c5e0000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0a1c3ff000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f0a1c64b000)
";
        let libs = parse_ldd(text).unwrap();
        let names: Vec<&str> = libs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["libgcc_s.so.1", "libc.so.6", "ld-linux-x86-64.so.2"]
        );
        assert_eq!(libs[1].1, PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"));
        assert_eq!(
            parse_ldd("\tlibx.so.1 => not found\n").unwrap_err(),
            "libx.so.1"
        );
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    }

    #[test]
    fn metadata_bins_skip_xtask_and_libraries() {
        let json = r#"{"target_directory":"/w/target","packages":[
            {"name":"xtask","targets":[{"name":"xtask","kind":["bin"]}]},
            {"name":"kiln-vmm","targets":[{"name":"kiln_vmm","kind":["lib"]},{"name":"kiln-vmm","kind":["bin"]}]},
            {"name":"kiln-fuzz","targets":[{"name":"kiln-fuzz","kind":["bin"],"required-features":["libfuzzer"]}]},
            {"name":"kiln-pool","features":{"default":["daemon"],"daemon":[]},"targets":[{"name":"kilnd","kind":["bin"],"required-features":["daemon"]}]},
            {"name":"kiln-devices","targets":[{"name":"kiln_devices","kind":["lib"]}]}]}"#;
        let (dir, names) = bin_targets(json).unwrap();
        assert_eq!(dir, PathBuf::from("/w/target"));
        assert_eq!(names, ["kiln-vmm", "kilnd"]);
        let (_, none) = bin_targets(r#"{"target_directory":"/t","packages":[]}"#).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn image_paths_stay_inside() {
        assert_eq!(
            image_path("/tests/a.bin").unwrap(),
            PathBuf::from("tests/a.bin")
        );
        assert!(image_path("a/../../x").is_err());
        assert!(image_path("").is_err());
    }
}
