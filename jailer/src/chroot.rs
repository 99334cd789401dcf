//! Moving into the jail: a new mount namespace whose mounts are all private, the jail's root
//! bind-mounted on itself and made `/` with `pivot_root`, the old root detached, then the device
//! nodes the VMM needs created inside and given to uid:gid, and a procfs that shows the VMM only
//! itself ([`mount_proc`]).
//!
//! Where the host runs from its initial ramfs (the lab's L1 does), `pivot_root` is refused
//! (EINVAL): there the jail's mount is moved over `/` and chrooted into instead, as runc does
//! for the same case. The old root stays under it in this namespace, out of reach of a process
//! without CAP_SYS_CHROOT and CAP_SYS_ADMIN, which the jailed process never has.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, chown};
use std::path::{Path, PathBuf};

use crate::sys::{check, check_long, cstring};

/// Why the jail could not be entered or furnished.
#[derive(Debug, thiserror::Error)]
pub enum ChrootError {
    /// A mount-namespace call failed.
    #[error("{what} {}: {err}", path.display())]
    Mount {
        /// Which operation.
        what: &'static str,
        /// The path it was on.
        path: PathBuf,
        /// What the OS said.
        err: io::Error,
    },
    /// The host has no usable device node the jail needs.
    #[error("host device {}: {why}", path.display())]
    HostDevice {
        /// The host's node.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A node or directory could not be made in the jail.
    #[error("cannot {what} {} in the jail: {err}", path.display())]
    Node {
        /// Which operation.
        what: &'static str,
        /// The path inside the jail.
        path: PathBuf,
        /// What the OS said.
        err: io::Error,
    },
}

/// A character device to recreate in the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    /// Its path, the same on the host and in the jail.
    pub path: &'static str,
    /// Major and minor number.
    pub rdev: libc::dev_t,
}

/// The devices the VMM opens, with Linux's fixed numbers (Documentation/admin-guide/devices.txt)
/// for hosts that have no node, and whether one is required.
const DEVICES: &[(&str, u32, u32, bool)] = &[
    ("/dev/kvm", 10, 232, true),
    ("/dev/net/tun", 10, 200, false),
    ("/dev/urandom", 1, 9, false),
];

/// The host's numbers for the jail's devices, read while the host's /dev is visible. `/dev/kvm`
/// must exist; the others fall back to Linux's fixed numbers (the lab's L1 has no tun node until
/// the module loads, and opening the jail's node loads it).
pub fn host_devices() -> Result<Vec<Device>, ChrootError> {
    let mut devices = Vec::new();
    for &(path, major, minor, required) in DEVICES {
        let rdev = match std::fs::metadata(path) {
            Ok(meta) if meta.file_type().is_char_device() => meta.rdev(),
            Ok(_) => {
                return Err(ChrootError::HostDevice {
                    path: path.into(),
                    why: "is not a character device".into(),
                });
            }
            Err(e) if required || e.kind() != io::ErrorKind::NotFound => {
                return Err(ChrootError::HostDevice {
                    path: path.into(),
                    why: e.to_string(),
                });
            }
            Err(_) => libc::makedev(major, minor),
        };
        devices.push(Device { path, rdev });
    }
    Ok(devices)
}

fn mount_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ChrootError {
    let path = path.to_path_buf();
    move |err| ChrootError::Mount { what, path, err }
}

/// Makes `root` this process's `/` in a new mount namespace.
pub fn enter(root: &Path) -> Result<(), ChrootError> {
    let slash = CString::from(c"/");
    let dot = CString::from(c".");
    let c_root = cstring(root).map_err(mount_err("bad path", root))?;
    // SAFETY: unshare has no memory effects.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) })
        .map_err(mount_err("cannot unshare the mount namespace for", root))?;
    // Nothing mounted or unmounted from here on propagates back to the host.
    // SAFETY: all pointers are NUL-terminated strings or null, as mount(2) allows.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_PRIVATE | libc::MS_REC,
            std::ptr::null(),
        )
    })
    .map_err(mount_err(
        "cannot make mounts private under",
        Path::new("/"),
    ))?;
    // pivot_root needs the new root to be a mount point.
    // SAFETY: as above.
    check(unsafe {
        libc::mount(
            c_root.as_ptr(),
            c_root.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    })
    .map_err(mount_err("cannot bind-mount", root))?;
    std::env::set_current_dir(root).map_err(mount_err("cannot enter", root))?;
    // pivot_root(".", "."): the old root is stacked on top of the new one at "/", then detached.
    // SAFETY: both arguments are NUL-terminated strings.
    let pivoted =
        check_long(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) });
    match pivoted {
        Ok(_) => {
            // SAFETY: "." is NUL-terminated; MNT_DETACH takes the old root away lazily.
            check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) })
                .map_err(mount_err("cannot detach the old root from", root))?;
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // The host's root is the initial ramfs, which cannot be pivoted away from.
            // SAFETY: as for the mounts above.
            check(unsafe {
                libc::mount(
                    dot.as_ptr(),
                    slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_MOVE,
                    std::ptr::null(),
                )
            })
            .map_err(mount_err(
                "cannot move the jail over / (pivot_root: EINVAL):",
                root,
            ))?;
            // SAFETY: "." is NUL-terminated.
            check(unsafe { libc::chroot(dot.as_ptr()) })
                .map_err(mount_err("cannot chroot into", root))?;
        }
        Err(e) => return Err(mount_err("cannot pivot_root into", root)(e)),
    }
    std::env::set_current_dir("/").map_err(mount_err("cannot enter", Path::new("/")))
}

/// Creates `devices` in the (entered) jail, mode 0600, owned by uid:gid.
pub fn make_devices(devices: &[Device], uid: u32, gid: u32) -> Result<(), ChrootError> {
    for dev in devices {
        let path = Path::new(dev.path);
        let node = |what, err| ChrootError::Node {
            what,
            path: path.to_path_buf(),
            err,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| node("create the folder of", e))?;
        }
        let c = cstring(path).map_err(|e| node("name", e))?;
        // SAFETY: `c` is NUL-terminated; mknod creates one node and touches no memory.
        check(unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, dev.rdev) })
            .map_err(|e| node("mknod", e))?;
        // The umask may have taken bits off; the mode is set exactly.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| node("chmod", e))?;
        chown(path, Some(uid), Some(gid)).map_err(|e| node("chown", e))?;
    }
    Ok(())
}

/// The jail's own procfs: mounted at `/proc` in the (entered) jail, showing only process
/// directories (`subset=pid`: no `/proc/sys`, no `/proc/kcore`, no host-wide files) and of those
/// only the processes the viewer may trace (`hidepid=invisible`): for the VMM, running as the
/// jail's uid, itself. kiln-vmm reads its own page map there (`/proc/self/pagemap`: which guest
/// pages it has touched, for working sets and free-page snapshots). Linux 5.8 or later.
pub const PROC_OPTIONS: &str = "hidepid=invisible,subset=pid";

/// Mounts the jail's procfs ([`PROC_OPTIONS`]) at `/proc`, no setuid, devices or exec.
pub fn mount_proc() -> Result<(), ChrootError> {
    let path = Path::new("/proc");
    std::fs::create_dir(path)
        .or_else(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => Ok(()),
            _ => Err(e),
        })
        .map_err(|err| ChrootError::Node {
            what: "create",
            path: path.into(),
            err,
        })?;
    let proc = CString::from(c"proc");
    let target = CString::from(c"/proc");
    let options =
        CString::new(PROC_OPTIONS).map_err(|e| mount_err("bad options for", path)(e.into()))?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mount(
            proc.as_ptr(),
            target.as_ptr(),
            proc.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            options.as_ptr().cast(),
        )
    })
    .map_err(|err| ChrootError::Mount {
        what: "cannot mount a procfs (hidepid=invisible,subset=pid: Linux 5.8 or later) at",
        path: path.into(),
        err,
    })?;
    Ok(())
}

/// Checks, before privileges go, that `files` are in the jail as regular files, so the exec
/// cannot fail for want of them once nothing can be cleaned up any more.
pub fn check_present(files: &[PathBuf]) -> Result<(), ChrootError> {
    for f in files {
        match std::fs::metadata(f) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(ChrootError::Node {
                    what: "find a regular file at",
                    path: f.clone(),
                    err: io::Error::from(io::ErrorKind::InvalidInput),
                });
            }
            Err(err) => {
                return Err(ChrootError::Node {
                    what: "find",
                    path: f.clone(),
                    err,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_numbers_match_linux() {
        assert_eq!(libc::major(libc::makedev(10, 232)), 10);
        let kvm = DEVICES.iter().find(|d| d.0 == "/dev/kvm").unwrap();
        assert_eq!((kvm.1, kvm.2, kvm.3), (10, 232, true));
        if let Ok(devs) = host_devices() {
            let urandom = devs.iter().find(|d| d.path == "/dev/urandom").unwrap();
            assert_eq!(
                (libc::major(urandom.rdev), libc::minor(urandom.rdev)),
                (1, 9)
            );
        }
    }
}
