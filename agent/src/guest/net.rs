//! Sets the guest's network up from what the host passed (`kiln.net=` at boot, `restored.net`
//! after a restore): eth0's address and netmask, the interface up, the default route through the
//! gateway, and `/etc/resolv.conf`. The steps use the classic `SIOCSIF*`/`SIOCADDRT` ioctls on a
//! datagram socket, which need nothing from the guest's userspace; each is safe to repeat, so a
//! clone whose snapshot was taken with the same settings ends up exactly where it was.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::protocol::net::{INTERFACE, Net};

/// Where name servers go.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size, and every bit pattern is valid for
    // sockaddr's plain fields.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

/// One step of the setup, named in its error.
fn step(what: &str, r: io::Result<()>) -> io::Result<()> {
    r.map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// Applies `net` to eth0 and `/etc/resolv.conf`. The error names the step that failed.
pub fn configure(net: &Net) -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    // SAFETY: the descriptor was just created and is owned here alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let s = sock.as_raw_fd();

    let mut req = ifreq(INTERFACE);
    req.ifr_ifru.ifru_addr = sockaddr(net.address);
    // SAFETY: the ioctl reads the valid ifreq.
    let rc = unsafe { libc::ioctl(s, libc::SIOCSIFADDR, &req) };
    step(
        &format!("setting {INTERFACE}'s address {}", net.address),
        check(rc),
    )?;
    let mut req = ifreq(INTERFACE);
    req.ifr_ifru.ifru_netmask = sockaddr(net.netmask());
    // SAFETY: the ioctl reads the valid ifreq.
    let rc = unsafe { libc::ioctl(s, libc::SIOCSIFNETMASK, &req) };
    step(
        &format!("setting {INTERFACE}'s netmask {}", net.netmask()),
        check(rc),
    )?;
    let mut req = ifreq(INTERFACE);
    // SAFETY: the ioctl fills the valid ifreq.
    let rc = unsafe { libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) };
    step(&format!("reading {INTERFACE}'s flags"), check(rc))?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union, which is read and updated here.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: the ioctl reads the valid ifreq.
    let rc = unsafe { libc::ioctl(s, libc::SIOCSIFFLAGS, &req) };
    step(&format!("bringing {INTERFACE} up"), check(rc))?;
    default_route(s, net.gateway)?;
    step(
        &format!("writing {RESOLV_CONF}"),
        write_resolv_conf(&net.dns),
    )
}

/// Replaces the default route with one through `gateway` on eth0.
fn default_route(s: libc::c_int, gateway: Ipv4Addr) -> io::Result<()> {
    let dev = CString::new(INTERFACE).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: rtentry is plain data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    // An old default route (from before a snapshot) goes first; none is fine.
    // SAFETY: the ioctl reads the valid rtentry.
    let _ = unsafe { libc::ioctl(s, libc::SIOCDELRT, &rt) };
    rt.rt_gateway = sockaddr(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    rt.rt_dev = dev.as_ptr().cast_mut();
    // SAFETY: the ioctl reads the valid rtentry and the NUL-terminated device name, which
    // outlives the call.
    let rc = unsafe { libc::ioctl(s, libc::SIOCADDRT, &rt) };
    match check(rc) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => step(&format!("adding the default route via {gateway}"), r),
    }
}

/// Writes `/etc/resolv.conf` through a temporary file and a rename.
fn write_resolv_conf(dns: &[Ipv4Addr]) -> io::Result<()> {
    let mut text = String::from("# Written by kiln-agent from the host's network settings.\n");
    for d in dns {
        text.push_str(&format!("nameserver {d}\n"));
    }
    let tmp = format!("{RESOLV_CONF}.kiln-tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, RESOLV_CONF)
}
