//! `kiln-jailer --cleanup`: removes a finished jail, `<base>/<exec-name>/<id>`, and its cgroup
//! `<parent>/<id>` in every hierarchy that has one. It refuses, removing nothing, while a process
//! is still in any of those cgroups; finding nothing to remove is not a failure.
//!
//! Kernel threads are the exception for a while. KVM starts a worker thread per VM on some
//! kernels (`kvm-nx-lpage-recovery-PID` on x86 before 6.13) and moves it into the VMM's cgroups;
//! it ends when the kernel frees the VM, which can be a moment after the VMM has been reaped. A
//! cgroup that holds only kernel threads is waited on for up to [`KERNEL_THREAD_GRACE`], and
//! named in the refusal if they stay.

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::args::CleanupArgs;
use crate::cgroup::{CgroupFs, Hierarchy};
use crate::dirfd::{DirEntry, remove_tree_at};
use crate::jail::Jail;
use crate::procs::{Member, Processes};

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
    /// Kernel threads stayed in the jail's cgroup for all of [`KERNEL_THREAD_GRACE`].
    #[error(
        "cgroup {} still holds kernel thread(s) {threads} after {grace:?}; they end when the \
         kernel frees the VM, so something still holds the VM (a process with its KVM file?)",
        cgroup.display()
    )]
    KernelThreads {
        /// The cgroup.
        cgroup: PathBuf,
        /// The threads in it, with their names.
        threads: String,
        /// How long they were waited for.
        grace: Duration,
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

/// How long a cgroup holding only kernel threads is waited on.
pub const KERNEL_THREAD_GRACE: Duration = Duration::from_secs(5);

/// Removes the jail `args` names and its cgroups in `hierarchies`; returns what was removed.
/// Kernel threads alone in a cgroup are waited on for up to `grace` (see the module's note).
pub fn cleanup(
    args: &CleanupArgs,
    hierarchies: &[Hierarchy],
    fs: &'static dyn CgroupFs,
    procs: &dyn Processes,
    grace: Duration,
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
    let deadline = Instant::now() + grace;
    for cgroup in &cgroups {
        wait_empty(cgroup, procs, deadline, grace)?;
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

/// Returns once `cgroup` holds no process; refuses at once for a user process, and at `deadline`
/// (`grace` after the cleanup began) for kernel threads.
fn wait_empty(
    cgroup: &Path,
    procs: &dyn Processes,
    deadline: Instant,
    grace: Duration,
) -> Result<(), CleanupError> {
    let file = cgroup.join("cgroup.procs");
    loop {
        let text = std::fs::read_to_string(&file).map_err(|err| CleanupError::Io {
            what: "read",
            path: file.clone(),
            err,
        })?;
        let pids: Vec<&str> = text.split_whitespace().collect();
        if pids.is_empty() {
            return Ok(());
        }
        let mut threads = Vec::new();
        for pid in &pids {
            match procs.member(pid) {
                Member::User => {
                    return Err(CleanupError::Busy {
                        cgroup: cgroup.to_path_buf(),
                        pids: pids.join(", "),
                    });
                }
                Member::KernelThread(name) => threads.push(format!("{pid} ({name})")),
                Member::Gone => threads.push(format!("{pid} (exiting)")),
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(CleanupError::KernelThreads {
                cgroup: cgroup.to_path_buf(),
                threads: threads.join(", "),
                grace,
            });
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(20)));
    }
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

    /// A process table where pids below 1000 are kernel threads and the rest user processes.
    struct Table;
    impl Processes for Table {
        fn member(&self, pid: &str) -> Member {
            match pid.parse::<u32>() {
                Ok(n) if n < 1000 => Member::KernelThread(format!("kvm-nx-lpage-recovery-{n}")),
                _ => Member::User,
            }
        }
    }

    /// Jail `vm-9` under a fresh `root` (named for the test): its v1 memory hierarchy, the
    /// cgroup with `procs` in it, the jail's folder, and the arguments that name it all.
    fn jail_with(test: &str, procs: &str) -> (PathBuf, Vec<Hierarchy>, CleanupArgs) {
        let root =
            std::env::temp_dir().join(format!("kiln-jailer-cleanup-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let cgroup = root.join("memory/kiln-vmm/vm-9");
        std::fs::create_dir_all(&cgroup).unwrap();
        std::fs::write(cgroup.join("cgroup.procs"), procs).unwrap();
        std::fs::create_dir_all(root.join("base/kiln-vmm/vm-9/root")).unwrap();
        let hs = vec![Hierarchy {
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
        (root, hs, args)
    }

    #[test]
    fn kernel_threads_alone_are_waited_for_and_the_cleanup_goes_on_when_they_leave() {
        let (root, hs, args) = jail_with("kthread-leaves", "150\n");
        let procs = root.join("memory/kiln-vmm/vm-9/cgroup.procs");
        let leaver = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::write(procs, "").unwrap();
        });
        let removed = cleanup(&args, &hs, &TREE, &Table, Duration::from_secs(30)).unwrap();
        leaver.join().unwrap();
        assert_eq!(
            removed,
            [
                root.join("base/kiln-vmm/vm-9"),
                root.join("memory/kiln-vmm/vm-9")
            ]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn kernel_threads_that_stay_are_named_and_a_user_process_refuses_at_once() {
        let (root, hs, args) = jail_with("kthread-stays", "150\n");
        let grace = Duration::from_millis(50);
        let err = cleanup(&args, &hs, &TREE, &Table, grace).unwrap_err();
        let cgroup = root.join("memory/kiln-vmm/vm-9");
        assert_eq!(
            err.to_string(),
            format!(
                "cgroup {} still holds kernel thread(s) 150 (kvm-nx-lpage-recovery-150) after \
                 50ms; they end when the kernel frees the VM, so something still holds the VM (a \
                 process with its KVM file?)",
                cgroup.display()
            )
        );
        assert!(
            root.join("base/kiln-vmm/vm-9").exists(),
            "nothing is removed"
        );

        std::fs::write(cgroup.join("cgroup.procs"), "150\n4000\n").unwrap();
        let started = Instant::now();
        let err = cleanup(&args, &hs, &TREE, &Table, Duration::from_secs(30)).unwrap_err();
        assert!(
            matches!(&err, CleanupError::Busy { pids, .. } if pids == "150, 4000"),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a user process is not waited for"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn busy_cgroups_stop_everything_and_empty_ones_go_with_the_jail() {
        let (root, hs, args) = jail_with("busy", "4242\n4243\n");
        let cgroup = root.join("memory/kiln-vmm/vm-9");
        let jail = root.join("base/kiln-vmm/vm-9/root");
        std::fs::write(jail.join("api.sock"), b"").unwrap();
        let err = cleanup(&args, &hs, &TREE, &Table, Duration::ZERO).unwrap_err();
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
        let removed = cleanup(&wrong_version, &hs, &TREE, &Table, Duration::ZERO).unwrap();
        assert_eq!(
            removed,
            [root.join("base/kiln-vmm/vm-9")],
            "v1 cgroups are not looked at"
        );
        let removed = cleanup(&args, &hs, &TREE, &Table, Duration::ZERO).unwrap();
        assert_eq!(removed, std::slice::from_ref(&cgroup));
        assert!(
            cleanup(&args, &hs, &TREE, &Table, Duration::ZERO)
                .unwrap()
                .is_empty(),
            "nothing left"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
