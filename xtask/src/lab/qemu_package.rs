//! The QEMU that runs L1: 10.0 or newer. On Debian 12 that is bookworm-backports' build (the
//! release's own is 7.2), installed without recommends (four packages: QEMU, its common files,
//! its firmware and SeaBIOS).
//!
//! Why: under QEMU 7.2 a long lab run lost its L1 for good (its one CPU halted in the idle loop
//! with interrupts on, the LAPIC timer's vector pending in IRR, an injected NMI not taken either,
//! which points at the emulated CPU's global interrupt flag left clear), on a fresh machine in every
//! full lab run. Under 10.0 the same runs went through (see README, "The lab").

use std::path::Path;
use std::process::Command;

use crate::util::{self, Result};

/// Debian's package of qemu-system-x86_64.
const PACKAGE: &str = "qemu-system-x86";
/// The oldest QEMU major version the lab runs on.
const MIN_MAJOR: u32 = 10;
/// Where bookworm-backports is added when the machine's sources lack it.
const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/kiln-bookworm-backports.sources";
const BACKPORTS_ENTRY: &str = "Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

/// Installs QEMU >= [`MIN_MAJOR`] if the machine has an older one (or none); an error if that
/// still leaves an older one.
pub fn ensure() -> Result<()> {
    if installed_major().is_some_and(|m| m >= MIN_MAJOR) {
        return Ok(());
    }
    let codename = os_codename()?;
    if codename == "bookworm" {
        let added = !Path::new(BACKPORTS_SOURCES).exists();
        if added {
            util::write_atomic(Path::new(BACKPORTS_SOURCES), BACKPORTS_ENTRY.as_bytes())?;
        }
        eprintln!("xtask: QEMU from bookworm-backports (the lab needs {MIN_MAJOR} or newer)");
        util::apt_update(&[PACKAGE], added)?;
        util::apt_install(&[PACKAGE], Some("bookworm-backports"))?;
    } else {
        util::ensure_packages(&[PACKAGE])?;
    }
    match installed_major() {
        Some(m) if m >= MIN_MAJOR => Ok(()),
        Some(m) => Err(format!(
            "the lab needs QEMU {MIN_MAJOR} or newer (7.2 loses L1 in long runs); this machine's \
             {codename} installs qemu-system-x86 {m}"
        )),
        None => Err("qemu-system-x86 is not installed after apt-get install".into()),
    }
}

/// The installed qemu-system-x86's upstream major version (`1:10.0.2+ds-...` is 10).
fn installed_major() -> Option<u32> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status} ${Version}", PACKAGE])
        .output()
        .ok()?;
    parse_major(&String::from_utf8_lossy(&out.stdout))
}

/// The major version in dpkg-query's `STATUS VERSION` line, if the package is installed.
fn parse_major(line: &str) -> Option<u32> {
    let version = line.strip_prefix("install ok installed ")?;
    let upstream = version.split_once(':').map_or(version, |(_, v)| v);
    upstream.split('.').next()?.parse().ok()
}

/// `VERSION_CODENAME` from /etc/os-release.
fn os_codename() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release")
        .map_err(|e| format!("cannot read /etc/os-release: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .ok_or_else(|| "/etc/os-release names no VERSION_CODENAME".into())
}

#[cfg(test)]
mod tests {
    use super::parse_major;

    #[test]
    fn the_major_version_comes_from_an_installed_package_only() {
        assert_eq!(
            parse_major("install ok installed 1:10.0.2+ds-2+deb13u1~bpo12+1"),
            Some(10)
        );
        assert_eq!(
            parse_major("install ok installed 1:7.2+dfsg-7+deb12u18+b3"),
            Some(7)
        );
        assert_eq!(parse_major("install ok installed 8.2.1"), Some(8));
        assert_eq!(parse_major("deinstall ok config-files 1:10.0.2"), None);
        assert_eq!(parse_major(""), None);
    }
}
