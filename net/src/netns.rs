//! Network namespaces held by a file descriptor only: never bind-mounted under /run/netns, so a
//! namespace lives exactly as long as something uses it (this handle, a process inside, a socket
//! made inside) and vanishes with its interfaces and rules when the last of them goes, also when
//! the owner is killed.
//!
//! Work that must happen inside a namespace (creating links, sockets, running `nft`) runs on a
//! short-lived thread that enters it ([`NetNs::run`]): a namespace is per thread, and whatever
//! that thread creates or starts stays in the namespace.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// Why a namespace could not be made or entered.
#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    /// unshare(CLONE_NEWNET) failed.
    #[error("cannot create a network namespace: {0}{hint}", hint = cap_hint(.0))]
    Create(io::Error),
    /// The namespace file could not be opened.
    #[error("cannot open {path}: {err}")]
    Open {
        /// The path.
        path: String,
        /// Why.
        err: io::Error,
    },
    /// setns failed.
    #[error("cannot enter a network namespace: {0}{hint}", hint = cap_hint(.0))]
    Enter(io::Error),
    /// The helper thread could not be started or died.
    #[error("network namespace helper thread: {0}")]
    Thread(String),
}

fn cap_hint(e: &io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EPERM) {
        " (network sandboxes need root, or CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    } else {
        ""
    }
}

/// A network namespace.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
}

const THREAD_SELF_NS: &str = "/proc/thread-self/ns/net";

fn open(path: &str) -> Result<OwnedFd, NetNsError> {
    File::open(path)
        .map(OwnedFd::from)
        .map_err(|err| NetNsError::Open {
            path: path.into(),
            err,
        })
}

impl NetNs {
    /// A new, empty namespace (only `lo`, down).
    pub fn new() -> Result<NetNs, NetNsError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: unshare with a constant flag; it changes only this thread's namespace,
                // and this thread ends right after.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
                    return Err(NetNsError::Create(io::Error::last_os_error()));
                }
                Ok(NetNs {
                    fd: open(THREAD_SELF_NS)?,
                })
            })
            .join()
            .map_err(|_| NetNsError::Thread("it panicked".into()))?
        })
    }

    /// The namespace the calling thread is in (for a process, the one it started in).
    pub fn current() -> Result<NetNs, NetNsError> {
        Ok(NetNs {
            fd: open(THREAD_SELF_NS)?,
        })
    }

    /// The namespace of process `pid` (`/proc/<pid>/ns/net`): how a restarted owner finds the
    /// namespace of a VMM it adopts, which the VMM alone has kept alive.
    pub fn of_process(pid: u32) -> Result<NetNs, NetNsError> {
        Ok(NetNs {
            fd: open(&format!("/proc/{pid}/ns/net"))?,
        })
    }

    /// Another handle to the same namespace.
    pub fn try_clone(&self) -> Result<NetNs, NetNsError> {
        self.fd
            .try_clone()
            .map(|fd| NetNs { fd })
            .map_err(|e| NetNsError::Thread(format!("cannot duplicate the namespace handle: {e}")))
    }

    /// Moves the calling thread into this namespace (for threads that stay there, like a
    /// runtime's workers). Also safe between fork and exec: it is one system call.
    pub fn enter(&self) -> io::Result<()> {
        enter_raw(self.fd.as_raw_fd())
    }

    /// Runs `f` on a new thread inside this namespace and returns what it returned.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R, NetNsError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter().map_err(NetNsError::Enter)?;
                Ok(f())
            })
            .join()
            .map_err(|_| NetNsError::Thread("the work it ran panicked".into()))?
        })
    }

    /// The namespace's inode, which names it in `/proc/*/ns/net` links (`net:[INODE]`).
    pub fn inode(&self) -> io::Result<u64> {
        // SAFETY: stat is plain data; fstat fills it from a valid descriptor.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.st_ino)
    }
}

/// `setns(fd, CLONE_NEWNET)`: async-signal-safe, for `pre_exec`.
pub fn enter_raw(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: setns on a descriptor the caller keeps open for the call; it changes only the
    // calling thread's network namespace.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for NetNs {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no arguments and no failure.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn a_new_namespace_is_its_own_and_work_runs_inside_it() {
        assert!(root(), "network namespace tests need root (CAP_SYS_ADMIN)");
        let here = NetNs::current().unwrap();
        let ns = NetNs::new().unwrap();
        assert_ne!(ns.inode().unwrap(), here.inode().unwrap());
        let inside = ns
            .run(|| NetNs::current().unwrap().inode().unwrap())
            .unwrap();
        assert_eq!(inside, ns.inode().unwrap());
        // The caller's thread is where it was.
        assert_eq!(
            NetNs::current().unwrap().inode().unwrap(),
            here.inode().unwrap()
        );
    }

    #[test]
    fn a_process_namespace_is_found_by_its_pid() {
        let here = NetNs::current().unwrap();
        let mine = NetNs::of_process(std::process::id()).unwrap();
        assert_eq!(mine.inode().unwrap(), here.inode().unwrap());
        let e = NetNs::of_process(u32::MAX).unwrap_err().to_string();
        assert!(
            e.starts_with("cannot open /proc/4294967295/ns/net: "),
            "{e}"
        );
    }
}
