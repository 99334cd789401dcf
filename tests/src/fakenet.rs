//! A small internet inside L1, for network sandbox tests: a namespace reached from L1's own
//! namespace (playing the host, with its uplink) over a veth, holding servers on addresses that
//! are not the host's. L1's `/etc/resolv.conf` names its name server, as a host's would.
//!
//! - 198.51.100.53: the name server (`allowed.test` 203.0.113.10, `blocked.test` 203.0.113.20,
//!   both also as `www.`), and a TLS server on 443 (a DNS-over-HTTPS stand-in).
//! - 203.0.113.10 and 203.0.113.20: HTTP on 80 and HTTPS on 443 answering `hello from <address>
//!   host=<Host>` or `sni=<SNI>`, a banner on 22; and a UDP echo on 203.0.113.10:4433.
//! - 192.0.2.1 is L1's end of the veth: an address of the host, which sandboxes must not reach.
//!
//! Also: [`census`], what a leak check counts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use kiln_net::link;
use kiln_net::netns::NetNs;

/// L1's end of the veth (a host address).
pub const EDGE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The name server.
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
/// `allowed.test`.
pub const ALLOWED_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// `blocked.test`.
pub const BLOCKED_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// The allowed name.
pub const ALLOWED: &str = "allowed.test";
/// The other name.
pub const BLOCKED: &str = "blocked.test";

const RESOLV_CONF: &str = "/etc/resolv.conf";
const VETH: &str = "fake0";

/// The running small internet; taken down when dropped (its servers' threads stay parked on
/// sockets in a namespace nothing routes to any more).
pub struct FakeInternet {
    _inet: NetNs,
    old_resolv: Option<String>,
}

fn ip(args: &[&str]) {
    link::ip(args).unwrap_or_else(|e| panic!("building the fake internet: {e}"));
}

fn dns(sock: UdpSocket) {
    let zone: HashMap<&str, Ipv4Addr> = HashMap::from([
        (ALLOWED, ALLOWED_IP),
        ("www.allowed.test", ALLOWED_IP),
        (BLOCKED, BLOCKED_IP),
        ("www.blocked.test", BLOCKED_IP),
        ("clone-a.test", BLOCKED_IP),
        ("clone-b.test", BLOCKED_IP),
    ]);
    let mut buf = [0u8; 4096];
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        let Ok(q) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let Some(question) = q.queries().first().cloned() else {
            continue;
        };
        let mut r = Message::new();
        r.set_id(q.id())
            .set_message_type(MessageType::Response)
            .set_recursion_available(true);
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
        if let Ok(bytes) = r.to_vec() {
            let _ = sock.send_to(&bytes, from);
        }
    }
}

/// The request head's `Host`, read from `s` up to the blank line.
fn read_host(s: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head)
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("host").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "-".into())
}

fn answer(s: &mut impl Write, body: &str) {
    let _ = s.write_all(
        format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let _ = s.flush();
}

fn serve(l: TcpListener, f: impl Fn(TcpStream, Ipv4Addr) + Send + Sync + 'static) {
    let here = match l.local_addr() {
        Ok(SocketAddr::V4(a)) => *a.ip(),
        _ => Ipv4Addr::UNSPECIFIED,
    };
    let f = Arc::new(f);
    thread::spawn(move || {
        for c in l.incoming().flatten() {
            let f = f.clone();
            thread::spawn(move || f(c, here));
        }
    });
}

fn tls_config() -> Arc<rustls::ServerConfig> {
    let names = vec![ALLOWED.to_string(), BLOCKED.to_string()];
    let cert = rcgen::generate_simple_self_signed(names).expect("a self-signed certificate");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    // ring is deprecated in rustls for lacking post-quantum key exchange; a test server in a fake
    // internet does not need it, and ring builds with nothing but a C compiler.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("the certificate");
    Arc::new(config)
}

fn https(tcp: TcpStream, here: Ipv4Addr, config: Arc<rustls::ServerConfig>) {
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let _host = read_host(&mut tls);
    let sni = tls.conn.server_name().unwrap_or("-").to_string();
    answer(&mut tls, &format!("hello from {here} sni={sni}"));
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

impl FakeInternet {
    /// Builds it and starts its servers (as root in L1).
    pub fn start() -> FakeInternet {
        let inet = NetNs::new().expect("a namespace for the fake internet");
        let inet_path = format!("/proc/{}/fd/{}", std::process::id(), inet.as_raw_fd());
        let _ = link::ip(&["link", "del", VETH]);
        ip(&[
            "link", "add", VETH, "type", "veth", "peer", "name", "i0", "netns", &inet_path,
        ]);
        ip(&["addr", "add", &format!("{EDGE_IP}/30"), "dev", VETH]);
        ip(&["link", "set", VETH, "up"]);
        ip(&["route", "add", "203.0.113.0/24", "via", "192.0.2.2"]);
        ip(&["route", "add", "198.51.100.0/24", "via", "192.0.2.2"]);
        let config = tls_config();
        inet.run(|| {
            link::up("lo").unwrap();
            ip(&["addr", "add", "192.0.2.2/30", "dev", "i0"]);
            ip(&["link", "set", "i0", "up"]);
            for a in [ALLOWED_IP, BLOCKED_IP, DNS_IP] {
                ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"]);
            }
            ip(&["route", "add", "default", "via", &EDGE_IP.to_string()]);
            let d = UdpSocket::bind((DNS_IP, 53)).unwrap();
            thread::spawn(move || dns(d));
            for host in [ALLOWED_IP, BLOCKED_IP] {
                serve(TcpListener::bind((host, 80)).unwrap(), |mut c, here| {
                    let host = read_host(&mut c);
                    answer(&mut c, &format!("hello from {here} host={host}"));
                });
                serve(TcpListener::bind((host, 22)).unwrap(), |mut c, _| {
                    let _ = c.write_all(b"SSH-2.0-fake\r\n");
                });
            }
            for host in [ALLOWED_IP, BLOCKED_IP, DNS_IP] {
                let config = config.clone();
                serve(TcpListener::bind((host, 443)).unwrap(), move |c, here| {
                    https(c, here, config.clone())
                });
            }
            let echo = UdpSocket::bind((ALLOWED_IP, 4433)).unwrap();
            thread::spawn(move || {
                let mut b = [0u8; 2048];
                while let Ok((n, from)) = echo.recv_from(&mut b) {
                    let _ = echo.send_to(&b[..n], from);
                }
            });
        })
        .expect("enter the fake internet's namespace");
        let old_resolv = std::fs::read_to_string(RESOLV_CONF).ok();
        std::fs::write(RESOLV_CONF, format!("nameserver {DNS_IP}\n"))
            .expect("write /etc/resolv.conf");
        FakeInternet {
            _inet: inet,
            old_resolv,
        }
    }
}

impl Drop for FakeInternet {
    fn drop(&mut self) {
        let _ = link::ip(&["link", "del", VETH]);
        match &self.old_resolv {
            Some(text) => {
                let _ = std::fs::write(RESOLV_CONF, text);
            }
            None => {
                let _ = std::fs::remove_file(RESOLV_CONF);
            }
        }
    }
}

/// What a leak check compares before and after: network namespaces in use, links in this
/// namespace, this namespace's nftables ruleset, TCP listeners, and Kiln processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Census {
    /// Network namespaces some process or open descriptor refers to.
    pub netns: BTreeSet<String>,
    /// Interfaces in this namespace.
    pub links: BTreeSet<String>,
    /// `nft list ruleset` here.
    pub ruleset: String,
    /// Listening TCP sockets (local address:port, hex as in /proc/net/tcp).
    pub listeners: BTreeSet<String>,
    /// `kiln` and `kiln-vmm` processes, by pid.
    pub processes: BTreeMap<u32, String>,
}

/// Counts what a sandbox could leave behind.
pub fn census() -> Census {
    let mut netns = BTreeSet::new();
    let mut processes = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let p = entry.path();
        if let Ok(l) = std::fs::read_link(p.join("ns/net")) {
            netns.insert(l.to_string_lossy().into_owned());
        }
        for fd in std::fs::read_dir(p.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(l) = std::fs::read_link(fd.path())
                && l.to_string_lossy().starts_with("net:[")
            {
                netns.insert(l.to_string_lossy().into_owned());
            }
        }
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm == "kiln" || comm == "kiln-vmm" {
            processes.insert(pid, comm.to_string());
        }
    }
    let links = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let ruleset = kiln_net::nft::list_ruleset().unwrap_or_else(|e| format!("nft failed: {e}"));
    let listeners = std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(3) == Some(&"0A")).then(|| f[1].to_string())
        })
        .collect();
    Census {
        netns,
        links,
        ruleset,
        listeners,
        processes,
    }
}
