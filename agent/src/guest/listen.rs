//! Where the agent listens: vsock (in a VM) or a Unix socket (for tests on the host).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use crate::link::Socket;
use crate::protocol::AGENT_PORT;

/// A listening address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// AF_VSOCK on this port, any CID.
    Vsock(u32),
    /// A Unix socket at this path (an old socket file there is replaced).
    Unix(PathBuf),
}

impl ListenAddr {
    /// Parses `vsock`, `vsock:PORT` or `unix:PATH`.
    pub fn parse(s: &str) -> Result<ListenAddr, String> {
        match s.split_once(':') {
            None if s == "vsock" => Ok(ListenAddr::Vsock(AGENT_PORT)),
            Some(("vsock", port)) => port
                .parse()
                .map(ListenAddr::Vsock)
                .map_err(|_| format!("vsock port {port:?} is not a number")),
            Some(("unix", path)) if !path.is_empty() => Ok(ListenAddr::Unix(path.into())),
            _ => Err(format!(
                "listen address {s:?} is not vsock, vsock:PORT or unix:PATH"
            )),
        }
    }
}

/// The only vsock peer the agent serves: the host (`VMADDR_CID_HOST`). A guest kernel with vsock
/// loopback would otherwise let any unprivileged guest user reach the root agent at CID 1 (or
/// the guest's own CID).
pub const HOST_CID: u32 = 2;

/// Whether a vsock connection from `cid` may be served.
pub fn vsock_peer_allowed(cid: u32) -> bool {
    cid == HOST_CID
}

/// A bound, listening socket.
pub struct Listener {
    fd: OwnedFd,
    vsock: bool,
}

impl Listener {
    /// Binds `addr`. A vsock bind is retried for a few seconds: the device may still be probing.
    pub fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Unix(path) => {
                let _ = std::fs::remove_file(path);
                Ok(Listener {
                    fd: UnixListener::bind(path)?.into(),
                    vsock: false,
                })
            }
            ListenAddr::Vsock(port) => {
                let end = Instant::now() + Duration::from_secs(5);
                loop {
                    match bind_vsock(*port) {
                        Ok(l) => return Ok(l),
                        Err(e) if Instant::now() < end && retryable(&e) => {
                            thread::sleep(Duration::from_millis(50));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// Waits for the next connection. On vsock, connections from anyone but the host are
    /// closed at once (and logged).
    pub fn accept(&self) -> io::Result<Socket> {
        loop {
            // SAFETY: sockaddr_vm is plain data; all-zero is a valid value to be overwritten.
            let mut peer: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
            // SAFETY: accept4 on our listening socket; the kernel writes at most `len` bytes of
            // the peer's address into `peer` (a Unix peer's address is cut to fit, unused).
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    (&mut peer as *mut libc::sockaddr_vm).cast(),
                    &mut len,
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a new descriptor that is ours alone.
                let socket = Socket::from_fd(unsafe { OwnedFd::from_raw_fd(fd) });
                if self.vsock && !vsock_peer_allowed(peer.svm_cid) {
                    crate::guest::log(format_args!(
                        "refused a vsock connection from CID {} port {}: only the host (CID \
                         {HOST_CID}) is served",
                        peer.svm_cid, peer.svm_port
                    ));
                    continue;
                }
                return Ok(socket);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted
                && e.raw_os_error() != Some(libc::ECONNABORTED)
            {
                return Err(e);
            }
        }
    }
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::ENODEV) | Some(libc::EADDRNOTAVAIL)
    )
}

fn bind_vsock(port: u32) -> io::Result<Listener> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is ours alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is valid before the fields are set.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: bind/listen on our socket with a valid sockaddr_vm of the size passed.
    unsafe {
        if libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        ) < 0
            || libc::listen(fd.as_raw_fd(), 64) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(Listener { fd, vsock: true })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(ListenAddr::parse("vsock"), Ok(ListenAddr::Vsock(1024)));
        assert_eq!(ListenAddr::parse("vsock:52"), Ok(ListenAddr::Vsock(52)));
        assert_eq!(
            ListenAddr::parse("unix:/tmp/a.sock"),
            Ok(ListenAddr::Unix("/tmp/a.sock".into()))
        );
        assert!(ListenAddr::parse("vsock:x").unwrap_err().contains("\"x\""));
        assert!(ListenAddr::parse("tcp:1").is_err());
        assert!(ListenAddr::parse("unix:").is_err());
    }

    #[test]
    fn only_the_host_cid_is_served_on_vsock() {
        assert!(vsock_peer_allowed(2));
        // Loopback, the hypervisor's own CID, the guest itself, "any".
        for cid in [0, 1, 3, 42, u32::MAX] {
            assert!(!vsock_peer_allowed(cid), "{cid}");
        }
    }
}
