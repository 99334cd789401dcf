//! What the jailer inherits and must not pass on: open file descriptors beyond stdin, stdout and
//! stderr, and the environment. Also the standard streams' redirection for `--daemonize`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::sys::{check, check_long};

/// Why the inherited state could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// Descriptors above 2 could not be closed.
    #[error("cannot close inherited file descriptors: {0}")]
    CloseFds(io::Error),
    /// /dev/null cannot be opened for `--daemonize`.
    #[error("cannot open /dev/null for --daemonize: {0}")]
    DevNull(io::Error),
    /// `setsid` failed.
    #[error(
        "--daemonize: setsid failed: {0} (the jailer leads its process group; start it from a \
         process that does not make it a group leader)"
    )]
    Setsid(io::Error),
    /// A standard stream could not be pointed at /dev/null.
    #[error("--daemonize: cannot point fd {fd} at /dev/null: {err}")]
    Redirect {
        /// The stream's descriptor.
        fd: i32,
        /// What the OS said.
        err: io::Error,
    },
}

/// Closes every descriptor above stderr, so nothing the caller left open reaches the jail.
pub fn close_inherited_fds() -> Result<(), EnvError> {
    // SAFETY: close_range only closes descriptors; none above 2 is in use by this program yet.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    match check_long(ret) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => close_listed_fds(),
        Err(e) => Err(EnvError::CloseFds(e)),
    }
}

/// close_range's fallback for kernels before 5.9: whatever /proc/self/fd lists.
fn close_listed_fds() -> Result<(), EnvError> {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(EnvError::CloseFds)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: closing a descriptor this program does not use; the one read_dir held is
        // already closed, so EBADF is possible and harmless.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Empties the environment (the exec also passes an empty one).
pub fn clear_env() {
    for (key, _) in std::env::vars_os() {
        // SAFETY: the jailer is single-threaded, so nothing reads the environment concurrently.
        unsafe { std::env::remove_var(key) };
    }
}

/// Opens /dev/null while the host's /dev is still visible (the jail has none).
pub fn open_dev_null() -> Result<File, EnvError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(EnvError::DevNull)
}

/// `--daemonize`: a new session without a controlling terminal, standard streams to `dev_null`.
pub fn daemonize(dev_null: &File) -> Result<(), EnvError> {
    // SAFETY: setsid has no memory effects; failure is reported through errno.
    check(unsafe { libc::setsid() }).map_err(EnvError::Setsid)?;
    for fd in 0..=2 {
        // SAFETY: dup2 makes `fd` a copy of an open descriptor we own.
        check(unsafe { libc::dup2(dev_null.as_raw_fd(), fd) })
            .map_err(|err| EnvError::Redirect { fd, err })?;
    }
    Ok(())
}
