//! `cargo xtask guest-kernel`: builds Kiln's guest `vmlinux` from Debian's `linux-source-6.1` and the
//! fragment `kernel-config/kiln.config`, or finds it in the cache.
//!
//! The cache key covers everything that decides the output: the fragment's bytes, the kernel source
//! package's exact version and the build recipe (`RECIPE_VERSION`), so a hit needs no make run and
//! returns at once. The source is extracted once per source version and its out-of-tree build folder
//! is kept, so editing the fragment rebuilds only what the changed options touch. A kernel lands in
//! the cache by rename, after the config and PVH checks pass, so a killed build leaves no half file.

use crate::util;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

/// Bump when the way the kernel is built changes (make targets, flags, checks), so old cache
/// entries are not mistaken for the new recipe's output.
const RECIPE_VERSION: &str = "2";

/// The Debian package that ships the kernel source, and the tarball it installs.
const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// The folder the tarball unpacks to.
const SOURCE_TOP: &str = "linux-source-6.1";

/// What building this kernel needs. libssl-dev is left out on purpose: with MODULES and the
/// trusted keyring off, kbuild builds neither sign-file nor extract-cert. libc6-dev is named
/// because `--no-install-recommends` does not bring it in with gcc, and host tools need it.
const PACKAGES: &[&str] = &[
    SOURCE_PACKAGE,
    "xz-utils",
    "make",
    "gcc",
    "libc6-dev",
    "binutils",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
];

/// A stale lock (its owner is gone) is taken over; one whose owner never wrote its pid is
/// taken over after this long.
const LOCK_PID_GRACE: Duration = Duration::from_secs(60);

/// Entry point for `cargo xtask guest-kernel`: prints the cached vmlinux path on stdout.
pub fn main(rest: &[String]) -> util::Result<u8> {
    if let Some(arg) = rest.first() {
        return Err(format!(
            "guest-kernel takes no arguments, got {arg:?}\nusage: cargo xtask guest-kernel"
        ));
    }
    let vmlinux = build()?;
    println!("{}", vmlinux.display());
    Ok(0)
}

/// Returns the path of Kiln's guest vmlinux in the cache, building it first on a miss.
pub fn build() -> util::Result<PathBuf> {
    util::ensure_packages(PACKAGES)?;
    let fragment_path = util::workspace_root()
        .join("kernel-config")
        .join("kiln.config");
    let fragment_text = std::fs::read_to_string(&fragment_path)
        .map_err(|e| format!("cannot read {}: {e}", fragment_path.display()))?;
    let wanted =
        parse_fragment(&fragment_text).map_err(|e| format!("{}: {e}", fragment_path.display()))?;

    let source_id = source_identity()?;
    let source_key = short(&util::hash_parts([source_id.as_bytes()]));
    let key = short(&util::hash_parts([
        RECIPE_VERSION.as_bytes(),
        source_id.as_bytes(),
        fragment_text.as_bytes(),
    ]));
    let root = util::cache_dir().join("guest-kernel");
    let out_dir = root.join(&key);
    let vmlinux = out_dir.join("vmlinux");
    if vmlinux.is_file() {
        return Ok(vmlinux);
    }

    util::mkdir(&root)?;
    // One build at a time per source tree: the build folder is shared between fragment versions.
    let _lock = Lock::acquire(&root.join(format!("build-{source_key}.lock")))?;
    if vmlinux.is_file() {
        // Another run built the same kernel while this one waited for the lock.
        return Ok(vmlinux);
    }

    let started = Instant::now();
    let source = extract_source(&root, &source_key)?;
    let build_dir = root.join(format!("build-{source_key}"));
    util::mkdir(&build_dir)?;
    eprintln!(
        "xtask: configuring the guest kernel in {}",
        build_dir.display()
    );
    // Configure from the bytes that went into the key, not from a file that may be edited meanwhile.
    let fragment_copy = build_dir.join("kiln.config");
    util::write_atomic(&fragment_copy, fragment_text.as_bytes())?;
    let allconfig = format!("KCONFIG_ALLCONFIG={}", fragment_copy.display());
    kbuild(&source, &build_dir, &[&allconfig, "allnoconfig"])?;
    kbuild(&source, &build_dir, &["olddefconfig"])?;
    let config_path = build_dir.join(".config");
    let config_text = std::fs::read_to_string(&config_path)
        .map_err(|e| format!("cannot read {}: {e}", config_path.display()))?;
    let dropped = dropped_options(&wanted, &parse_dotconfig(&config_text));
    if !dropped.is_empty() {
        return Err(format!(
            "Kconfig did not keep these options from {} (unmet dependencies or a misspelt name):\n  {}",
            fragment_path.display(),
            dropped.join("\n  ")
        ));
    }

    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("xtask: building vmlinux with {jobs} jobs (a few minutes on a cold build folder)");
    kbuild(&source, &build_dir, &[&format!("-j{jobs}"), "vmlinux"])?;
    let built = build_dir.join("vmlinux");
    let notes = util::output(Command::new("readelf").arg("-n").arg(&built))?;
    if !has_pvh_entry_note(&notes) {
        return Err(format!(
            "{} has no XEN_ELFNOTE_PHYS32_ENTRY note (readelf -n), so it cannot boot via PVH",
            built.display()
        ));
    }

    util::mkdir(&out_dir)?;
    util::write_atomic(&out_dir.join("config"), config_text.as_bytes())?;
    // vmlinux goes last: its presence is what marks the entry complete.
    copy_atomic(&built, &vmlinux)?;
    eprintln!(
        "xtask: guest kernel built in {:.0} s ({} options =y)",
        started.elapsed().as_secs_f64(),
        config_text.lines().filter(|l| l.ends_with("=y")).count()
    );
    Ok(vmlinux)
}

/// Names the exact kernel source: the package version (Debian never reuses one for other bytes)
/// and the tarball's size as a cheap guard against a hand-replaced file.
fn source_identity() -> util::Result<String> {
    let version =
        util::output(Command::new("dpkg-query").args(["-W", "-f=${Version}", SOURCE_PACKAGE]))?;
    let size = std::fs::metadata(SOURCE_TARBALL)
        .map_err(|e| format!("cannot stat {SOURCE_TARBALL}: {e}"))?
        .len();
    Ok(format!(
        "{SOURCE_PACKAGE} {} {SOURCE_TARBALL} {size}",
        version.trim()
    ))
}

/// The first 16 hex digits of a hash: plenty to tell cache entries apart, short enough to read.
fn short(hash: &str) -> String {
    hash.chars().take(16).collect()
}

/// Unpacks the source tarball into `root/src-<key>` once; returns the kernel tree inside it.
fn extract_source(root: &Path, source_key: &str) -> util::Result<PathBuf> {
    let dest = root.join(format!("src-{source_key}"));
    let tree = dest.join(SOURCE_TOP);
    if tree.join("Makefile").is_file() {
        return Ok(tree);
    }
    // Unpack beside the destination and rename, so an interrupted tar never looks finished.
    let tmp = root.join(format!("src-{source_key}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .map_err(|e| format!("cannot remove {}: {e}", tmp.display()))?;
    }
    util::mkdir(&tmp)?;
    eprintln!("xtask: unpacking {SOURCE_TARBALL}");
    util::run(
        Command::new("tar")
            .arg("-xf")
            .arg(SOURCE_TARBALL)
            .arg("-C")
            .arg(&tmp),
    )?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest)
            .map_err(|e| format!("cannot remove {}: {e}", dest.display()))?;
    }
    std::fs::rename(&tmp, &dest)
        .map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), dest.display()))?;
    Ok(tree)
}

/// Runs make in the kernel tree with the out-of-tree build folder; make's stdout goes to our
/// stderr so that stdout carries only the vmlinux path.
fn kbuild(source: &Path, build_dir: &Path, args: &[&str]) -> util::Result<()> {
    util::run(
        Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(source)
            .arg(format!("O={}", build_dir.display()))
            .arg("ARCH=x86_64")
            .args(args)
            // `uname -v` then names Kiln rather than whoever built it, and does not count rebuilds.
            .env("KBUILD_BUILD_USER", "kiln")
            .env("KBUILD_BUILD_HOST", "kiln")
            .env("KBUILD_BUILD_VERSION", "1")
            .stdout(std::io::stderr()),
    )
}

/// Copies `from` to `to` through a temporary name and a rename.
fn copy_atomic(from: &Path, to: &Path) -> util::Result<()> {
    let tmp = to.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::copy(from, &tmp)
        .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, to)
        .map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), to.display()))
}

/// What a Kconfig line asks for one option.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Setting {
    /// `# CONFIG_X is not set`.
    Off,
    /// `CONFIG_X=<value>`: `y`, a number, or a quoted string, as Kconfig writes it.
    Value(String),
}

/// Parses a config fragment into option name → setting, rejecting lines that are neither an
/// option, a `# CONFIG_X is not set`, a comment nor blank (a typo would otherwise be ignored).
fn parse_fragment(text: &str) -> Result<BTreeMap<String, Setting>, String> {
    let mut options = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        let parsed = if let Some(name) = not_set_name(line) {
            Some((name, Setting::Off))
        } else if line.is_empty() || line.starts_with('#') {
            None
        } else {
            match line.split_once('=') {
                Some((name, value)) if is_option_name(name) && !value.is_empty() => {
                    Some((name, Setting::Value(value.to_string())))
                }
                _ => {
                    return Err(format!(
                        "line {}: not a Kconfig option line: {line:?}",
                        index + 1
                    ));
                }
            }
        };
        if let Some((name, setting)) = parsed
            && options.insert(name.to_string(), setting).is_some()
        {
            return Err(format!("line {}: {name} is set twice", index + 1));
        }
    }
    Ok(options)
}

/// Parses a full `.config`: every option that has a value (unset ones are simply absent).
fn parse_dotconfig(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .filter(|(name, _)| is_option_name(name))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

/// The option name in `# CONFIG_X is not set`, if `line` is one.
fn not_set_name(line: &str) -> Option<&str> {
    let name = line.strip_prefix("# ")?.strip_suffix(" is not set")?;
    is_option_name(name).then_some(name)
}

/// `CONFIG_` followed by letters, digits and underscores.
fn is_option_name(name: &str) -> bool {
    name.strip_prefix("CONFIG_").is_some_and(|rest| {
        !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// The fragment's options that the final config does not honour, each with what was wanted and
/// what Kconfig made of it. `merge_config.sh` and allnoconfig drop such options silently.
fn dropped_options(
    wanted: &BTreeMap<String, Setting>,
    got: &BTreeMap<String, String>,
) -> Vec<String> {
    wanted
        .iter()
        .filter_map(|(name, setting)| {
            let actual = got.get(name);
            let describe =
                |v: Option<&String>| v.map_or("not set".to_string(), |v| format!("={v}"));
            match setting {
                Setting::Value(v) if actual != Some(v) => {
                    Some(format!("{name}: wanted ={v}, got {}", describe(actual)))
                }
                // `=n` never appears in a .config; an option is off when it is absent.
                Setting::Off if actual.is_some_and(|v| v != "n") => {
                    Some(format!("{name}: wanted not set, got {}", describe(actual)))
                }
                _ => None,
            }
        })
        .collect()
}

/// Whether `readelf -n` output shows the Xen note type 0x12 (XEN_ELFNOTE_PHYS32_ENTRY), the
/// 32-bit entry point a VMM jumps to for PVH boot. Older binutils print it as an unknown type.
fn has_pvh_entry_note(readelf: &str) -> bool {
    readelf.lines().any(|line| {
        let mut words = line.split_whitespace();
        words.next() == Some("Xen")
            && (line.contains("XEN_ELFNOTE_PHYS32_ENTRY") || line.contains("(0x00000012)"))
    })
}

/// A lock folder held for the life of one build; `mkdir` is atomic, and the pid inside lets a
/// later run take over the lock of a build that was killed.
struct Lock {
    /// The lock folder, removed on drop.
    dir: PathBuf,
}

impl Lock {
    /// Waits until the lock at `dir` is free (or stale) and takes it.
    fn acquire(dir: &Path) -> util::Result<Lock> {
        let mut told = false;
        loop {
            match std::fs::create_dir(dir) {
                Ok(()) => {
                    util::write_atomic(
                        &dir.join("pid"),
                        std::process::id().to_string().as_bytes(),
                    )?;
                    return Ok(Lock {
                        dir: dir.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("cannot create lock {}: {e}", dir.display())),
            }
            if Self::is_stale(dir) {
                eprintln!("xtask: taking over stale lock {}", dir.display());
                std::fs::remove_dir_all(dir)
                    .map_err(|e| format!("cannot remove stale lock {}: {e}", dir.display()))?;
                continue;
            }
            if !told {
                eprintln!(
                    "xtask: waiting for another guest-kernel build ({})",
                    dir.display()
                );
                told = true;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// A lock is stale when its owner's process is gone, or it never got a pid and is old.
    fn is_stale(dir: &Path) -> bool {
        match std::fs::read_to_string(dir.join("pid")) {
            Ok(pid) => !Path::new("/proc").join(pid.trim()).exists(),
            Err(_) => std::fs::metadata(dir)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > LOCK_PID_GRACE),
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_options_and_comments() {
        let text =
            "# comment\n\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=32\nCONFIG_D=\"-kiln\"\n";
        let parsed = parse_fragment(text).unwrap();
        assert_eq!(parsed.len(), 4);
        assert_eq!(parsed["CONFIG_A"], Setting::Value("y".into()));
        assert_eq!(parsed["CONFIG_B"], Setting::Off);
        assert_eq!(parsed["CONFIG_C"], Setting::Value("32".into()));
        assert_eq!(parsed["CONFIG_D"], Setting::Value("\"-kiln\"".into()));
    }

    #[test]
    fn fragment_rejects_typos_and_duplicates() {
        assert!(
            parse_fragment("CONFIG_A = y\n")
                .unwrap_err()
                .contains("line 1")
        );
        assert!(parse_fragment("CONFG_A=y\n").is_err());
        assert!(parse_fragment("CONFIG_A=\n").is_err());
        assert!(
            parse_fragment("CONFIG_A=y\n# CONFIG_A is not set\n")
                .unwrap_err()
                .contains("twice")
        );
    }

    #[test]
    fn dropped_lists_only_options_kconfig_changed() {
        let wanted = parse_fragment(
            "CONFIG_KEPT=y\nCONFIG_LOST=y\nCONFIG_NUM=64\n# CONFIG_OFF is not set\n# CONFIG_FORCED is not set\n",
        )
        .unwrap();
        let got = parse_dotconfig(
            "CONFIG_KEPT=y\n# CONFIG_LOST is not set\nCONFIG_NUM=8\nCONFIG_FORCED=y\nCONFIG_OTHER=y\n",
        );
        assert_eq!(
            dropped_options(&wanted, &got),
            [
                "CONFIG_FORCED: wanted not set, got =y",
                "CONFIG_LOST: wanted =y, got not set",
                "CONFIG_NUM: wanted =64, got =8",
            ]
        );
    }

    #[test]
    fn the_real_fragment_parses() {
        let path = util::workspace_root()
            .join("kernel-config")
            .join("kiln.config");
        let parsed = parse_fragment(&std::fs::read_to_string(path).unwrap()).unwrap();
        for must in [
            "CONFIG_PVH",
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
            "CONFIG_SERIAL_8250_CONSOLE",
        ] {
            assert_eq!(parsed[must], Setting::Value("y".into()), "{must}");
        }
        assert_eq!(parsed["CONFIG_MODULES"], Setting::Off);
    }

    #[test]
    fn pvh_note_is_recognised_by_name_or_number() {
        let old = "  Xen                  0x00000008\tUnknown note type: (0x00000012)\n";
        let new = "  Xen                  0x00000008\tXEN_ELFNOTE_PHYS32_ENTRY\n";
        let other = "  Xen                  0x00000008\tUnknown note type: (0x00000006)\n\
                     GNU 0x00000014 NT_GNU_BUILD_ID (unique build ID bitstring)\n";
        assert!(has_pvh_entry_note(old));
        assert!(has_pvh_entry_note(new));
        assert!(!has_pvh_entry_note(other));
    }
}
