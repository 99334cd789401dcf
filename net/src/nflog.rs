//! Reports what the packet filter dropped: the VM's table logs each refused packet (rate-limited)
//! to NFLOG group [`crate::nft::LOG_GROUP`] with a prefix saying which rule, and this reader, a
//! netlink socket made inside the VM's namespace (NFLOG groups are per namespace), turns each into
//! a [`crate::refusal::Refusal`] naming the protocol and the destination. It runs on a thread of
//! its own, stopped when dropped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::constants::AF_INET;
use netlink_packet_netfilter::nflog::nlas::config::{ConfigCmd, ConfigMode};
use netlink_packet_netfilter::nflog::nlas::packet::PacketNla;
use netlink_packet_netfilter::nflog::{NfLogMessage, config_request};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner};
use netlink_sys::Socket;
use netlink_sys::constants::NETLINK_NETFILTER;

use crate::netns::{NetNs, NetNsError};
use crate::nft::LOG_GROUP;
use crate::policy::refused_range;
use crate::refusal::Refusals;

/// Bytes of each logged packet copied to the reader: the IP and transport headers.
const COPY_RANGE: u32 = 128;

/// Why the reader could not start.
#[derive(Debug, thiserror::Error)]
pub enum NflogError {
    /// The namespace could not be entered.
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    /// The netlink socket could not be set up.
    #[error("NFLOG group {LOG_GROUP}: {0}")]
    Socket(String),
}

/// A running reader.
pub struct NflogReader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn send_config(
    sock: &Socket,
    group: u16,
    nlas: Vec<netlink_packet_netfilter::nflog::nlas::config::ConfigNla>,
) -> Result<(), String> {
    let msg = config_request(AF_INET, group, nlas);
    let mut buf = vec![0; msg.header.length as usize];
    msg.serialize(&mut buf[..]);
    sock.send(&buf, 0)
        .map_err(|e| format!("sending a config request: {e}"))?;
    let mut reply = vec![0u8; 4096];
    let n = sock
        .recv(&mut &mut reply[..], 0)
        .map_err(|e| format!("reading the config answer: {e}"))?;
    match <NetlinkMessage<NetfilterMessage>>::deserialize(&reply[..n]) {
        Ok(NetlinkMessage {
            payload: NetlinkPayload::Error(e),
            ..
        }) if e.code.is_some() => Err(format!("the kernel refused the config: {e:?}")),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("unreadable config answer: {e}")),
    }
}

/// A netlink socket bound to NFLOG group [`LOG_GROUP`], made in the calling thread's namespace.
fn open() -> Result<Socket, String> {
    let mut sock = Socket::new(NETLINK_NETFILTER)
        .map_err(|e| format!("cannot open a netfilter netlink socket: {e}"))?;
    sock.bind_auto()
        .map_err(|e| format!("cannot bind it: {e}"))?;
    send_config(&sock, 0, vec![ConfigCmd::PfBind.into()])?;
    send_config(
        &sock,
        LOG_GROUP,
        vec![
            ConfigCmd::Bind.into(),
            ConfigMode::new_packet(COPY_RANGE).into(),
        ],
    )?;
    // Wakes the reader now and then to see whether it should stop.
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: a valid socket and a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(format!(
            "cannot set a receive timeout: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(sock)
}

/// What a logged packet was: protocol, destination, and the destination address.
pub fn describe(payload: &[u8]) -> Option<(&'static str, String, IpAddr)> {
    let version = payload.first()? >> 4;
    let (proto, dst, l4): (u8, IpAddr, &[u8]) = match version {
        4 => {
            let ihl = usize::from(payload[0] & 0xf) * 4;
            let dst: [u8; 4] = payload.get(16..20)?.try_into().ok()?;
            (
                *payload.get(9)?,
                IpAddr::V4(Ipv4Addr::from(dst)),
                payload.get(ihl..).unwrap_or(&[]),
            )
        }
        6 => {
            let dst: [u8; 16] = payload.get(24..40)?.try_into().ok()?;
            (
                *payload.get(6)?,
                IpAddr::V6(Ipv6Addr::from(dst)),
                payload.get(40..).unwrap_or(&[]),
            )
        }
        _ => return None,
    };
    let port = || l4.get(2..4).map(|p| u16::from_be_bytes([p[0], p[1]]));
    let shown = |port: Option<u16>| match (dst, port) {
        (IpAddr::V4(a), Some(p)) => format!("{a}:{p}"),
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, None) => a.to_string(),
    };
    Some(match proto {
        6 => ("tcp", shown(port()), dst),
        17 => ("udp", shown(port()), dst),
        1 | 58 => ("icmp", shown(None), dst),
        _ => ("ip", shown(None), dst),
    })
}

/// Why the rule with `prefix` dropped a packet to `dst`.
fn reason(prefix: &str, proto: &str, dst: IpAddr) -> String {
    match prefix {
        "range" => refused_range(dst).unwrap_or("a refused range").to_string(),
        "host" => "an address of the host itself".into(),
        "gateway" => "nothing but the resolver answers on the gateway".into(),
        "ipv6" => "IPv6 is not routed for sandboxes".into(),
        _ if proto == "udp" => "UDP other than DNS (QUIC among it) never leaves a sandbox".into(),
        _ => format!("{proto} never leaves a sandbox with a domain allowlist"),
    }
}

impl NflogReader {
    /// Starts reading the refusals logged in `ns`, reporting them to `refusals`.
    pub fn start(ns: &NetNs, refusals: Refusals) -> Result<NflogReader, NflogError> {
        let sock = ns.run(open)?.map_err(NflogError::Socket)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-net-nflog".into())
            .spawn(move || read_loop(sock, flag, refusals))
            .map_err(|e| NflogError::Socket(format!("cannot start the reader thread: {e}")))?;
        Ok(NflogReader {
            stop,
            thread: Some(thread),
        })
    }
}

fn read_loop(sock: Socket, stop: Arc<AtomicBool>, refusals: Refusals) {
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        let n = match sock.recv(&mut &mut buf[..], 0) {
            Ok(n) => n,
            Err(_) => continue, // the timeout, or a burst too large for the socket buffer
        };
        let mut at = 0;
        while at < n {
            let Ok(msg) = <NetlinkMessage<NetfilterMessage>>::deserialize(&buf[at..n]) else {
                break;
            };
            let len = msg.header.length as usize;
            if let NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::NfLog(NfLogMessage::Packet(nlas)),
                ..
            }) = &msg.payload
            {
                report(nlas, &refusals);
            }
            if len == 0 {
                break;
            }
            at += len.next_multiple_of(4);
        }
    }
}

fn report(nlas: &[PacketNla], refusals: &Refusals) {
    let mut prefix = String::new();
    let mut what = None;
    for nla in nlas {
        match nla {
            PacketNla::Prefix(p) => prefix = p.to_string_lossy().into_owned(),
            PacketNla::Payload(p) => what = describe(p),
            _ => {}
        }
    }
    if let Some((proto, dest, dst)) = what {
        let why = reason(&prefix, proto, dst);
        refusals.record(proto, None, Some(dest), why);
    }
}

impl Drop for NflogReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // It wakes within its receive timeout.
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_packets_are_described() {
        let mut udp = vec![
            0x45u8, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 172, 16, 0, 2, 1, 1, 1, 1,
        ];
        udp.extend_from_slice(&[0x30, 0x39, 0x01, 0xbb, 0, 8, 0, 0]);
        assert_eq!(
            describe(&udp),
            Some(("udp", "1.1.1.1:443".into(), "1.1.1.1".parse().unwrap()))
        );
        let mut icmp = udp.clone();
        icmp[9] = 1;
        assert_eq!(describe(&icmp).unwrap().1, "1.1.1.1");
        let mut v6 = vec![0x60u8, 0, 0, 0, 0, 8, 17, 64];
        v6.extend_from_slice(&[0; 16]);
        v6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0, 1, 0, 53, 0, 8, 0, 0]);
        assert_eq!(describe(&v6).unwrap().1, "[2001:db8::1]:53");
        assert_eq!(describe(&[0x45, 0, 0]), None, "truncated");
        assert_eq!(describe(&[]), None);
        assert_eq!(
            reason("range", "tcp", "169.254.169.254".parse().unwrap()),
            "the cloud metadata address 169.254.169.254"
        );
        assert_eq!(
            reason("egress", "udp", "1.1.1.1".parse().unwrap()),
            "UDP other than DNS (QUIC among it) never leaves a sandbox"
        );
    }
}
