//! The jail's directory on the host, `<chroot-base-dir>/<exec-name>/<id>/root`, and what goes in
//! it before the process moves in: a copy of the exec file at `/<exec-name>` (a copy, not a hard
//! link, so the jail shares no inode with the host) and, for a dynamically linked one, copies of
//! its loader and libraries ([`crate::libs`]).
//!
//! With `--share-exec-file` those are hard links to one root-owned copy per version of each
//! host file in `<chroot-base-dir>/<exec-name>/.shared` instead: still no inode shared with the
//! host, but one shared by every jail, so N jailed VMMs map one copy of their code (a page cache
//! shared like the snapshot files clones already share) instead of N (the copies sit in the
//! page cache, or in memory outright when the base is a tmpfs: ~3 MiB a VMM). The name `.shared`
//! cannot be a jail id, which has no dots.
//!
//! `<id>` must be new; it is recorded in the undo, so a failure later removes it with everything
//! in it. The directories above it are shared by jails and stay. The root is owned by uid:gid,
//! so the VMM can create its API and vsock sockets there; what is copied in stays root's.

use std::io;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Component, Path, PathBuf};

use crate::libs::Deps;
use crate::undo::Undo;

/// Why the jail could not be built.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The jail is there already.
    #[error("jail {} already exists: another jail has this id, or a finished one was not cleaned up (kiln-jailer --cleanup)", .0.display())]
    Exists(PathBuf),
    /// A directory cannot be made.
    #[error("cannot create {}: {err}", path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        err: io::Error,
    },
    /// A file cannot be copied in.
    #[error("cannot copy {} to {}: {err}", from.display(), to.display())]
    Copy {
        /// The host file.
        from: PathBuf,
        /// Where it was going.
        to: PathBuf,
        /// What the OS said.
        err: io::Error,
    },
    /// Ownership or mode cannot be set.
    #[error("cannot set the owner or mode of {}: {err}", path.display())]
    Owner {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        err: io::Error,
    },
    /// A path the loader reported cannot be placed inside the jail.
    #[error("{} cannot be placed inside the jail (it must be absolute, without '..')", .0.display())]
    Outside(PathBuf),
}

/// The jail's directories on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// `<base>/<exec-name>/<id>`, what `--cleanup` removes.
    pub dir: PathBuf,
    /// `<dir>/root`, the jailed process's `/`.
    pub root: PathBuf,
}

impl Jail {
    /// Where the jail for `id` lives (nothing is made).
    pub fn path(base: &Path, exec_name: &str, id: &str) -> Self {
        let dir = base.join(exec_name).join(id);
        Self {
            root: dir.join("root"),
            dir,
        }
    }

    /// Makes the jail's directories, recording `<id>` in `undo`, and gives the root to uid:gid.
    pub fn create(
        base: &Path,
        exec_name: &str,
        id: &str,
        owner: (u32, u32),
        undo: &mut Undo,
    ) -> Result<Self, JailError> {
        let jail = Self::path(base, exec_name, id);
        let parent = base.join(exec_name);
        std::fs::create_dir_all(&parent).map_err(|err| JailError::Create { path: parent, err })?;
        undo.create_tree(&jail.dir, |p| std::fs::create_dir(p))
            .map_err(|err| match err.kind() {
                io::ErrorKind::AlreadyExists => JailError::Exists(jail.dir.clone()),
                _ => JailError::Create {
                    path: jail.dir.clone(),
                    err,
                },
            })?;
        std::fs::create_dir(&jail.root).map_err(|err| JailError::Create {
            path: jail.root.clone(),
            err,
        })?;
        set_owner_mode(&jail.root, Some(owner), 0o755)?;
        Ok(jail)
    }

    /// Puts `exec_file` at `/<exec_name>` in the jail, and the loader and libraries in `deps`:
    /// copies, or with `shared` hard links to the shared copies.
    pub fn install(
        &self,
        exec_file: &Path,
        exec_name: &str,
        deps: &Deps,
        shared: bool,
    ) -> Result<(), JailError> {
        let place = |from: &Path, to: &Path, mode| match shared {
            true => self.link_shared(from, to, mode),
            false => self.copy_in(from, to, mode),
        };
        place(exec_file, &self.root.join(exec_name), 0o755)?;
        if let Some(interp) = &deps.interpreter {
            place(interp, &self.inside(interp)?, 0o755)?;
        }
        if deps.libraries.is_empty() {
            // A static exec file: no library folder to name.
            return Ok(());
        }
        let lib_dir = self.inside(&deps.lib_dir)?;
        for (name, host) in &deps.libraries {
            let to = lib_dir.join(name);
            if Path::new(name).components().count() != 1 {
                return Err(JailError::Outside(to));
            }
            place(host, &to, 0o644)?;
        }
        Ok(())
    }

    /// `<base>/<exec-name>/.shared`, beside the jails.
    fn shared_dir(&self) -> PathBuf {
        self.dir.parent().unwrap_or(Path::new("/")).join(".shared")
    }

    /// Hard-links `to` to the shared copy of `from`, making that copy first if this version of
    /// `from` has none: it is named by the host file's device, inode, size and change time (and
    /// the mode it gets), so
    /// an upgraded binary gets a new copy while running jails keep theirs, and it is written
    /// under a temporary name and renamed, so jailers starting at once never see half a file.
    fn link_shared(&self, from: &Path, to: &Path, mode: u32) -> Result<(), JailError> {
        use std::os::unix::fs::MetadataExt;
        let copy_err = |err| JailError::Copy {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            err,
        };
        let meta = std::fs::metadata(from).map_err(copy_err)?;
        let file = from
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = self.shared_dir();
        // The mode too: links share it, and one host file may be placed with two.
        let shared = dir.join(format!(
            "{}-{}-{}-{}.{}-{mode:o}-{file}",
            meta.dev(),
            meta.ino(),
            meta.len(),
            meta.ctime(),
            meta.ctime_nsec()
        ));
        if !shared.exists() {
            std::fs::create_dir_all(&dir).map_err(|err| JailError::Create {
                path: dir.clone(),
                err,
            })?;
            let tmp = dir.join(format!(".{file}.{}", std::process::id()));
            std::fs::copy(from, &tmp).map_err(copy_err)?;
            set_owner_mode(&tmp, None, mode)?;
            std::fs::rename(&tmp, &shared).map_err(copy_err)?;
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|err| JailError::Create {
                path: parent.to_path_buf(),
                err,
            })?;
        }
        std::fs::hard_link(&shared, to).map_err(|err| JailError::Copy {
            from: shared.clone(),
            to: to.to_path_buf(),
            err,
        })
    }

    /// `path` (absolute) below the jail's root.
    fn inside(&self, path: &Path) -> Result<PathBuf, JailError> {
        let mut parts = path.components();
        if parts.next() != Some(Component::RootDir)
            || !parts.clone().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(JailError::Outside(path.to_path_buf()));
        }
        Ok(self.root.join(parts.as_path()))
    }

    /// Copies `from` (following links) to `to`, making `to`'s directories, with `mode`.
    fn copy_in(&self, from: &Path, to: &Path, mode: u32) -> Result<(), JailError> {
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).map_err(|err| JailError::Create {
                path: dir.to_path_buf(),
                err,
            })?;
        }
        std::fs::copy(from, to).map_err(|err| JailError::Copy {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            err,
        })?;
        set_owner_mode(to, None, mode)
    }
}

fn set_owner_mode(path: &Path, owner: Option<(u32, u32)>, mode: u32) -> Result<(), JailError> {
    let err = |err| JailError::Owner {
        path: path.to_path_buf(),
        err,
    };
    if let Some((uid, gid)) = owner {
        chown(path, Some(uid), Some(gid)).map_err(err)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// An empty folder for test `tag`'s jails, and this process's uid and gid.
    fn scratch(tag: &str) -> (PathBuf, (u32, u32)) {
        let base = std::env::temp_dir().join(format!("kiln-jailer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let me = std::fs::metadata("/proc/self").unwrap();
        (base, (me.uid(), me.gid()))
    }

    #[test]
    fn a_jail_is_new_holds_copies_and_is_undone_whole() {
        let (base, me) = scratch("jail");
        let mut undo = Undo::new();
        let jail = Jail::create(&base, "vmm", "id-1", me, &mut undo).unwrap();
        assert_eq!(jail.root, base.join("vmm/id-1/root"));
        let exe = std::env::current_exe().unwrap();
        let deps = Deps {
            interpreter: Some(exe.clone()),
            libraries: vec![("libx.so.1".into(), exe.clone())],
            lib_dir: "/lib/x86_64-linux-gnu".into(),
        };
        jail.install(&exe, "vmm", &deps, false).unwrap();
        let copy = std::fs::metadata(jail.root.join("vmm")).unwrap();
        let host = std::fs::metadata(&exe).unwrap();
        assert_eq!(copy.len(), host.len());
        assert_ne!(copy.ino(), host.ino(), "a copy, not a link");
        assert_eq!(copy.mode() & 0o777, 0o755);
        let lib = jail.root.join("lib/x86_64-linux-gnu/libx.so.1");
        assert_eq!(std::fs::metadata(lib).unwrap().mode() & 0o777, 0o644);
        assert!(jail.inside(Path::new("/a/../../etc")).is_err());
        assert!(jail.inside(Path::new("relative")).is_err());

        let mut again = Undo::new();
        let err = Jail::create(&base, "vmm", "id-1", me, &mut again).unwrap_err();
        assert!(matches!(err, JailError::Exists(_)), "{err}");
        assert!(again.created().is_empty());

        assert!(undo.run().is_empty());
        assert!(!base.join("vmm/id-1").exists());
        assert!(base.join("vmm").is_dir(), "the shared parent stays");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_static_exec_file_is_installed_alone() {
        let (base, me) = scratch("static");
        let mut undo = Undo::new();
        let jail = Jail::create(&base, "vmm", "static", me, &mut undo).unwrap();
        let exe = std::env::current_exe().unwrap();
        // What libs::resolve gives for a file without an interpreter.
        jail.install(&exe, "vmm", &Deps::default(), false).unwrap();
        jail.install(&exe, "vmm2", &Deps::default(), true).unwrap();
        assert!(jail.root.join("vmm").is_file() && jail.root.join("vmm2").is_file());
        assert!(!jail.root.join("lib").exists(), "no library folder");
        assert!(undo.run().is_empty());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn shared_jails_link_one_copy_of_each_file_and_leave_it_when_undone() {
        let (base, me) = scratch("shared");
        let exe = std::env::current_exe().unwrap();
        let deps = Deps {
            interpreter: None,
            libraries: vec![("libx.so.1".into(), exe.clone())],
            lib_dir: "/lib".into(),
        };
        let (mut u1, mut u2) = (Undo::new(), Undo::new());
        let a = Jail::create(&base, "vmm", "a", me, &mut u1).unwrap();
        let b = Jail::create(&base, "vmm", "b", me, &mut u2).unwrap();
        a.install(&exe, "vmm", &deps, true).unwrap();
        b.install(&exe, "vmm", &deps, true).unwrap();
        let (va, vb) = (
            std::fs::metadata(a.root.join("vmm")).unwrap(),
            std::fs::metadata(b.root.join("vmm")).unwrap(),
        );
        let host = std::fs::metadata(&exe).unwrap();
        assert_eq!(va.ino(), vb.ino(), "one copy for both jails");
        assert_ne!(va.ino(), host.ino(), "not the host's file");
        assert_eq!(va.len(), host.len());
        assert_eq!(va.mode() & 0o777, 0o755);
        let lib = std::fs::metadata(a.root.join("lib/libx.so.1")).unwrap();
        assert_eq!(lib.mode() & 0o777, 0o644);
        assert_ne!(
            lib.ino(),
            va.ino(),
            "a library's copy is its own, with its own mode"
        );
        // The shared folder holds the two copies and nothing half-written.
        let names: Vec<String> = std::fs::read_dir(base.join("vmm/.shared"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
        assert!(u1.run().is_empty());
        assert!(!base.join("vmm/a").exists());
        assert!(b.root.join("vmm").exists(), "the other jail keeps its link");
        assert!(base.join("vmm/.shared").is_dir(), "the shared copies stay");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
