//! The cleanup guard: what a jailing run built on the host, recorded as it is built, so that a
//! failure at any later step takes it back in reverse order and leaves no half-built jail or
//! cgroup behind. Everything is held by descriptor ([`crate::dirfd`]), so it can be undone from
//! inside the jail too, as long as the process is still root.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::cgroup::CgroupFs;
use crate::dirfd::{DirEntry, remove_tree_at};
use crate::sys::getpid;

/// One thing to take back.
enum Step {
    /// A directory this run created, removed with everything in it (the jail).
    Tree(DirEntry),
    /// A cgroup this run created.
    Cgroup(DirEntry, &'static dyn CgroupFs),
    /// This process joined a cgroup; leaving it means writing its pid back where it came from
    /// (a cgroup with a process in it cannot be removed).
    Leave {
        /// The original cgroup's `cgroup.procs`, open for writing.
        procs: File,
        /// Its path, for messages.
        path: PathBuf,
    },
    /// A file system this run mounted in the jail (its procfs), by its path as this process
    /// sees it; detached so that the jail's tree can go.
    Mount(PathBuf),
}

/// The steps recorded so far; [`Undo::run`] takes them back, dropping it keeps them.
#[derive(Default)]
pub struct Undo {
    steps: Vec<Step>,
}

/// Whether `err` says the thing to remove is already gone.
fn gone(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::NotFound
}

impl Undo {
    /// Nothing recorded yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates the directory `path` with `create` and records it for removal with its contents.
    /// Its parent is opened first, so the record is in place before anything exists to undo.
    pub fn create_tree(
        &mut self,
        path: &Path,
        create: impl FnOnce(&Path) -> io::Result<()>,
    ) -> io::Result<()> {
        let entry = DirEntry::new(path)?;
        create(path)?;
        self.steps.push(Step::Tree(entry));
        Ok(())
    }

    /// Creates the cgroup `path` through `fs` and records it for removal.
    pub fn create_cgroup(&mut self, path: &Path, fs: &'static dyn CgroupFs) -> io::Result<()> {
        let entry = DirEntry::new(path)?;
        fs.create_dir(path)?;
        self.steps.push(Step::Cgroup(entry, fs));
        Ok(())
    }

    /// Records that this process joined a cgroup and came from the one whose `cgroup.procs` is
    /// open as `procs`.
    pub fn joined_cgroup(&mut self, procs: File, path: PathBuf) {
        self.steps.push(Step::Leave { procs, path });
    }

    /// Records that this run mounted a file system at `path` (as this process sees it).
    pub fn mounted(&mut self, path: &Path) {
        self.steps.push(Step::Mount(path.to_path_buf()));
    }

    /// The host paths this run created, for a message when they must be left behind.
    pub fn created(&self) -> Vec<PathBuf> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Tree(e) | Step::Cgroup(e, _) => Some(e.path.clone()),
                Step::Leave { .. } | Step::Mount(_) => None,
            })
            .collect()
    }

    /// Takes everything back, newest first; returns what could not be, one sentence each.
    pub fn run(self) -> Vec<String> {
        let mut problems = Vec::new();
        for step in self.steps.into_iter().rev() {
            match step {
                Step::Tree(e) => match remove_tree_at(e.parent.as_fd(), &e.name) {
                    Err(err) if !gone(&err) => {
                        problems.push(format!("could not remove {}: {err}", e.path.display()))
                    }
                    _ => {}
                },
                Step::Cgroup(e, fs) => match fs.remove_dir_at(e.parent.as_fd(), &e.name) {
                    Err(err) if !gone(&err) => problems.push(format!(
                        "could not remove cgroup {}: {err}",
                        e.path.display()
                    )),
                    _ => {}
                },
                Step::Mount(path) => {
                    let detached = crate::sys::cstring(&path).and_then(|c| {
                        // SAFETY: `c` is NUL-terminated; MNT_DETACH takes the mount away lazily.
                        crate::sys::check(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) })
                    });
                    if let Err(err) = detached {
                        problems.push(format!("could not unmount {}: {err}", path.display()));
                    }
                }
                Step::Leave { mut procs, path } => {
                    if let Err(err) = procs.write_all(getpid().to_string().as_bytes()) {
                        problems.push(format!(
                            "could not move back to cgroup {}: {err}",
                            path.display()
                        ));
                    }
                }
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_are_removed_newest_first_and_a_vanished_one_is_fine() {
        let base = std::env::temp_dir().join(format!("kiln-jailer-undo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let mut undo = Undo::new();
        let jail = base.join("jail");
        undo.create_tree(&jail, |p| std::fs::create_dir(p)).unwrap();
        undo.create_tree(&jail.join("root"), |p| std::fs::create_dir(p))
            .unwrap();
        std::fs::write(jail.join("root/file"), b"x").unwrap();
        let failed = undo.create_tree(&base.join("missing/x"), |p| std::fs::create_dir(p));
        assert!(failed.is_err(), "a parent that does not exist is an error");
        assert_eq!(undo.created(), [jail.clone(), jail.join("root")]);
        assert!(undo.run().is_empty());
        assert!(!jail.exists());
        std::fs::remove_dir(&base).unwrap();
    }
}
