//! Files that appear whole or not at all.
//!
//! A snapshot written in place and interrupted (a crash, a SIGKILL, a full disk) would leave a file
//! that is neither the old snapshot nor the new one. [`AtomicFile`] writes into a temporary file in
//! the same directory and renames it over the final path only on [`AtomicFile::commit`], after an
//! fsync of the file; the directory is fsynced after the rename so the new name survives a power
//! cut. Until the rename, the final path keeps its old content.
//!
//! A temporary that is dropped without a commit is removed. A process killed outright (SIGKILL,
//! power loss) runs no destructor, so a stray temporary may remain beside the final file. Its name
//! starts with `.` and contains `.tmp-` ([`is_temporary_name`] tells); loaders only ever open the
//! final path, so they never see it, and a directory listing can skip it with
//! [`is_temporary_name`]. Nothing removes strays automatically: another process may still be writing
//! its own temporary under a name that looks the same.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The infix that marks an [`AtomicFile`]'s temporary name: `.<name>.tmp-<pid>-<n>`.
const TMP_INFIX: &str = ".tmp-";

/// How many names [`AtomicFile::create`] tries before giving up; only strays left by an earlier
/// process with the same pid can collide, so a few tries are plenty.
const CREATE_TRIES: u32 = 16;

/// Makes temporary names unique within this process; the pid makes them unique across processes.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Why a file could not be written atomically.
#[derive(Debug, thiserror::Error)]
pub enum AtomicFileError {
    /// The final path has no file name (`/`, `..`), so there is nothing to rename over.
    #[error("{0} does not name a file")]
    NoFileName(PathBuf),
    /// The temporary file could not be created.
    #[error("cannot create temporary file {path} for {target}: {source}")]
    Create {
        /// The temporary's path.
        path: PathBuf,
        /// The final path it was meant for.
        target: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The temporary file's data could not be flushed to the disk.
    #[error("cannot fsync temporary file {path}: {source}")]
    Sync {
        /// The temporary's path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The temporary could not be renamed over the final path; the final path is unchanged.
    #[error("cannot rename {from} to {to}: {source}")]
    Rename {
        /// The temporary's path.
        from: PathBuf,
        /// The final path.
        to: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The rename happened but the directory could not be fsynced, so it may not survive a
    /// power cut.
    #[error("cannot fsync directory {dir} after writing {path}: {source}")]
    SyncDir {
        /// The directory.
        dir: PathBuf,
        /// The final path that was written.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// A file being written under a temporary name, which replaces `final_path` on
/// [`commit`](Self::commit) and is removed if dropped first.
///
/// Write through [`file`](Self::file): `&File` implements [`io::Write`], and
/// [`std::os::unix::fs::FileExt::write_all_at`] and [`File::set_len`] make sparse files (memory
/// files) without touching the offset. The file is created with mode 0600: snapshots hold guest
/// memory and device state, which only the owner may read.
#[derive(Debug)]
pub struct AtomicFile {
    file: File,
    tmp_path: PathBuf,
    final_path: PathBuf,
    committed: bool,
}

impl AtomicFile {
    /// Creates a new empty temporary file beside `final_path` (same directory, so the rename
    /// cannot cross file systems). `final_path` itself is not touched until the commit.
    pub fn create(final_path: impl AsRef<Path>) -> Result<Self, AtomicFileError> {
        let final_path = final_path.as_ref().to_path_buf();
        let name = final_path
            .file_name()
            .ok_or_else(|| AtomicFileError::NoFileName(final_path.clone()))?;
        let dir = parent_dir(&final_path);
        let mut tries = 0;
        loop {
            let tmp_path = dir.join(temporary_name(name));
            let opened = OpenOptions::new()
                .write(true)
                .read(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp_path);
            match opened {
                Ok(file) => {
                    return Ok(AtomicFile {
                        file,
                        tmp_path,
                        final_path,
                        committed: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < CREATE_TRIES => {
                    tries += 1;
                }
                Err(source) => {
                    return Err(AtomicFileError::Create {
                        path: tmp_path,
                        target: final_path,
                        source,
                    });
                }
            }
        }
    }

    /// The temporary file, open for reading and writing.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Where the temporary lives until the commit.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp_path
    }

    /// The path the commit renames the temporary to.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Makes the written content the final path's: fsync the file, rename it over the final path,
    /// fsync the directory. On an error before the rename the final path is unchanged and the
    /// temporary is removed.
    pub fn commit(mut self) -> Result<(), AtomicFileError> {
        self.file
            .sync_all()
            .map_err(|source| AtomicFileError::Sync {
                path: self.tmp_path.clone(),
                source,
            })?;
        fs::rename(&self.tmp_path, &self.final_path).map_err(|source| AtomicFileError::Rename {
            from: self.tmp_path.clone(),
            to: self.final_path.clone(),
            source,
        })?;
        // From here on the temporary's name is gone: Drop must not remove anything.
        self.committed = true;
        let dir = parent_dir(&self.final_path);
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| AtomicFileError::SyncDir {
                dir,
                path: self.final_path.clone(),
                source,
            })
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            // Nothing useful can be done with an error here: the final path is untouched either
            // way, and a temporary that cannot be removed is a stray like one after SIGKILL.
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

/// Whether `name` (a file name, not a path) is one of [`AtomicFile`]'s temporaries, which a
/// directory listing of snapshots should skip.
pub fn is_temporary_name(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    name.starts_with('.') && name.contains(TMP_INFIX)
}

/// The directory of `path`; `.` for a bare file name.
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `.<name>.tmp-<pid>-<n>`: hidden, unique, and recognisable by [`is_temporary_name`].
fn temporary_name(name: &OsStr) -> std::ffi::OsString {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!("{TMP_INFIX}{}-{n}", std::process::id()));
    tmp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TestDir;
    use std::io::Write;
    use std::os::unix::fs::{FileExt, PermissionsExt};

    /// The names in `dir` that are temporaries.
    fn temporaries(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| is_temporary_name(n))
            .map(|n| n.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn commit_replaces_the_old_file() {
        let dir = TestDir::new("atomic-commit");
        let path = dir.path().join("state");
        fs::write(&path, b"old content").unwrap();

        let atomic = AtomicFile::create(&path).unwrap();
        let tmp = atomic.tmp_path().to_path_buf();
        assert_eq!(tmp.parent(), path.parent());
        assert!(is_temporary_name(tmp.file_name().unwrap()));
        let mode = fs::metadata(&tmp).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        atomic.file().write_all(b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"old content");
        atomic.commit().unwrap();

        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert!(!tmp.exists());
        assert!(temporaries(dir.path()).is_empty());
    }

    #[test]
    fn commit_creates_a_missing_file() {
        let dir = TestDir::new("atomic-new");
        let path = dir.path().join("fresh");
        let atomic = AtomicFile::create(&path).unwrap();
        atomic.file().write_all(b"hello").unwrap();
        atomic.commit().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hello");
    }

    #[test]
    fn drop_without_commit_keeps_the_old_file_and_removes_the_temporary() {
        let dir = TestDir::new("atomic-drop");
        let path = dir.path().join("state");
        fs::write(&path, b"old content").unwrap();

        let atomic = AtomicFile::create(&path).unwrap();
        atomic.file().write_all(b"half of the new").unwrap();
        let tmp = atomic.tmp_path().to_path_buf();
        assert!(tmp.exists());
        drop(atomic);

        assert_eq!(fs::read(&path).unwrap(), b"old content");
        assert!(!tmp.exists());
        assert!(temporaries(dir.path()).is_empty());
    }

    #[test]
    fn sparse_writes_through_the_file() {
        let dir = TestDir::new("atomic-sparse");
        let path = dir.path().join("mem");
        let atomic = AtomicFile::create(&path).unwrap();
        atomic.file().set_len(1 << 20).unwrap();
        atomic.file().write_all_at(b"page", 8192).unwrap();
        atomic.commit().unwrap();
        let content = fs::read(&path).unwrap();
        assert_eq!(content.len(), 1 << 20);
        assert_eq!(&content[8192..8196], b"page");
        assert!(content[..8192].iter().all(|&b| b == 0));
    }

    #[test]
    fn two_temporaries_for_one_path_have_different_names() {
        let dir = TestDir::new("atomic-unique");
        let path = dir.path().join("state");
        let a = AtomicFile::create(&path).unwrap();
        let b = AtomicFile::create(&path).unwrap();
        assert_ne!(a.tmp_path(), b.tmp_path());
    }

    #[test]
    fn a_bare_file_name_lives_in_the_current_directory() {
        assert_eq!(parent_dir(Path::new("state")), PathBuf::from("."));
        assert!(matches!(
            AtomicFile::create("/"),
            Err(AtomicFileError::NoFileName(_))
        ));
    }

    #[test]
    fn temporary_names_are_recognised() {
        assert!(is_temporary_name(OsStr::new(".vm.state.tmp-12-0")));
        assert!(!is_temporary_name(OsStr::new("vm.state")));
        assert!(!is_temporary_name(OsStr::new(".hidden")));
    }

    /// A writer killed by SIGKILL half-way through leaves the old file whole (and a stray
    /// temporary, which a loader of the final path never reads).
    #[test]
    fn sigkill_mid_write_leaves_the_old_file_intact() {
        let dir = TestDir::new("atomic-kill");
        let path = dir.path().join("state");
        let old = vec![0xa5u8; 64 * 1024];
        fs::write(&path, &old).unwrap();
        let new = vec![0x5au8; 64 * 1024];

        // SAFETY: fork has no memory-safety preconditions. The child only creates the temporary,
        // writes to it and kills itself; glibc's malloc is usable after fork (it resets its locks
        // in the child), and the child takes no other lock another test thread could hold.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            if let Ok(atomic) = AtomicFile::create(&path) {
                let mut file = atomic.file();
                if file.write_all(&new[..new.len() / 2]).is_ok() {
                    // SAFETY: kill and getpid have no preconditions; SIGKILL ends this process
                    // here, before the commit and before any destructor.
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                }
            }
            // SAFETY: _exit ends the child without running the parent's atexit handlers or
            // destructors; only reached if the setup above failed.
            unsafe { libc::_exit(2) };
        }

        let mut status = 0;
        // SAFETY: `pid` is our child and `status` a valid out-pointer.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
            "child did not die by SIGKILL (status {status:#x})"
        );

        assert_eq!(fs::read(&path).unwrap(), old);
        let strays = temporaries(dir.path());
        assert_eq!(strays.len(), 1, "the killed writer's temporary remains");
        let stray = fs::read(dir.path().join(&strays[0])).unwrap();
        assert_eq!(stray, &new[..new.len() / 2]);
    }
}
