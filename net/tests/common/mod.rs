#![allow(dead_code)] // each test binary uses a different part
//! A small internet in network namespaces, and a pretend guest: everything a sandbox test needs
//! without a VM and without touching the host's own interfaces.
//!
//! - `edge` plays the host: the sandbox's uplink, with a route to the internet and an address of
//!   its own (192.0.2.1, which sandboxes must not reach).
//! - `inet` holds the servers, on addresses that are not the host's: a name server at
//!   198.51.100.53, web servers for `allowed.test` (203.0.113.10) and `blocked.test`
//!   (203.0.113.20), each answering HTTP on 80, a TLS stand-in on 443 that names the SNI it got,
//!   a banner on 22, and a UDP echo on 4433.
//! - `Guest` is a namespace whose `eth0` TAP is bridged frame by frame to the sandbox's TAP, as
//!   kiln-vmm and a guest kernel would be, with the guest's address and routes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use kiln_net::addr::{GATEWAY_IP, GUEST_IP, GUEST_MAC, PREFIX, TAP_NAME};
use kiln_net::link;
use kiln_net::netns::NetNs;

pub const EDGE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
pub const ALLOWED_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const BLOCKED_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);

/// The namespaces of the small internet.
pub struct World {
    pub edge: NetNs,
    pub inet: NetNs,
}

fn ip(args: &[&str]) {
    link::ip(args).unwrap_or_else(|e| panic!("{e}"));
}

/// Answers A queries from `zone`, NXDOMAIN otherwise.
fn dns_server(sock: UdpSocket, zone: HashMap<&'static str, Ipv4Addr>) {
    let mut buf = [0u8; 4096];
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        let Ok(q) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let mut r = Message::new();
        r.set_id(q.id()).set_message_type(MessageType::Response);
        let question = q.queries()[0].clone();
        r.add_query(question.clone());
        let name = question
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        match zone.get(name.as_str()) {
            Some(ip) if question.query_type() == RecordType::A => {
                r.add_answer(Record::from_rdata(
                    question.name().clone(),
                    60,
                    RData::A(A(*ip)),
                ));
            }
            Some(_) => {}
            None => {
                r.set_response_code(ResponseCode::NXDomain);
            }
        }
        let _ = sock.send_to(&r.to_vec().unwrap(), from);
    }
}

/// Serves every connection of `l` on its own thread with `f`.
fn tcp_server(l: TcpListener, f: fn(std::net::TcpStream, Ipv4Addr)) {
    let here = match l.local_addr().unwrap() {
        SocketAddr::V4(a) => *a.ip(),
        _ => unreachable!(),
    };
    thread::spawn(move || {
        for c in l.incoming().flatten() {
            thread::spawn(move || f(c, here));
        }
    });
}

fn http(mut c: std::net::TcpStream, here: Ipv4Addr) {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        while let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let host = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("Host: ")
                        .or_else(|| l.strip_prefix("host: "))
                })
                .unwrap_or("-")
                .to_string();
            let body = format!("hello from {here} host={host}");
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if c.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
        match c.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn tls_standin(mut c: std::net::TcpStream, _here: Ipv4Addr) {
    let mut buf = vec![0u8; 4096];
    let Ok(n) = c.read(&mut buf) else { return };
    let sni = match kiln_net::sni::parse(&buf[..n]) {
        kiln_net::sni::Hello::Parsed(Some(s)) => s,
        _ => "-".into(),
    };
    let _ = c.write_all(format!("TLS-OK {sni}\n").as_bytes());
}

fn banner(mut c: std::net::TcpStream, _here: Ipv4Addr) {
    let _ = c.write_all(b"SSH-2.0-fake\r\n");
}

/// Builds the small internet and starts its servers.
pub fn world() -> World {
    // SAFETY: geteuid has no arguments and no failure.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "sandbox tests make namespaces and TAPs: run them as root"
    );
    let edge = NetNs::new().unwrap();
    let inet = NetNs::new().unwrap();
    let inet_path = format!("/proc/{}/fd/{}", std::process::id(), inet.as_raw_fd());
    edge.run(|| {
        link::up("lo").unwrap();
        ip(&[
            "link", "add", "e0", "type", "veth", "peer", "name", "i0", "netns", &inet_path,
        ]);
        ip(&["addr", "add", "192.0.2.1/30", "dev", "e0"]);
        ip(&["link", "set", "e0", "up"]);
        ip(&["route", "add", "203.0.113.0/24", "via", "192.0.2.2"]);
        ip(&["route", "add", "198.51.100.0/24", "via", "192.0.2.2"]);
    })
    .unwrap();
    inet.run(|| {
        link::up("lo").unwrap();
        ip(&["addr", "add", "192.0.2.2/30", "dev", "i0"]);
        ip(&["link", "set", "i0", "up"]);
        for a in ["203.0.113.10/32", "203.0.113.20/32", "198.51.100.53/32"] {
            ip(&["addr", "add", a, "dev", "lo"]);
        }
        ip(&["route", "add", "default", "via", "192.0.2.1"]);
        let zone = HashMap::from([
            ("allowed.test", ALLOWED_IP),
            ("www.allowed.test", ALLOWED_IP),
            ("blocked.test", BLOCKED_IP),
            ("private.allowed.test", Ipv4Addr::new(10, 9, 9, 9)),
        ]);
        let dns = UdpSocket::bind((DNS_IP, 53)).unwrap();
        thread::spawn(move || dns_server(dns, zone));
        for host in [ALLOWED_IP, BLOCKED_IP] {
            tcp_server(TcpListener::bind((host, 80)).unwrap(), http);
            tcp_server(TcpListener::bind((host, 443)).unwrap(), tls_standin);
            tcp_server(TcpListener::bind((host, 22)).unwrap(), banner);
        }
        tcp_server(TcpListener::bind((DNS_IP, 443)).unwrap(), tls_standin);
        let echo = UdpSocket::bind((ALLOWED_IP, 4433)).unwrap();
        thread::spawn(move || {
            let mut b = [0u8; 2048];
            while let Ok((n, from)) = echo.recv_from(&mut b) {
                let _ = echo.send_to(&b[..n], from);
            }
        });
    })
    .unwrap();
    World { edge, inet }
}

/// A pretend guest: a namespace whose eth0 is bridged to the sandbox's TAP.
pub struct Guest {
    pub ns: NetNs,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

fn attach_tap(name: &str) -> OwnedFd {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads the valid ifreq.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &req) };
    assert_eq!(rc, 0, "attach {name}");
    f.into()
}

/// Copies frames from `from` to `to` until `stop`.
fn pump(from: Arc<OwnedFd>, to: Arc<OwnedFd>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        let mut p = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 50) } <= 0 {
            continue;
        }
        // SAFETY: read into our buffer from a descriptor we hold.
        let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            // SAFETY: write from our buffer to a descriptor we hold.
            unsafe { libc::write(to.as_raw_fd(), buf.as_ptr().cast(), n as usize) };
        }
    }
}

impl Guest {
    /// A guest on the sandbox whose namespace is `sandbox_ns`.
    pub fn new(sandbox_ns: &NetNs) -> Guest {
        let ns = NetNs::new().unwrap();
        let guest_tap = ns
            .run(|| {
                link::up("lo").unwrap();
                link::create_tap("eth0", GUEST_MAC).unwrap();
                let fd = attach_tap("eth0");
                link::set_address("eth0", GUEST_IP, PREFIX).unwrap();
                link::up("eth0").unwrap();
                ip(&["route", "add", "default", "via", &GATEWAY_IP.to_string()]);
                fd
            })
            .unwrap();
        let host_tap = sandbox_ns.run(|| attach_tap(TAP_NAME)).unwrap();
        let (g, h) = (Arc::new(guest_tap), Arc::new(host_tap));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = vec![
            thread::spawn({
                let (g, h, s) = (g.clone(), h.clone(), stop.clone());
                move || pump(g, h, s)
            }),
            thread::spawn({
                let s = stop.clone();
                move || pump(h, g, s)
            }),
        ];
        Guest { ns, stop, threads }
    }

    /// Runs `f` inside the guest.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.ns.run(f).unwrap()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A DNS question for `name`, type A.
pub fn query(name: &str) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(7).set_recursion_desired(true);
    m.add_query(hickory_proto::op::Query::query(
        Name::from_str(name).unwrap(),
        RecordType::A,
    ));
    m.to_vec().unwrap()
}

/// Asks `server` for `name` over UDP from the calling thread; the answer's code and addresses.
pub fn resolve(server: Ipv4Addr, name: &str) -> Option<(ResponseCode, Vec<Ipv4Addr>)> {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.send_to(&query(name), (server, 53)).unwrap();
    let mut b = [0u8; 2048];
    let n = s.recv(&mut b).ok()?;
    let m = Message::from_vec(&b[..n]).unwrap();
    let ips = m
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    Some((m.response_code(), ips))
}

/// Connects to `addr`, writes `send`, and reads until the peer closes or 5 s pass; `Err` when the
/// connection could not be made or was reset.
pub fn exchange(addr: SocketAddr, send: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(send)?;
    let mut out = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        match c.read(&mut b) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                out.extend_from_slice(&b[..n]);
                if out.ends_with(b"\n")
                    || find(&out, b"\r\n\r\n").is_some_and(|h| out.len() > h + 4)
                {
                    return Ok(out);
                }
            }
            Err(e) if out.is_empty() => return Err(e),
            Err(_) => return Ok(out),
        }
    }
}
