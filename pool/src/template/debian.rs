//! Debian root filesystems from a package list. A host that already made the image for a package
//! set (the project's `cargo xtask` does for the bundled examples, since the lab has no network)
//! leaves it as `debian-<key>.ext4` in one of the image folders kilnd searches; otherwise
//! debootstrap makes the tree here (it needs the network and the `debootstrap` package).

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::Inputs;
use super::spec::Debian;

/// The Debian mirror, unless `KILN_DEBIAN_MIRROR` names another.
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// The cache key of a package set: the same in `cargo xtask` (xtask/src/rootfs/mod.rs, whose
/// test checks the same vector as this module's).
pub fn key(suite: &str, packages: &[String]) -> String {
    let mut sorted: Vec<&str> = packages.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let digest = Sha256::digest(format!("kiln-debian-v1\n{suite}\n{}", sorted.join(" ")));
    format!("{digest:x}")[..16].to_string()
}

/// The image made ahead for `d`, if one of `dirs` has it.
pub fn cached_image(d: &Debian, dirs: &[PathBuf]) -> Option<PathBuf> {
    let name = format!("debian-{}.ext4", key(&d.suite, &d.packages));
    dirs.iter().map(|dir| dir.join(&name)).find(|p| p.is_file())
}

/// Debootstraps `d` into `tree` and sets up what a sandbox expects (host name, hosts, an empty
/// resolv.conf the agent fills when there is a network).
pub fn tree(d: &Debian, tree: &Path, inputs: &Inputs) -> Result<(), String> {
    let mirror = std::env::var("KILN_DEBIAN_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.into());
    let mut cmd = Command::new("debootstrap");
    cmd.arg("--variant=minbase");
    if !d.packages.is_empty() {
        cmd.arg(format!("--include={}", d.packages.join(",")));
    }
    cmd.arg(&d.suite).arg(tree).arg(&mirror);
    let out = cmd.output().map_err(|e| {
        let searched: Vec<String> = inputs
            .image_dirs
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!(
            "no image made ahead for {} {:?} (looked for debian-{}.ext4 in {}) and debootstrap \
             cannot run: {e}",
            d.suite,
            d.packages,
            key(&d.suite, &d.packages),
            searched.join(", ")
        )
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(4).collect();
        return Err(format!(
            "debootstrap {} from {mirror} failed ({}): {}",
            d.suite,
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    for (path, text) in [
        ("etc/hostname", "kiln\n"),
        ("etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tkiln\n"),
        ("etc/resolv.conf", ""),
    ] {
        std::fs::write(tree.join(path), text).map_err(|e| format!("{path}: {e}"))?;
    }
    let _ = std::fs::remove_dir_all(tree.join("var/cache/apt/archives"));
    let _ = std::fs::remove_dir_all(tree.join("var/lib/apt/lists"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_ignore_order_and_repeats() {
        let a = key("bookworm", &["python3".into(), "python3-numpy".into()]);
        let b = key(
            "bookworm",
            &["python3-numpy".into(), "python3".into(), "python3".into()],
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            key("trixie", &["python3".into(), "python3-numpy".into()])
        );
        // The vector xtask's test checks too.
        assert_eq!(key("bookworm", &["python3".into()]), KEY_BOOKWORM_PYTHON3);
    }

    /// `key("bookworm", ["python3"])`, pinned so xtask and kilnd cannot drift apart.
    const KEY_BOOKWORM_PYTHON3: &str = "6f88b832bcb639ae";
}
