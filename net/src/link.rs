//! Links inside a VM's namespace: loopback up, the persistent TAP the VMM attaches (its MAC,
//! address and state), sysctls, and for `--allow-net` the veth pair to the uplink namespace.
//! Everything but the veth is done with ioctls, so a sandbox without `--allow-net` needs no
//! tools on the host; the veth is made with `ip` from iproute2. Each function must run on a
//! thread inside the namespace ([`crate::netns::NetNs::run`]).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

/// Why a link could not be set up; each names the interface and the step.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// An ioctl or file write failed.
    #[error("{what} {name}: {err}")]
    Step {
        /// The step.
        what: &'static str,
        /// The interface or file.
        name: String,
        /// Why.
        err: io::Error,
    },
    /// A tool could not be run or failed.
    #[error("{cmd} failed: {why}")]
    Tool {
        /// The command line.
        cmd: String,
        /// Its status and what it printed, or why it did not start.
        why: String,
    },
}

fn step(what: &'static str, name: &str) -> impl FnOnce(io::Error) -> LinkError {
    let name = name.to_string();
    move |err| LinkError::Step { what, name, err }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size and plain-data fields.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// A datagram socket for interface ioctls (in the calling thread's namespace).
fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    // SAFETY: the descriptor was just created and is owned here alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates the TAP `name` and makes it persistent, from a thread with a file table of its own.
///
/// A TAP without IFF_MULTI_QUEUE takes one attachment: while the descriptor that created it is
/// open anywhere, the VMM's TUNSETIFF fails with EBUSY. Opened in the shared table, a child that
/// another thread forks at that moment keeps a copy until it execs, so the VMM may find the TAP
/// busy; a descriptor in a private table is copied by no fork and is gone when the thread ends.
fn persist_tap(name: &str) -> Result<(), LinkError> {
    with_tap(name, "creating TAP", "creating", |tun| {
        // SAFETY: TUNSETPERSIST takes an int by value.
        check(unsafe { libc::ioctl(tun, libc::TUNSETPERSIST, 1 as libc::c_ulong) })
            .map_err(step("making persistent TAP", name))
    })
}

/// Gives the persistent TAP `name` to `uid`:`gid`: from then on only a process running as them
/// (a jailed VMM, without CAP_NET_ADMIN) or with CAP_NET_ADMIN may attach it; a TAP without an
/// owner is anyone's to attach who can open `/dev/net/tun`. Done from a thread with a file table
/// of its own, as [`create_tap`] is, so the descriptor used is gone before the VMM attaches.
pub fn set_tap_owner(name: &str, uid: u32, gid: u32) -> Result<(), LinkError> {
    with_tap(name, "attaching TAP", "giving away", |tun| {
        // SAFETY: TUNSETOWNER and TUNSETGROUP take an id by value.
        check(unsafe { libc::ioctl(tun, libc::TUNSETOWNER, uid as libc::c_ulong) })
            .map_err(step("setting the owner of TAP", name))?;
        // SAFETY: as above.
        check(unsafe { libc::ioctl(tun, libc::TUNSETGROUP, gid as libc::c_ulong) })
            .map_err(step("setting the group of TAP", name))
    })
}

/// Attaches (or creates) TAP `name` on a `/dev/net/tun` descriptor opened by a thread with a
/// file table of its own (see [`persist_tap`] for why) and runs `f` on it there; the descriptor
/// closes when the thread ends. `attach` names the TUNSETIFF step, `doing` the whole, in errors.
fn with_tap(
    name: &str,
    attach: &'static str,
    doing: &'static str,
    f: impl FnOnce(std::os::fd::RawFd) -> Result<(), LinkError> + Send,
) -> Result<(), LinkError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare with a constant flag gives this thread (and nothing else) a copy
            // of the file table; the thread ends right after.
            check(unsafe { libc::unshare(libc::CLONE_FILES) }).map_err(|err| LinkError::Step {
                what: "taking a private file table for",
                name: format!("{doing} {name}"),
                err,
            })?;
            let tun = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .map_err(step("opening /dev/net/tun for", name))?;
            let mut req = ifreq(name);
            req.ifr_ifru.ifru_flags =
                (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
            // SAFETY: TUNSETIFF reads the valid ifreq.
            check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &req) })
                .map_err(step(attach, name))?;
            f(tun.as_raw_fd())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(LinkError::Step {
                what: "the thread panicked while",
                name: format!("{doing} TAP {name}"),
                err: io::ErrorKind::Other.into(),
            })
        })
    })
}

/// Whether interface `name` exists (in the calling thread's namespace).
pub fn exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads the valid NUL-terminated name.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// The IPv4 address of `name`.
pub fn address(name: &str) -> Result<Ipv4Addr, LinkError> {
    let s = ctl_socket().map_err(step("opening a socket for", name))?;
    let mut req = ifreq(name);
    // SAFETY: the ioctl fills the valid ifreq.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFADDR, &mut req) })
        .map_err(step("reading the address of", name))?;
    // SAFETY: SIOCGIFADDR filled the addr member with a sockaddr_in, of the same size.
    let sin: libc::sockaddr_in = unsafe { std::mem::transmute(req.ifr_ifru.ifru_addr) };
    Ok(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
}

/// Sets IFF_UP on `name`.
pub fn up(name: &str) -> Result<(), LinkError> {
    let s = ctl_socket().map_err(step("opening a socket for", name))?;
    let mut req = ifreq(name);
    // SAFETY: the ioctl fills the valid ifreq.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })
        .map_err(step("reading the flags of", name))?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: the ioctl reads the valid ifreq.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })
        .map_err(step("bringing up", name))
}

/// Gives `name` the address `ip/prefix`.
pub fn set_address(name: &str, ip: Ipv4Addr, prefix: u8) -> Result<(), LinkError> {
    let s = ctl_socket().map_err(step("opening a socket for", name))?;
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_addr = sockaddr_in(ip);
    // SAFETY: the ioctl reads the valid ifreq.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFADDR, &req) })
        .map_err(step("setting the address of", name))?;
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix))));
    // SAFETY: the ioctl reads the valid ifreq.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFNETMASK, &req) })
        .map_err(step("setting the netmask of", name))
}

/// Makes the persistent TAP `name` with MAC `mac` (the VMM attaches it later; it goes away with
/// the namespace).
pub fn create_tap(name: &str, mac: [u8; 6]) -> Result<(), LinkError> {
    persist_tap(name)?;
    let s = ctl_socket().map_err(step("opening a socket for", name))?;
    let mut req = ifreq(name);
    // SAFETY: sockaddr is plain data; the MAC goes into its data bytes.
    let mut hw: libc::sockaddr = unsafe { std::mem::zeroed() };
    hw.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in hw.sa_data.iter_mut().zip(mac) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = hw;
    // SAFETY: the ioctl reads the valid ifreq.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFHWADDR, &req) })
        .map_err(step("setting the MAC address of", name))
}

/// Routes everything not on a link out of `name` (no gateway).
pub fn default_route_dev(name: &str) -> Result<(), LinkError> {
    let s = ctl_socket().map_err(step("opening a socket for", name))?;
    let dev = std::ffi::CString::new(name).map_err(|_| LinkError::Step {
        what: "naming",
        name: name.into(),
        err: io::ErrorKind::InvalidInput.into(),
    })?;
    // SAFETY: rtentry is plain data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_flags = libc::RTF_UP;
    rt.rt_dev = dev.as_ptr().cast_mut();
    // SAFETY: the ioctl reads the valid rtentry and the device name, which outlives the call.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCADDRT, &rt) })
        .map_err(step("adding a default route out of", name))
}

/// Writes `value` to `/proc/sys/<path>` (for the calling thread's namespace).
pub fn sysctl(path: &str, value: &str) -> Result<(), LinkError> {
    let full = format!("/proc/sys/{path}");
    std::fs::write(&full, value).map_err(step("writing", &full))
}

/// Runs `ip ARGS` (from iproute2); the caller's thread decides the namespace.
pub fn ip(args: &[&str]) -> Result<(), LinkError> {
    let cmd = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| LinkError::Tool {
            cmd: cmd.clone(),
            why: if e.kind() == io::ErrorKind::NotFound {
                "ip is not installed (--allow-net needs iproute2)".into()
            } else {
                e.to_string()
            },
        })?;
    if !out.status.success() {
        return Err(LinkError::Tool {
            cmd,
            why: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::NetNs;

    /// Attaches TAP `name` from a child running as `uid` with no capabilities, in the calling
    /// thread's namespace: the errno it failed with, if it did.
    fn attach_as(name: &str, uid: u32) -> Option<i32> {
        let path = c"/dev/net/tun";
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: the child makes only async-signal-safe calls (setgid, setuid, open, ioctl,
        // _exit) on memory prepared before the fork, and exits without returning.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: as above.
            unsafe {
                // Opened first, as the jailer hands a VMM its /dev/net/tun: the attach is what
                // is checked against the TAP's owner.
                let fd = libc::open(path.as_ptr(), libc::O_RDWR);
                if fd < 0 {
                    libc::_exit(201);
                }
                if libc::setgid(uid) < 0 || libc::setuid(uid) < 0 {
                    libc::_exit(200);
                }
                if libc::ioctl(fd, libc::TUNSETIFF, &req) < 0 {
                    libc::_exit(*libc::__errno_location());
                }
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        match libc::WEXITSTATUS(status) {
            0 => None,
            e => Some(e),
        }
    }

    #[test]
    fn a_tap_gets_its_mac_address_and_comes_up() {
        let ns = NetNs::new().expect("needs root");
        ns.run(|| {
            up("lo").unwrap();
            create_tap("kiln0", [6, 0, 0xac, 0x10, 0, 1]).unwrap();
            set_address("kiln0", Ipv4Addr::new(172, 16, 0, 1), 30).unwrap();
            up("kiln0").unwrap();
            // What the kernel now reports for it.
            let s = ctl_socket().unwrap();
            let mut req = ifreq("kiln0");
            // SAFETY: the ioctl fills the valid ifreq.
            check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) }).unwrap();
            // SAFETY: SIOCGIFHWADDR filled the hwaddr member.
            let mac: Vec<u8> = unsafe {
                req.ifr_ifru.ifru_hwaddr.sa_data[..6]
                    .iter()
                    .map(|b| *b as u8)
                    .collect()
            };
            assert_eq!(mac, [6, 0, 0xac, 0x10, 0, 1]);
            let mut req = ifreq("kiln0");
            // SAFETY: the ioctl fills the valid ifreq.
            check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFADDR, &mut req) }).unwrap();
            // SAFETY: SIOCGIFADDR filled the addr member with a sockaddr_in.
            let sin: libc::sockaddr_in = unsafe { std::mem::transmute(req.ifr_ifru.ifru_addr) };
            assert_eq!(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                Ipv4Addr::new(172, 16, 0, 1)
            );
            assert_eq!(address("kiln0").unwrap(), Ipv4Addr::new(172, 16, 0, 1));
            assert!(exists("kiln0") && !exists("kiln9"));
            // Given to an unprivileged uid, the TAP is that uid's to attach and no other's.
            set_tap_owner("kiln0", 100_123, 100_123).unwrap();
            assert_eq!(attach_as("kiln0", 100_124), Some(libc::EPERM));
            assert_eq!(attach_as("kiln0", 100_123), None);
            let e = up("kiln9").unwrap_err();
            assert!(
                e.to_string().starts_with("reading the flags of kiln9: "),
                "{e}"
            );
        })
        .unwrap();
    }

    /// A TAP attaches right after it is made even while other threads start processes (whose
    /// children, between fork and exec, copy the file table of the process).
    #[test]
    fn a_new_tap_is_free_to_attach_while_other_threads_fork() {
        let ns = NetNs::new().expect("needs root");
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = Command::new("true").status();
                }
            });
            let busy = ns
                .run(|| {
                    (0..300)
                        .filter(|i| {
                            let name = format!("kr{i}");
                            create_tap(&name, [6, 0, 0xac, 0x10, 0, 2]).unwrap();
                            let tun = std::fs::OpenOptions::new()
                                .read(true)
                                .write(true)
                                .open("/dev/net/tun")
                                .unwrap();
                            let mut req = ifreq(&name);
                            req.ifr_ifru.ifru_flags =
                                (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)
                                    as libc::c_short;
                            // SAFETY: TUNSETIFF reads the valid ifreq.
                            let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &req) };
                            rc < 0
                        })
                        .count()
                })
                .unwrap();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(busy, 0, "TAPs found busy right after they were made");
        });
    }
}
