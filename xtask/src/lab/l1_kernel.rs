//! The L1 kernel: Debian's cloud kernel, fetched with `apt-get download` (never installed) and cut down
//! to the bzImage plus the modules L1 needs, uncompressed and listed in load order.
//!
//! Cached under `<cache>/lab/l1-kernel/<package file name>/`, so a new Debian kernel upload gets a new
//! entry and an old one is never reused by mistake.

use crate::util::{self, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The metapackages that depend on the current cloud kernel, the first apt knows: Linux 6.12
/// (Debian 12 carries it in bookworm-security beside its 6.1), whose KVM maps a restore's working
/// set in L1's nested page tables ahead (`KVM_PRE_FAULT_MEMORY`, Linux 6.10), else the release's
/// own (Debian 13's is 6.12 or later).
const METAPACKAGES: [&str; 2] = ["linux-image-6.12-cloud-amd64", "linux-image-cloud-amd64"];

/// Modules L1 needs, by module name: KVM, the virtio-mmio disk, TAP devices, vhost-vsock for QEMU
/// peers, virtio-net for the one forwarded port some runs give L1 (the E2B SDK suite), and for
/// network sandboxes nftables (NAT, redirect, conntrack, reject, limits, NFLOG), veth and dummy
/// links. Their dependencies are added from modules.dep.
pub const WANTED: &[&str] = &[
    "irqbypass",
    "kvm",
    "kvm_amd",
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "tun",
    "vhost",
    "vhost_iotlb",
    "vsock",
    "vhost_vsock",
    "virtio_net",
    "nf_tables",
    "nft_chain_nat",
    "nft_redir",
    "nft_masq",
    "nft_ct",
    "nft_log",
    "nft_limit",
    "nft_reject_inet",
    "nfnetlink_log",
    "veth",
    "dummy",
];

/// The manifest in a cache entry: module file names in load order, one a line.
const MANIFEST: &str = "modules.load";
/// The module names an entry was made for ([`WANTED`] then), one a line: an entry made for fewer
/// is fetched again.
const WANTED_FILE: &str = "modules.wanted";
/// L1's code symbols, saved from its own `/proc/kallsyms` on the first lab run with this kernel
/// (Debian ships only a stub System.map), to name where a hung L1 is.
const KALLSYMS: &str = "kallsyms";

/// A ready L1 kernel.
pub struct L1Kernel {
    /// The bzImage QEMU boots.
    pub vmlinuz: PathBuf,
    /// Uncompressed `.ko` files in the order they must be loaded.
    pub modules: Vec<PathBuf>,
    /// Its code symbols (see `watch::save_kallsyms`); missing until a lab run saved them.
    pub kallsyms: PathBuf,
}

/// True when `entry` holds everything [`load`] reads, for every module in [`WANTED`].
fn complete(entry: &Path) -> bool {
    let made_for = std::fs::read_to_string(entry.join(WANTED_FILE)).unwrap_or_default();
    entry.join(MANIFEST).exists() && WANTED.iter().all(|w| made_for.lines().any(|l| l == *w))
}

/// Returns the cached L1 kernel for the current Debian cloud kernel, fetching it first if needed.
pub fn ensure() -> Result<L1Kernel> {
    let root = util::cache_dir().join("lab").join("l1-kernel");
    let deb_name = match resolve_cached(&root) {
        Ok(name) => name,
        Err(e) => {
            // Offline, or the apt lists are gone: a kernel fetched earlier is still a good L1.
            let newest = cached_entries(&root).into_iter().next_back();
            let Some(entry) = newest else { return Err(e) };
            eprintln!(
                "xtask lab: {e}; using the cached L1 kernel {}",
                entry.display()
            );
            return load(&entry);
        }
    };
    let entry = root.join(deb_name.trim_end_matches(".deb"));
    if complete(&entry) {
        return load(&entry);
    }
    eprintln!("xtask lab: fetching the L1 kernel {deb_name}");
    // An entry made for fewer modules goes (its saved symbols are saved again on the next run).
    let _ = std::fs::remove_dir_all(&entry);
    fetch(&deb_name, &entry)?;
    load(&entry)
}

/// [`resolve`], remembered until the apt lists or [`METAPACKAGES`] change: asking apt costs over a
/// second per run.
fn resolve_cached(root: &Path) -> Result<String> {
    if pinned().is_some() {
        return resolve();
    }
    let memo = root.join("resolved");
    // What apt knows and what is asked of it: a new metapackage list resolves again.
    let stamp = apt_lists_stamp().map(|lists| {
        util::hash_parts(std::iter::once(lists.as_bytes()).chain(METAPACKAGES.map(str::as_bytes)))
    });
    let memo_text = std::fs::read_to_string(&memo).unwrap_or_default();
    if let (Some(stamp), Some((seen, deb_name))) = (&stamp, memo_text.trim().split_once(' '))
        && seen == stamp
        && complete(&root.join(deb_name.trim_end_matches(".deb")))
    {
        return Ok(deb_name.to_string());
    }
    let deb_name = resolve()?;
    if let Some(stamp) = stamp {
        util::mkdir(root)?;
        util::write_atomic(&memo, format!("{stamp} {deb_name}\n").as_bytes())?;
    }
    Ok(deb_name)
}

/// A hash of the names, sizes and times of apt's package lists: it changes whenever `apt-get update`
/// brings anything new.
fn apt_lists_stamp() -> Option<String> {
    let mut seen = Vec::new();
    for entry in std::fs::read_dir("/var/lib/apt/lists").ok()?.flatten() {
        let meta = entry.metadata().ok()?;
        let mtime = meta
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        seen.push(format!(
            "{:?} {} {}",
            entry.file_name(),
            meta.len(),
            mtime.as_nanos()
        ));
    }
    seen.sort();
    Some(util::hash_parts(seen.iter().map(|s| s.as_bytes())))
}

/// The exact `.deb` file name of the cloud kernel [`pinned`] names, or else the one the
/// metapackage points to.
fn resolve() -> Result<String> {
    let package = match pinned() {
        Some(package) => package,
        None => metapackage_target()?,
    };
    let uris = util::output(Command::new("apt-get").args(["download", "--print-uris", &package]))?;
    // Each line: 'URL' FILE_NAME SIZE HASH
    uris.lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .find(|f| f.ends_with(".deb"))
        .map(str::to_string)
        .ok_or_else(|| format!("apt-get download --print-uris {package} printed no .deb file name"))
}

/// The linux-image package the first of [`METAPACKAGES`] apt knows depends on.
fn metapackage_target() -> Result<String> {
    let first_known = || {
        METAPACKAGES.iter().find_map(|m| {
            let text = util::output(Command::new("apt-cache").args(["depends", m])).ok()?;
            package_from_depends(&text)
        })
    };
    if let Some(package) = first_known() {
        return Ok(package);
    }
    // No apt lists yet (a fresh container): update once and ask again.
    util::apt_update(&METAPACKAGES, false)?;
    first_known().ok_or_else(|| {
        format!(
            "apt knows none of {} (apt-cache depends names no linux-image package)",
            METAPACKAGES.join(", ")
        )
    })
}

/// `KILN_L1_KERNEL`: a cloud kernel package to use instead of the one the metapackage names
/// (`linux-image-6.1.0-55-cloud-amd64`, say), to tell whether a change in L1's kernel changed the lab.
fn pinned() -> Option<String> {
    std::env::var("KILN_L1_KERNEL")
        .ok()
        .filter(|p| !p.is_empty())
}

/// The first `Depends: linux-image-...` of `apt-cache depends` output.
fn package_from_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
        .map(str::to_string)
}

/// Complete cache entries, sorted by name.
fn cached_entries(root: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| complete(p))
        .collect();
    found.sort();
    found
}

fn load(entry: &Path) -> Result<L1Kernel> {
    let manifest = entry.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest)
        .map_err(|e| format!("cannot read {}: {e}", manifest.display()))?;
    Ok(L1Kernel {
        vmlinuz: entry.join("vmlinuz"),
        kallsyms: entry.join(KALLSYMS),
        modules: text
            .lines()
            .filter(|l| !l.is_empty())
            .map(|m| entry.join("modules").join(m))
            .collect(),
    })
}

/// Downloads and unpacks `deb_name` and fills the cache entry `entry` (built beside it, then renamed in).
fn fetch(deb_name: &str, entry: &Path) -> Result<()> {
    util::ensure_packages(&["kmod", "xz-utils"])?;
    let parent = entry.parent().unwrap_or(Path::new("."));
    let work = parent.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    util::mkdir(&work)?;
    let result = fetch_into(deb_name, &work, entry);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn fetch_into(deb_name: &str, work: &Path, entry: &Path) -> Result<()> {
    let package = deb_name.split('_').next().unwrap_or(deb_name);
    // As root, apt would try (and warn about failing) to drop to the _apt user for this folder.
    util::run(
        Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", package])
            .current_dir(work),
    )?;
    let deb = work.join(deb_name);
    let tree = work.join("tree");
    util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;

    let moddir = single_subdir(&tree.join("lib/modules"))?;
    let version = moddir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    if !moddir.join("modules.dep").exists() {
        // Debian generates modules.dep at install time, so the package does not carry it.
        util::run(Command::new("depmod").arg("-b").arg(&tree).arg(&version))?;
    }
    let dep = read_text(&moddir.join("modules.dep"))?;
    let builtin = read_text(&moddir.join("modules.builtin")).unwrap_or_default();
    let order = load_order(&dep, &builtin, WANTED)?;

    let staging = work.join("entry");
    util::mkdir(&staging.join("modules"))?;
    let vmlinuz = tree.join("boot").join(format!("vmlinuz-{version}"));
    std::fs::copy(&vmlinuz, staging.join("vmlinuz"))
        .map_err(|e| format!("cannot copy {}: {e}", vmlinuz.display()))?;
    let mut names = Vec::new();
    for rel in &order {
        let name = uncompressed_name(rel);
        decompress(&moddir.join(rel), &staging.join("modules").join(&name))?;
        names.push(name);
    }
    util::write_atomic(
        &staging.join(MANIFEST),
        (names.join("\n") + "\n").as_bytes(),
    )?;
    util::write_atomic(
        &staging.join(WANTED_FILE),
        (WANTED.join("\n") + "\n").as_bytes(),
    )?;
    util::mkdir(entry.parent().unwrap_or(Path::new(".")))?;
    if entry.exists() && !complete(entry) {
        // Made for another list of modules: replaced whole.
        std::fs::remove_dir_all(entry)
            .map_err(|e| format!("cannot remove the stale {}: {e}", entry.display()))?;
    }
    if let Err(e) = std::fs::rename(&staging, entry) {
        // Another run may have filled the same entry meanwhile; theirs is as good as ours.
        if !complete(entry) {
            return Err(format!(
                "cannot move {} to {}: {e}",
                staging.display(),
                entry.display()
            ));
        }
    }
    Ok(())
}

fn single_subdir(dir: &Path) -> Result<PathBuf> {
    let subdirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    match subdirs.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(format!(
            "expected one kernel version in {}, found {}",
            dir.display(),
            subdirs.len()
        )),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// `kernel/arch/x86/kvm/kvm-amd.ko.xz` -> `kvm-amd.ko`.
fn uncompressed_name(rel: &str) -> String {
    let base = rel.rsplit('/').next().unwrap_or(rel);
    let stem = base.split(".ko").next().unwrap_or(base);
    format!("{stem}.ko")
}

/// Copies a module, decompressing `.ko.xz`/`.ko.zst`/`.ko.gz`: busybox insmod reads plain ELF only.
fn decompress(from: &Path, to: &Path) -> Result<()> {
    let name = from.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else if name.ends_with(".ko.gz") {
        "gzip"
    } else {
        std::fs::copy(from, to).map_err(|e| format!("cannot copy {}: {e}", from.display()))?;
        return Ok(());
    };
    if tool == "zstd" {
        util::ensure_packages(&["zstd"])?;
    }
    let out = Command::new(tool)
        .arg("-dc")
        .arg(from)
        .output()
        .map_err(|e| format!("cannot start {tool}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{tool} -dc {} failed: {}",
            from.display(),
            out.status
        ));
    }
    util::write_atomic(to, &out.stdout)
}

/// The canonical module name of a path in modules.dep: file stem with `-` read as `_`, as the kernel does.
fn module_name(rel: &str) -> String {
    uncompressed_name(rel)
        .trim_end_matches(".ko")
        .replace('-', "_")
}

/// Orders `wanted` (module names) and everything they depend on so that each module comes after its
/// dependencies, using `modules.dep` (`path: dep-path dep-path ...`, dependencies already transitive).
/// Modules named in `modules.builtin` are skipped; anything else unknown is an error.
pub fn load_order(
    modules_dep: &str,
    modules_builtin: &str,
    wanted: &[&str],
) -> Result<Vec<String>> {
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let list = rest.split_whitespace().map(str::to_string).collect();
        deps.insert(module_name(path), (path.to_string(), list));
    }
    let builtin: BTreeSet<String> = modules_builtin
        .lines()
        .filter(|l| !l.is_empty())
        .map(module_name)
        .collect();

    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for want in wanted {
        let name = want.replace('-', "_");
        if !deps.contains_key(&name) {
            if builtin.contains(&name) {
                continue;
            }
            return Err(format!(
                "module {want} is neither in modules.dep nor built in"
            ));
        }
        visit(&name, &deps, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    deps: &BTreeMap<String, (String, Vec<String>)>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
    depth: usize,
) -> Result<()> {
    if depth > 64 {
        return Err(format!("modules.dep has a dependency loop through {name}"));
    }
    if !seen.insert(name.to_string()) {
        return Ok(());
    }
    let (path, list) = deps.get(name).ok_or_else(|| {
        format!("modules.dep names {name} as a dependency but has no line for it")
    })?;
    // modprobe loads the listed dependencies last to first; do the same.
    for dep in list.iter().rev() {
        visit(&module_name(dep), deps, seen, order, depth + 1)?;
    }
    order.push(path.clone());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/arch/x86/kvm/kvm.ko.xz: kernel/virt/lib/irqbypass.ko.xz
kernel/arch/x86/kvm/kvm-amd.ko.xz: kernel/arch/x86/kvm/kvm.ko.xz kernel/virt/lib/irqbypass.ko.xz
kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/vhost/vhost_vsock.ko.xz: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz kernel/drivers/vhost/vhost.ko.xz kernel/drivers/vhost/vhost_iotlb.ko.xz kernel/net/vmw_vsock/vsock.ko.xz
kernel/drivers/vhost/vhost.ko.xz: kernel/drivers/vhost/vhost_iotlb.ko.xz
kernel/drivers/vhost/vhost_iotlb.ko.xz:
kernel/net/vmw_vsock/vsock.ko.xz:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz: kernel/net/vmw_vsock/vsock.ko.xz
kernel/virt/lib/irqbypass.ko.xz:
";

    fn names(order: &[String]) -> Vec<String> {
        order.iter().map(|p| module_name(p)).collect()
    }

    #[test]
    fn dependencies_come_first() {
        let order = load_order(DEP, "", &["kvm-amd", "virtio_blk"]).unwrap();
        assert_eq!(
            names(&order),
            [
                "irqbypass",
                "kvm",
                "kvm_amd",
                "virtio_ring",
                "virtio",
                "virtio_blk"
            ]
        );
        assert_eq!(order[2], "kernel/arch/x86/kvm/kvm-amd.ko.xz");
    }

    #[test]
    fn shared_dependencies_load_once_in_modprobe_order() {
        let order = load_order(DEP, "", &["vhost_vsock", "vsock"]).unwrap();
        assert_eq!(
            names(&order),
            [
                "vsock",
                "vhost_iotlb",
                "vhost",
                "vmw_vsock_virtio_transport_common",
                "vhost_vsock"
            ]
        );
    }

    #[test]
    fn builtin_modules_are_skipped_and_unknown_ones_rejected() {
        let order = load_order(DEP, "kernel/net/ipv4/tun.ko\n", &["tun", "kvm"]).unwrap();
        assert_eq!(names(&order), ["irqbypass", "kvm"]);
        let err = load_order(DEP, "", &["nosuch"]).unwrap_err();
        assert!(err.contains("nosuch"), "{err}");
    }

    #[test]
    fn file_names_lose_compression_suffixes() {
        assert_eq!(
            uncompressed_name("kernel/arch/x86/kvm/kvm-amd.ko.xz"),
            "kvm-amd.ko"
        );
        assert_eq!(uncompressed_name("kernel/drivers/net/tun.ko"), "tun.ko");
        assert_eq!(module_name("kernel/arch/x86/kvm/kvm-amd.ko.zst"), "kvm_amd");
    }

    #[test]
    fn depends_output_names_the_versioned_package() {
        let text = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            package_from_depends(text).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(package_from_depends("x\n  Depends: <virtual>\n"), None);
    }
}
