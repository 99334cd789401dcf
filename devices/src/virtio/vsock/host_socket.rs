//! The host side of vsock connections: connecting to a host listener without blocking the event
//! loop, and keeping the event loop's registration of a host socket in step with what its
//! connection needs.

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use event_manager::EventSet;

use super::muxer::Poller;

/// Brings `fd`'s registration from `registered` to `want`; false if the event loop refused.
pub(super) fn reconcile(
    poller: &mut dyn Poller,
    fd: RawFd,
    registered: &mut Option<EventSet>,
    want: Option<EventSet>,
) -> bool {
    let ok = match (*registered, want) {
        (None, Some(w)) => poller.add(fd, w),
        (Some(r), Some(w)) if r != w => poller.modify(fd, w),
        (Some(r), None) => {
            poller.remove(fd, r);
            true
        }
        _ => return true,
    };
    if ok {
        *registered = want;
    }
    ok
}

/// Connects to the Unix stream socket at `path` without blocking: a listener whose backlog is
/// full (one that does not accept) fails with `WouldBlock` instead of stalling the event loop.
pub(super) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data, for which all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created and owned by nothing else.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let sa = std::ptr::from_ref(&addr).cast::<libc::sockaddr>();
    // SAFETY: `sa` points to a live sockaddr_un of at least `len` bytes (the path and its NUL).
    let ret = unsafe { libc::connect(fd, sa, len as libc::socklen_t) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}
