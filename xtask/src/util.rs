//! Helpers every xtask command shares: the workspace root, the cache outside the clone, running
//! programs with errors that name them, installing Debian packages, and content hashes for cache keys.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// Every xtask failure is a message for a person; `main` prints it and exits non-zero.
pub type Result<T> = std::result::Result<T, String>;

/// The workspace root (the folder holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    // xtask/ sits directly below the root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Kiln's cache outside the clone: `$KILN_CACHE`, else `$HOME/.cache/kiln`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("kiln")
}

/// Creates `dir` (and parents), naming it on failure.
pub fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// Runs `cmd` with inherited stdio and fails, naming the program, unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {}: {e}", describe(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{} failed: {status}", describe(cmd)))
    }
}

/// Runs `cmd` and returns its stdout; stderr is passed through. Fails unless it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot start {}: {e}", describe(cmd)))?;
    if !out.status.success() {
        return Err(format!("{} failed: {}", describe(cmd), out.status));
    }
    String::from_utf8(out.stdout).map_err(|_| format!("{} printed non-UTF-8 output", describe(cmd)))
}

/// The program and its arguments, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Installs the Debian packages that are not installed yet (`apt-get update` at most once a run).
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_update(&missing, false)?;
    apt_install(&missing, None)
}

/// Whether this process has run `apt-get update`.
static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// `apt-get update` (to install `packages`), once per process unless `again` (a source was just
/// added).
pub fn apt_update(packages: &[&str], again: bool) -> Result<()> {
    if APT_UPDATED.load(Ordering::Relaxed) && !again {
        return Ok(());
    }
    eprintln!("xtask: apt-get update (to install {})", packages.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    APT_UPDATED.store(true, Ordering::Relaxed);
    Ok(())
}

/// `apt-get install` without recommends, from `release` (`-t`) if given.
pub fn apt_install(packages: &[&str], release: Option<&str>) -> Result<()> {
    eprintln!("xtask: installing {}", packages.join(" "));
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "-qq", "--no-install-recommends"]);
    if let Some(release) = release {
        cmd.args(["-t", release]);
    }
    run(cmd.args(packages).env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Hex SHA-256 over a sequence of byte strings (each length-prefixed, so boundaries count).
pub fn hash_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of a file's contents.
pub fn hash_file(path: &Path) -> Result<String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(hash_parts([data.as_slice()]))
}

/// Writes `data` to `path` through a temporary file and a rename, so a reader never sees half a file.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-xtask");
    std::fs::write(&tmp, data).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), path.display()))
}

/// `path` made relative to a root it must stay below: empty and `.` parts dropped, `..` refused.
/// `what` names the root in the error (e.g. "the initramfs", "/kiln").
pub fn below_root(path: &str, what: &str) -> Result<String> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") {
        return Err(format!(
            "path {path:?} must name something below {what} without `..`"
        ));
    }
    Ok(parts.join("/"))
}

/// A Python venv at `dir` with `requirements` (pip's `name==version` pins) installed from PyPI,
/// made on first use and reused: its `versions.txt`, written last, records what pip installed, so
/// a run killed half way makes it again. `who` names the caller in the progress line.
pub fn python_venv(dir: &Path, who: &str, requirements: &[String]) -> Result<()> {
    let versions = dir.join("versions.txt");
    if versions.exists() {
        return Ok(());
    }
    ensure_packages(&["python3", "python3-venv"])?;
    let _ = std::fs::remove_dir_all(dir);
    mkdir(dir.parent().unwrap_or(Path::new("/")))?;
    eprintln!(
        "xtask {who}: making {} ({} from PyPI)",
        dir.display(),
        requirements.join(", ")
    );
    run(Command::new("/usr/bin/python3")
        .arg("-m")
        .arg("venv")
        .arg(dir))?;
    let pip = dir.join("bin/pip");
    run(Command::new(&pip)
        .args(["install", "-q", "--disable-pip-version-check"])
        .args(requirements))?;
    let frozen = output(Command::new(&pip).args(["freeze", "--all"]))?;
    write_atomic(&versions, frozen.as_bytes())
}
