//! A busybox initramfs builder shared by the lab's L1 VM and the L2 test guests: "busybox, this /init
//! script and these extra files" becomes a newc cpio archive the kernel unpacks as its root.
//!
//! The archive is written by hand (the format is a 110-byte text header per entry) so that it can hold
//! `/dev/console` without root and come out byte-identical for identical inputs, which is what lets
//! [`cached`] key it by content.

use crate::util::{self, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The statically linked busybox from Debian's `busybox-static`; it needs nothing else in the archive.
const BUSYBOX: &str = "/bin/busybox";

/// Folders every initramfs gets, so an /init script can mount over them without creating them first.
const DIRS: &[&str] = &[
    "bin", "dev", "etc", "lib", "proc", "root", "sbin", "sys", "tmp", "usr/bin", "usr/sbin",
];

/// Builds (or finds) the archive for these inputs under `dir` and returns its path. The file name is a
/// hash of everything that goes in (busybox itself included), so a changed input never reuses a stale one.
pub fn cached(init: &str, extra: &[(PathBuf, String)], dir: &Path) -> Result<PathBuf> {
    util::ensure_packages(&["busybox-static"])?;
    // Content hashes stand in for the files, so the key costs one read of each and no copies.
    let mut parts: Vec<Vec<u8>> = vec![
        b"kiln-initramfs-v1".to_vec(),
        init.as_bytes().to_vec(),
        util::hash_file(Path::new(BUSYBOX))?.into_bytes(),
    ];
    for (host, path) in extra {
        parts.push(path.as_bytes().to_vec());
        parts.push(mode_of(host)?.to_le_bytes().to_vec());
        parts.push(util::hash_file(host)?.into_bytes());
    }
    let key = util::hash_parts(parts.iter().map(Vec::as_slice));
    let out = dir.join(format!("initramfs-{}.cpio", &key[..16]));
    if !out.exists() {
        util::mkdir(dir)?;
        build(init, extra, &out)?;
    }
    Ok(out)
}

/// Writes a newc cpio archive to `out`: busybox at /bin/busybox with a symlink per applet, `/dev/console`,
/// `init` as the executable /init, and each `(host file, path in the archive)` of `extra` with the host
/// file's permission bits. Extra files win over applet links of the same name.
pub fn build(init: &str, extra: &[(PathBuf, String)], out: &Path) -> Result<()> {
    util::ensure_packages(&["busybox-static"])?;
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    for dir in DIRS {
        entries.insert((*dir).to_string(), Entry::Dir);
    }
    entries.insert(
        "dev/console".into(),
        Entry::CharDev {
            perm: 0o600,
            major: 5,
            minor: 1,
        },
    );
    entries.insert(
        "bin/busybox".into(),
        Entry::File {
            perm: 0o755,
            data: read(Path::new(BUSYBOX))?,
        },
    );
    let applets = util::output(Command::new(BUSYBOX).arg("--list-full"))?;
    for applet in applets
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "bin/busybox")
    {
        entries.insert(applet.to_string(), Entry::Symlink("/bin/busybox".into()));
    }
    entries.insert(
        "init".into(),
        Entry::File {
            perm: 0o755,
            data: init.as_bytes().to_vec(),
        },
    );
    for (host, path) in extra {
        let name = archive_name(path)?;
        entries.insert(
            name,
            Entry::File {
                perm: mode_of(host)? & 0o7777,
                data: read(host)?,
            },
        );
    }
    add_parents(&mut entries);

    // Per process, so two runs building the same archive do not write into one file.
    let tmp = out.with_extension(format!("partial-{}", std::process::id()));
    let file =
        std::fs::File::create(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let mut writer = Newc::new(std::io::BufWriter::new(file));
    for (name, entry) in &entries {
        writer
            .entry(name, entry)
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    }
    let mut inner = writer
        .finish()
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    inner
        .flush()
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    drop(inner);
    std::fs::rename(&tmp, out)
        .map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), out.display()))
}

/// One member of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A folder (mode 0755).
    Dir,
    /// A regular file with these permission bits and contents.
    File {
        /// Permission bits, e.g. 0o755.
        perm: u32,
        /// The file's bytes.
        data: Vec<u8>,
    },
    /// A symbolic link to this target.
    Symlink(String),
    /// A character device node.
    CharDev {
        /// Permission bits.
        perm: u32,
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

/// Turns a caller's archive path into a cpio member name: relative, no `.`/`..` parts, no empty parts.
fn archive_name(path: &str) -> Result<String> {
    util::below_root(path, "the initramfs root")
}

/// Adds a `Dir` entry for every missing parent folder, so the kernel can create each file.
fn add_parents(entries: &mut BTreeMap<String, Entry>) {
    let mut parents = Vec::new();
    for name in entries.keys() {
        let mut cut = name.as_str();
        while let Some(i) = cut.rfind('/') {
            cut = &cut[..i];
            parents.push(cut.to_string());
        }
    }
    for p in parents {
        entries.entry(p).or_insert(Entry::Dir);
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn mode_of(path: &Path) -> Result<u32> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "{} is not a regular file; an initramfs extra must be one",
            path.display()
        ));
    }
    Ok(meta.permissions().mode())
}

/// A newc ("070701") cpio writer. Every field is fixed (uid 0, mtime 0, fresh inode numbers) so the
/// same entries always give the same bytes.
pub struct Newc<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> Newc<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        Newc {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// Appends one member called `name` (relative, e.g. `bin/sh`).
    pub fn entry(&mut self, name: &str, entry: &Entry) -> std::io::Result<()> {
        let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
            Entry::Dir => (0o040_755, &[], (0, 0)),
            Entry::File { perm, data } => (0o100_000 | perm, data, (0, 0)),
            Entry::Symlink(target) => (0o120_777, target.as_bytes(), (0, 0)),
            Entry::CharDev { perm, major, minor } => (0o020_000 | perm, &[], (*major, *minor)),
        };
        let nlink = if matches!(entry, Entry::Dir) { 2 } else { 1 };
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(name, ino, mode, nlink, data.len(), rdev)?;
        self.put(data)?;
        self.pad()
    }

    /// Writes the `TRAILER!!!` member and returns the underlying writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.header("TRAILER!!!", 0, 0, 1, 0, (0, 0))?;
        Ok(self.out)
    }

    fn header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        size: usize,
        rdev: (u32, u32),
    ) -> std::io::Result<()> {
        let size = u32::try_from(size)
            .map_err(|_| std::io::Error::other(format!("{name} is over 4 GiB")))?;
        // The name size counts the terminating NUL.
        let namesize = name.len() as u32 + 1;
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        let mut head = String::with_capacity(110);
        head.push_str("070701");
        for f in fields {
            head.push_str(&format!("{f:08x}"));
        }
        self.put(head.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Headers and file data both start on 4-byte boundaries.
    fn pad(&mut self) -> std::io::Result<()> {
        let fill = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..fill])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(archive: &[u8], at: usize, index: usize) -> u32 {
        let start = at + 6 + index * 8;
        u32::from_str_radix(std::str::from_utf8(&archive[start..start + 8]).unwrap(), 16).unwrap()
    }

    #[test]
    fn newc_layout_is_aligned_and_terminated() {
        let mut w = Newc::new(Vec::new());
        w.entry(
            "init",
            &Entry::File {
                perm: 0o755,
                data: b"#!/bin/sh\n".to_vec(),
            },
        )
        .unwrap();
        w.entry(
            "dev/console",
            &Entry::CharDev {
                perm: 0o600,
                major: 5,
                minor: 1,
            },
        )
        .unwrap();
        let a = w.finish().unwrap();

        assert_eq!(&a[..6], b"070701");
        assert_eq!(field(&a, 0, 1), 0o100_755);
        assert_eq!(field(&a, 0, 6), 10); // file size
        assert_eq!(field(&a, 0, 11), 5); // "init" + NUL
        assert_eq!(&a[110..115], b"init\0");
        // 110 + 5 = 115, padded to 116; data 10 bytes to 126, padded to 128.
        assert_eq!(&a[116..126], b"#!/bin/sh\n");
        assert_eq!(&a[128..134], b"070701");
        assert_eq!(field(&a, 128, 1), 0o020_600);
        assert_eq!((field(&a, 128, 9), field(&a, 128, 10)), (5, 1));
        let trailer = a.windows(10).position(|w| w == b"TRAILER!!!").unwrap();
        assert_eq!((trailer - 110) % 4, 0);
        assert_eq!(a.len() % 4, 0);
    }

    #[test]
    fn symlink_data_is_the_target() {
        let mut w = Newc::new(Vec::new());
        w.entry("bin/sh", &Entry::Symlink("/bin/busybox".into()))
            .unwrap();
        let a = w.finish().unwrap();
        assert_eq!(field(&a, 0, 1), 0o120_777);
        assert_eq!(field(&a, 0, 6), 12);
        assert_eq!(&a[120..132], b"/bin/busybox");
    }

    #[test]
    fn parents_are_added_before_children() {
        let mut e = BTreeMap::new();
        e.insert(
            "a/b/c".to_string(),
            Entry::File {
                perm: 0o644,
                data: vec![],
            },
        );
        e.insert("a-z".to_string(), Entry::Dir);
        add_parents(&mut e);
        let names: Vec<&str> = e.keys().map(String::as_str).collect();
        assert_eq!(names, ["a", "a-z", "a/b", "a/b/c"]);
    }

    #[test]
    fn archive_names_are_relative_and_clean() {
        assert_eq!(
            archive_name("/lib/modules/kvm.ko").unwrap(),
            "lib/modules/kvm.ko"
        );
        assert_eq!(archive_name("./x//y").unwrap(), "x/y");
        assert!(archive_name("../etc/passwd").is_err());
        assert!(archive_name("/").is_err());
    }
}
