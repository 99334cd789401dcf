//! `kiln-jailer --cleanup`: removes a finished jail, `<base>/<exec-name>/<id>`, and its cgroup
//! `<parent>/<id>` in every hierarchy that has one. It refuses, removing nothing, while a process
//! is still in any of those cgroups; finding nothing to remove is not a failure.

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::args::CleanupArgs;
use crate::cgroup::{CgroupFs, Hierarchy};
use crate::dirfd::{DirEntry, remove_tree_at};
use crate::jail::Jail;

/// Why a jail was not cleaned up.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// A process is still in the jail's cgroup.
    #[error("cgroup {} still holds process(es) {pids}; stop the VMM first", cgroup.display())]
    Busy {
        /// The cgroup.
        cgroup: PathBuf,
        /// The processes in it.
        pids: String,
    },
    /// Something could not be read or removed.
    #[error("cannot {what} {}: {err}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// What the OS said.
        err: io::Error,
    },
}

/// Removes the jail `args` names and its cgroups in `hierarchies`; returns what was removed.
pub fn cleanup(
    args: &CleanupArgs,
    hierarchies: &[Hierarchy],
    fs: &'static dyn CgroupFs,
) -> Result<Vec<PathBuf>, CleanupError> {
    let io_err = |what, path: &Path| {
        let path = path.to_path_buf();
        move |err| CleanupError::Io { what, path, err }
    };
    let parent = args.parent_cgroup();
    let cgroups: Vec<PathBuf> = hierarchies
        .iter()
        .filter(|h| args.cgroup_version.is_none_or(|v| v == h.version))
        .map(|h| h.mount.join(&parent).join(&args.id))
        .filter(|dir| dir.is_dir())
        .collect();
    for cgroup in &cgroups {
        let procs = cgroup.join("cgroup.procs");
        let text = std::fs::read_to_string(&procs).map_err(io_err("read", &procs))?;
        let pids: Vec<&str> = text.split_whitespace().collect();
        if !pids.is_empty() {
            return Err(CleanupError::Busy {
                cgroup: cgroup.clone(),
                pids: pids.join(", "),
            });
        }
    }
    let mut removed = Vec::new();
    let jail = Jail::path(&args.chroot_base, &args.exec_name, &args.id).dir;
    if jail.symlink_metadata().is_ok() {
        let entry = DirEntry::new(&jail).map_err(io_err("open the folder of", &jail))?;
        remove_tree_at(entry.parent.as_fd(), &entry.name).map_err(io_err("remove", &jail))?;
        removed.push(jail);
    }
    for cgroup in cgroups {
        let entry = DirEntry::new(&cgroup).map_err(io_err("open the parent of", &cgroup))?;
        fs.remove_dir_at(entry.parent.as_fd(), &entry.name)
            .map_err(io_err("remove cgroup", &cgroup))?;
        removed.push(cgroup);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::CgroupVersion;
    use std::ffi::CStr;
    use std::os::fd::BorrowedFd;

    /// A plain tree standing in for cgroupfs: a cgroup goes with its interface files.
    struct Tree;
    static TREE: Tree = Tree;
    impl CgroupFs for Tree {
        fn create_dir(&self, path: &Path) -> io::Result<()> {
            std::fs::create_dir(path)
        }
        fn remove_dir_at(&self, parent: BorrowedFd, name: &CStr) -> io::Result<()> {
            remove_tree_at(parent, name)
        }
    }

    #[test]
    fn busy_cgroups_stop_everything_and_empty_ones_go_with_the_jail() {
        let root = std::env::temp_dir().join(format!("kiln-jailer-cleanup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let cgroup = root.join("memory/kiln-vmm/vm-9");
        std::fs::create_dir_all(&cgroup).unwrap();
        std::fs::write(cgroup.join("cgroup.procs"), "4242\n4243\n").unwrap();
        let jail = root.join("base/kiln-vmm/vm-9/root");
        std::fs::create_dir_all(&jail).unwrap();
        std::fs::write(jail.join("api.sock"), b"").unwrap();
        let hs = [Hierarchy {
            version: CgroupVersion::V1,
            controllers: vec!["memory".into()],
            mount: root.join("memory"),
            current: PathBuf::new(),
        }];
        let args = CleanupArgs {
            id: "vm-9".into(),
            exec_name: "kiln-vmm".into(),
            chroot_base: root.join("base"),
            cgroup_version: None,
            parent_cgroup: None,
        };
        let err = cleanup(&args, &hs, &TREE).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cgroup {} still holds process(es) 4242, 4243; stop the VMM first",
                cgroup.display()
            )
        );
        assert!(jail.exists(), "nothing is removed while the cgroup is busy");

        std::fs::write(cgroup.join("cgroup.procs"), "").unwrap();
        let wrong_version = CleanupArgs {
            cgroup_version: Some(CgroupVersion::V2),
            ..args.clone()
        };
        let removed = cleanup(&wrong_version, &hs, &TREE).unwrap();
        assert_eq!(
            removed,
            [root.join("base/kiln-vmm/vm-9")],
            "v1 cgroups are not looked at"
        );
        let removed = cleanup(&args, &hs, &TREE).unwrap();
        assert_eq!(removed, std::slice::from_ref(&cgroup));
        assert!(
            cleanup(&args, &hs, &TREE).unwrap().is_empty(),
            "nothing left"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
