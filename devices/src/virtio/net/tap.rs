//! The host side of a network interface: an existing TAP device, attached with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte vnet header, non-blocking. Frames go in and
//! out with `writev`/`readv` on I/O vectors over guest memory.
//!
//! The TAP must exist before the VMM attaches it (whoever sets up the host network makes it, with
//! its addresses and rules); attaching to a missing name is refused rather than creating a TAP
//! nobody configured. Tests stand a datagram socket pair in for the TAP: it keeps frame
//! boundaries the same way.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::HDR_LEN;

/// Where TAP devices are attached.
const TUN_DEVICE: &str = "/dev/net/tun";
/// Longest interface name (IFNAMSIZ less the NUL).
pub const MAX_NAME_LEN: usize = 15;

/// Why a TAP cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("host_dev_name {0:?} is not an interface name (1 to 15 bytes, no '/', spaces or NUL)")]
    BadName(String),
    /// No interface has that name (in this network namespace).
    #[error(
        "TAP {0} does not exist in this network namespace; create it first (ip tuntap add {0} mode tap)"
    )]
    Missing(String),
    /// /dev/net/tun cannot be opened.
    #[error("cannot open {TUN_DEVICE}: {0}")]
    OpenTun(io::Error),
    /// TUNSETIFF refused the interface.
    #[error("cannot attach TAP {name}: {err}{hint}")]
    Attach {
        /// The TAP.
        name: String,
        /// Why.
        err: io::Error,
        /// What usually causes that error.
        hint: &'static str,
    },
    /// An ioctl setting the TAP up failed.
    #[error("TAP {name}: {what} failed: {err}")]
    Ioctl {
        /// The TAP.
        name: String,
        /// Which ioctl.
        what: &'static str,
        /// Why.
        err: io::Error,
    },
}

/// What the descriptor is.
#[derive(Debug)]
enum Kind {
    /// A TAP attached through /dev/net/tun.
    Tap,
    /// One end of a datagram socket pair (tests).
    #[cfg(test)]
    Socket,
}

/// An attached TAP.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    kind: Kind,
    /// The `TUN_F_*` offloads last set.
    offload: u32,
}

/// Whether `name` can be an interface name: 1 to [`MAX_NAME_LEN`] bytes, not `.` or `..`, no
/// '/', whitespace or NUL.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
}

fn check_name(name: &str) -> Result<(), TapError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_string()))
    }
}

/// An `ifreq` naming `name` (checked to fit) with `flags`.
fn ifreq(name: &str, flags: libc::c_short) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags;
    req
}

impl Tap {
    /// Attaches the existing TAP `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        let cname = std::ffi::CString::new(name).map_err(|_| TapError::BadName(name.into()))?;
        // SAFETY: if_nametoindex reads the valid NUL-terminated name.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::Missing(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(TapError::OpenTun)?;
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        let req = ifreq(name, flags);
        // SAFETY: TUNSETIFF reads (and may write back the name into) the valid ifreq.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &req) } < 0 {
            let err = io::Error::last_os_error();
            let hint = match err.raw_os_error() {
                Some(libc::EPERM) => {
                    " (attaching needs CAP_NET_ADMIN, or the TAP owned by this user: ip tuntap add ... user UID)"
                }
                Some(libc::EBUSY) => " (another process has it attached)",
                Some(libc::EINVAL) => " (it exists but is not a TAP)",
                _ => "",
            };
            return Err(TapError::Attach {
                name: name.to_string(),
                err,
                hint,
            });
        }
        let hdr_len = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the valid pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(TapError::Ioctl {
                name: name.to_string(),
                what: "TUNSETVNETHDRSZ",
                err: io::Error::last_os_error(),
            });
        }
        let mut tap = Tap {
            file,
            name: name.to_string(),
            kind: Kind::Tap,
            offload: u32::MAX,
        };
        // A TAP attached before may still carry the offloads of its last user.
        tap.set_offload(0).map_err(|err| TapError::Ioctl {
            name: name.to_string(),
            what: "TUNSETOFFLOAD",
            err,
        })?;
        Ok(tap)
    }

    /// One end of a `SOCK_DGRAM` socket pair standing in for a TAP (frame boundaries are kept
    /// the same way; offloads are only recorded).
    #[cfg(test)]
    pub fn from_socket(sock: std::os::unix::net::UnixDatagram) -> Tap {
        sock.set_nonblocking(true).expect("non-blocking socket");
        let fd: std::os::fd::OwnedFd = sock.into();
        Tap {
            file: File::from(fd),
            name: "test-tap".into(),
            kind: Kind::Socket,
            offload: 0,
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `TUN_F_*` offloads last set.
    pub fn offload(&self) -> u32 {
        self.offload
    }

    /// Tells the TAP which offloads the guest takes on receive (`TUN_F_CSUM`, `TUN_F_TSO4`, ...):
    /// the host kernel then hands over frames with partial checksums and GSO frames of up to
    /// 64 KiB instead of finishing them itself.
    pub fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        if flags == self.offload {
            return Ok(());
        }
        match self.kind {
            Kind::Tap => {
                // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
                let rc = unsafe {
                    libc::ioctl(
                        self.file.as_raw_fd(),
                        libc::TUNSETOFFLOAD,
                        libc::c_ulong::from(flags),
                    )
                };
                if rc < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            #[cfg(test)]
            Kind::Socket => {}
        }
        self.offload = flags;
        Ok(())
    }

    /// Reads one frame (vnet header first) into `iov`; `WouldBlock` when none is waiting. Like
    /// the TAP, it returns the frame's whole length even when `iov` was too short for it.
    pub fn read_iov(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        #[cfg(test)]
        if let Kind::Socket = self.kind {
            return self.recv_truncating(iov);
        }
        let n = iov.len().min(super::MAX_IOVECS) as libc::c_int;
        // SAFETY: every iovec points into guest memory that stays mapped for the call (the caller
        // holds the slices they were made from); readv writes at most their lengths.
        let rc = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), n) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }

    /// A datagram read that reports the datagram's full length, as a TAP read does.
    #[cfg(test)]
    fn recv_truncating(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: msghdr is plain data; all-zero is valid before the fields are set.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr().cast_mut();
        msg.msg_iovlen = iov.len();
        // SAFETY: the iovecs point into memory valid for the call; recvmsg writes at most their
        // lengths and fills `msg`.
        let rc = unsafe { libc::recvmsg(self.file.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }

    /// Writes one frame (vnet header first) gathered from `iov`.
    pub fn write_iov(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let n = iov.len().min(super::MAX_IOVECS) as libc::c_int;
        // SAFETY: every iovec points into guest memory that stays mapped for the call; writev
        // only reads them.
        let rc = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), n) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_and_missing_names_are_refused_by_name() {
        for bad in ["", "a/b", "sixteen-chars-xx", "with space", "..", "nul\0"] {
            let e = Tap::open(bad).unwrap_err();
            assert!(matches!(e, TapError::BadName(_)), "{bad:?}: {e}");
        }
        let e = Tap::open("kiln-nosuch0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "TAP kiln-nosuch0 does not exist in this network namespace; create it first (ip tuntap add kiln-nosuch0 mode tap)"
        );
    }

    #[test]
    fn a_device_that_is_not_a_tap_is_refused() {
        // `lo` exists everywhere and is not a TAP: TUNSETIFF fails (EINVAL as root, EPERM
        // otherwise), and the error names it.
        let e = Tap::open("lo").unwrap_err();
        assert!(
            e.to_string().starts_with("cannot attach TAP lo: ")
                || matches!(e, TapError::OpenTun(_)),
            "{e}"
        );
    }
}
