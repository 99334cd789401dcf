//! Directories held by descriptor. Once the jailer has pivoted into the jail the host's paths are
//! gone, but a descriptor opened before still reaches its directory (and the mount it is on), so
//! what a failed run must remove is remembered as "entry `name` of the directory open as `fd`".

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sys::{check, cstring};

/// An entry of a directory, reachable whatever the process's root is now.
#[derive(Debug)]
pub struct DirEntry {
    /// The directory holding it.
    pub parent: OwnedFd,
    /// Its name there.
    pub name: CString,
    /// Its host path, for messages.
    pub path: PathBuf,
}

impl DirEntry {
    /// Opens `path`'s parent directory and remembers `path`'s last component.
    pub fn new(path: &Path) -> io::Result<Self> {
        let (parent, name) = match (path.parent(), path.file_name()) {
            (Some(p), Some(n)) => (p, n),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} has no parent directory", path.display()),
                ));
            }
        };
        Ok(Self {
            parent: open_dir(parent)?,
            name: CString::new(name.as_bytes()).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "a name holds a NUL byte")
            })?,
            path: path.to_path_buf(),
        })
    }
}

/// Opens the directory at `path` (close-on-exec).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    // SAFETY: `c` is a NUL-terminated path; the result is checked before it is used as an fd.
    let fd = check(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Removes the empty directory `name` in `parent`.
pub fn remove_dir_at(parent: BorrowedFd, name: &CStr) -> io::Result<()> {
    // SAFETY: `parent` is an open directory descriptor and `name` is NUL-terminated.
    check(unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) })
        .map(drop)
}

/// Removes `name` in `parent` and, if it is a directory, everything below it. Symbolic links are
/// removed, never followed.
pub fn remove_tree_at(parent: BorrowedFd, name: &CStr) -> io::Result<()> {
    // SAFETY: `parent` is an open directory descriptor and `name` is NUL-terminated.
    match check(unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), 0) }) {
        Ok(_) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {}
        Err(e) => return Err(e),
    }
    let dir = {
        // SAFETY: as above; O_NOFOLLOW keeps a symlink swapped in from being followed.
        let fd = check(unsafe {
            libc::openat(
                parent.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just opened and is owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    };
    for child in list_dir(dir.as_fd())? {
        remove_tree_at(dir.as_fd(), &child)?;
    }
    remove_dir_at(parent, name)
}

/// The names in the directory open as `dir`, without `.` and `..`.
pub fn list_dir(dir: BorrowedFd) -> io::Result<Vec<CString>> {
    // fdopendir takes ownership of the descriptor it is given, so it gets a duplicate.
    // SAFETY: F_DUPFD_CLOEXEC on an open descriptor returns a new one or -1.
    let dup = check(unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `dup` is an open directory descriptor that nothing else owns.
    let stream = unsafe { libc::fdopendir(dup) };
    if stream.is_null() {
        let err = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `dup` is still ours to close.
        unsafe { libc::close(dup) };
        return Err(err);
    }
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; clearing it tells end-of-directory from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is a valid DIR* until closedir below.
        let entry = unsafe { libc::readdir64(stream) };
        if entry.is_null() {
            let err = io::Error::last_os_error();
            break match err.raw_os_error() {
                Some(0) | None => Ok(()),
                Some(_) => Err(err),
            };
        }
        // SAFETY: readdir returned an entry whose d_name is NUL-terminated and valid until the
        // next readdir call; it is copied out at once.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: `stream` came from fdopendir and is closed once; this also closes `dup`.
    unsafe { libc::closedir(stream) };
    result.map(|()| names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_is_removed_through_its_parent_without_following_links() {
        let base = std::env::temp_dir().join(format!("kiln-jailer-dirfd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let keep = base.join("keep");
        std::fs::create_dir_all(keep.join("inner")).unwrap();
        std::fs::write(keep.join("inner/file"), b"stays").unwrap();
        let tree = base.join("tree");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::write(tree.join("a/b/f"), b"x").unwrap();
        std::os::unix::fs::symlink(&keep, tree.join("a/link")).unwrap();

        let entry = DirEntry::new(&tree).unwrap();
        let mut names = list_dir(entry.parent.as_fd()).unwrap();
        names.sort();
        assert_eq!(names, [c"keep".to_owned(), c"tree".to_owned()]);
        remove_tree_at(entry.parent.as_fd(), &entry.name).unwrap();
        assert!(!tree.exists());
        assert_eq!(std::fs::read(keep.join("inner/file")).unwrap(), b"stays");
        let err = remove_tree_at(entry.parent.as_fd(), &entry.name).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
