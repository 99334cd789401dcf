//! The base tree: Debian bookworm from debootstrap (minbase plus python3), set up for a sandbox
//! whose PID 1 is Kiln's agent, trimmed of what a sandbox never reads, and checked by running
//! python3 in it. Everything here goes into the base cache key (see `Recipe` in the parent module).

use crate::util;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// The Debian release.
pub const SUITE: &str = "bookworm";

/// Packages on top of minbase. Only python3: the agent is static and needs nothing from the tree.
pub const INCLUDE: &[&str] = &["python3"];

/// Where the agent lives in the guest; `/sbin/init` points here too.
pub const AGENT_PATH: &str = "/usr/sbin/kiln-agent";

/// The unprivileged user sandboxed code runs as.
pub const SANDBOX_USER: &str = "sandbox";
/// Its uid and gid.
pub const SANDBOX_UID: u32 = 1000;

/// Files written over whatever debootstrap left (it copies the host's hostname and resolv.conf).
pub const FILES: &[(&str, &str)] = &[
    ("etc/hostname", "kiln\n"),
    (
        "etc/hosts",
        "127.0.0.1\tlocalhost\n127.0.1.1\tkiln\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    ),
    (
        "etc/resolv.conf",
        "# Kiln sandboxes have no network unless one is attached; the agent writes nameservers here.\n",
    ),
    // Keeps the trimming in effect if a sandbox installs packages itself.
    (
        "etc/dpkg/dpkg.cfg.d/kiln-nodoc",
        "path-exclude=/usr/share/doc/*\npath-include=/usr/share/doc/*/copyright\n\
         path-exclude=/usr/share/man/*\npath-exclude=/usr/share/info/*\n\
         path-exclude=/usr/share/locale/*\npath-exclude=/usr/share/lintian/*\n",
    ),
];

/// Folders emptied (kept themselves, so tools that expect them find them) and the names inside
/// them that stay. Copyright files stay: they are small and the licences ask for them.
pub const TRIM: &[(&str, &[&str])] = &[
    ("var/cache/apt/archives", &["partial", "lock"]),
    ("var/cache/apt", &["archives"]),
    ("var/lib/apt/lists", &["partial", "lock"]),
    ("usr/share/man", &[]),
    ("usr/share/info", &[]),
    ("usr/share/locale", &[]),
    ("usr/share/lintian", &[]),
    ("usr/lib/locale", &["C.utf8"]),
    ("var/log", &["btmp", "faillog", "lastlog", "wtmp"]),
];

/// Folders a PID 1 mounts on or the sandbox writes to, with their modes.
const DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
];

/// Debootstraps `include` (python3 among them) into `tree` (which must not exist) from `mirror`,
/// then sets it up and checks it.
pub fn build_tree(tree: &Path, mirror: &str, include: &[String]) -> util::Result<()> {
    eprintln!(
        "xtask: debootstrap {SUITE} with {} from {mirror} (a minute or more, most of it unpacking)",
        include.join(", ")
    );
    util::run(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", include.join(",")))
            .arg(SUITE)
            .arg(tree)
            .arg(mirror)
            // stdout carries only the image path.
            .stdout(std::io::stderr()),
    )?;
    configure(tree)?;
    trim(tree)?;
    let answer = util::output(
        Command::new("chroot")
            .arg(tree)
            .args(["/usr/bin/python3", "-c", "print(6*7)"])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C.UTF-8"),
    )?;
    if answer.trim() != "42" {
        return Err(format!(
            "python3 in {} printed {answer:?} for print(6*7)",
            tree.display()
        ));
    }
    Ok(())
}

/// Kiln's settings: the files above, the sandbox user, the folders, `/sbin/init` -> the agent.
fn configure(tree: &Path) -> util::Result<()> {
    for (path, text) in FILES {
        let to = tree.join(path);
        util::mkdir(to.parent().unwrap_or(tree))?;
        // Remove first so that a symlink left by debootstrap is replaced, not written through.
        remove(&to)?;
        std::fs::write(&to, text).map_err(|e| format!("cannot write {}: {e}", to.display()))?;
    }
    let uid = SANDBOX_UID.to_string();
    util::run(
        Command::new("chroot")
            .arg(tree)
            .args(["useradd", "--create-home", "--user-group", "--shell"])
            .args(["/bin/bash", "--uid", &uid, SANDBOX_USER])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    )?;
    for (dir, mode) in DIRS {
        let path = tree.join(dir);
        util::mkdir(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
            .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    }
    // /sbin is a symlink to usr/sbin in bookworm; an absolute target works whichever it is.
    let init = tree.join("sbin/init");
    remove(&init)?;
    std::os::unix::fs::symlink(AGENT_PATH, &init)
        .map_err(|e| format!("cannot create {}: {e}", init.display()))
}

/// Empties the [`TRIM`] folders and the docs (but their copyright files), and drops `*-old` backups.
fn trim(tree: &Path) -> util::Result<()> {
    for (dir, keep) in TRIM {
        remove_children(&tree.join(dir), |name| keep.contains(&name))?;
    }
    for package in list(&tree.join("usr/share/doc"))? {
        if package.is_dir() && !package.is_symlink() {
            remove_children(&package, |name| name == "copyright")?;
        }
    }
    for dir in ["var/cache/debconf", "var/lib/dpkg"] {
        remove_children(&tree.join(dir), |name| !name.ends_with("-old"))?;
    }
    Ok(())
}

/// Removes everything in `dir` whose name `keep` refuses; a missing `dir` is fine.
fn remove_children(dir: &Path, keep: impl Fn(&str) -> bool) -> util::Result<()> {
    for path in list(dir)? {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if !keep(&name) {
            remove(&path)?;
        }
    }
    Ok(())
}

/// The entries of `dir`, none if it does not exist.
fn list(dir: &Path) -> util::Result<Vec<std::path::PathBuf>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries.flatten().map(|e| e.path()).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("cannot list {}: {e}", dir.display())),
    }
}

/// Removes a file, symlink (not its target) or folder tree; a missing path is fine.
fn remove(path: &Path) -> util::Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    result.map_err(|e| format!("cannot remove {}: {e}", path.display()))
}
