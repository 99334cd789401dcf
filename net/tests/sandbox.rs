//! Sandboxes end to end without a VM: a pretend guest bridged to the sandbox's TAP reaches a
//! small internet in network namespaces (see `common`), and what passes and what is refused is
//! checked from the guest's side, with the refusal reports. Needs root (namespaces, TAPs) and
//! nft and ip on the host.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::{ALLOWED_IP, BLOCKED_IP, DNS_IP, EDGE_IP, Guest, exchange, resolve, world};
use hickory_proto::op::ResponseCode;
use kiln_net::addr::GATEWAY_IP;
use kiln_net::dns::Upstream;
use kiln_net::publish::{self, PublishSpec, Target};
use kiln_net::sni::client_hello;
use kiln_net::{DomainPattern, Policy, Sandbox, SandboxConfig};

fn sandbox(world: &common::World, domains: &[&str], allow_net: bool) -> Sandbox {
    Sandbox::create(SandboxConfig {
        vm_id: "vm-test".into(),
        policy: Policy {
            domains: domains
                .iter()
                .map(|d| d.parse::<DomainPattern>().unwrap())
                .collect(),
            allow_net,
        },
        upstream: Upstream::Servers(vec![SocketAddr::from((DNS_IP, 53))]),
        uplink: Some(world.edge.try_clone().unwrap()),
        on_refusal: None,
    })
    .expect("create the sandbox")
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn http_get(host: &str) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
}

fn text(r: std::io::Result<Vec<u8>>) -> String {
    match r {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => format!("error: {e}"),
    }
}

/// Whether the reports so far include one matching `pred`, waiting up to 2 s (NFLOG is read on a
/// thread of its own).
fn reported(sb: &Sandbox, pred: impl Fn(&kiln_net::Refusal) -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(2);
    loop {
        if sb.refusals().0.iter().any(&pred) {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_domain_allowlist_lets_only_allowed_names_through() {
    let w = world();
    let sb = sandbox(&w, &["allowed.test"], false);
    let g = Guest::new(sb.netns());

    // DNS: allowed name answered, the other NXDOMAIN; a hard-coded resolver reaches ours too.
    let (code, ips) = g
        .run(|| resolve(GATEWAY_IP, "allowed.test."))
        .expect("an answer");
    assert_eq!((code, ips), (ResponseCode::NoError, vec![ALLOWED_IP]));
    let (code, _) = g.run(|| resolve(GATEWAY_IP, "blocked.test.")).unwrap();
    assert_eq!(code, ResponseCode::NXDomain);
    let (code, _) = g
        .run(|| resolve(Ipv4Addr::new(8, 8, 8, 8), "blocked.test."))
        .unwrap();
    assert_eq!(code, ResponseCode::NXDomain, "DNS to any server is ours");
    let (_, ips) = g
        .run(|| resolve(GATEWAY_IP, "private.allowed.test."))
        .unwrap();
    assert!(ips.is_empty());

    // HTTP and TLS to the allowed name's address, with its name.
    let out = text(g.run(|| exchange(at(ALLOWED_IP, 80), &http_get("allowed.test"))));
    assert!(
        out.ends_with("hello from 203.0.113.10 host=allowed.test"),
        "{out}"
    );
    let out = text(g.run(|| exchange(at(ALLOWED_IP, 443), &client_hello(Some("allowed.test")))));
    assert_eq!(out, "TLS-OK allowed.test\n");

    // Everything else fails, from the guest's side.
    let failed = |addr: SocketAddr, send: Vec<u8>| {
        let out = g.run(|| exchange(addr, &send));
        assert!(
            out.as_ref().map_or(true, |b| b.is_empty()
                || String::from_utf8_lossy(b).contains("kiln: refused")),
            "{addr}: {}",
            text(out)
        );
    };
    failed(at(BLOCKED_IP, 443), client_hello(Some("blocked.test"))); // not allowed
    failed(at(BLOCKED_IP, 443), client_hello(None)); // IP literal, no SNI
    failed(at(BLOCKED_IP, 443), client_hello(Some("allowed.test"))); // allowed SNI, wrong address
    failed(at(BLOCKED_IP, 80), http_get("allowed.test")); // allowed Host, wrong address
    failed(at(ALLOWED_IP, 80), http_get("blocked.test")); // fronting with Host
    failed(at(ALLOWED_IP, 443), client_hello(Some("blocked.test"))); // fronting with SNI
    failed(at(DNS_IP, 443), client_hello(Some("dns.example"))); // DoH elsewhere
    failed(at(ALLOWED_IP, 22), b"\n".to_vec()); // another port
    failed(
        at(Ipv4Addr::new(169, 254, 169, 254), 80),
        http_get("169.254.169.254"),
    );
    failed(at(EDGE_IP, 80), http_get("allowed.test")); // the host itself
    failed(at(GATEWAY_IP, 22), b"\n".to_vec()); // the gateway
    // A second request on a passing connection is checked too.
    let two = [http_get("allowed.test"), http_get("blocked.test")].concat();
    let out = text(g.run(|| {
        let mut c = std::net::TcpStream::connect(at(ALLOWED_IP, 80))?;
        std::io::Write::write_all(&mut c, &two)?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut all = Vec::new();
        let mut b = [0u8; 4096];
        while !String::from_utf8_lossy(&all).contains("kiln: refused") {
            match std::io::Read::read(&mut c, &mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&b[..n]),
            }
        }
        Ok(all)
    }));
    assert!(
        out.contains("200 OK") && out.contains("403 Forbidden"),
        "{out}"
    );
    // UDP other than DNS (QUIC among it) goes nowhere.
    let udp = g.run(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.send_to(b"quic?", at(ALLOWED_IP, 4433)).unwrap();
        s.recv(&mut [0u8; 64]).is_ok()
    });
    assert!(!udp, "no UDP echo through the sandbox");

    // Every refusal was reported with the VM's id and what was refused.
    for (what, pred) in [
        (
            "dns blocked.test",
            Box::new(|r: &kiln_net::Refusal| {
                r.proto == "dns" && r.name.as_deref() == Some("blocked.test")
            }) as Box<dyn Fn(&kiln_net::Refusal) -> bool>,
        ),
        (
            "sni blocked.test",
            Box::new(|r| {
                r.name.as_deref() == Some("blocked.test")
                    && r.dest.as_deref() == Some("203.0.113.20:443")
            }),
        ),
        (
            "wrong address",
            Box::new(|r| {
                r.reason == "allowed.test did not resolve to 203.0.113.20 in this sandbox"
            }),
        ),
        (
            "metadata",
            Box::new(|r| r.dest.as_deref() == Some("169.254.169.254:80")),
        ),
        (
            "host",
            Box::new(|r| r.dest.as_deref() == Some("192.0.2.1:80") && r.reason.contains("host")),
        ),
        (
            "port 22",
            Box::new(|r| r.dest.as_deref() == Some("203.0.113.10:22")),
        ),
        (
            "udp",
            Box::new(|r| r.proto == "udp" && r.dest.as_deref() == Some("203.0.113.10:4433")),
        ),
        (
            "gateway",
            Box::new(|r| r.dest.as_deref() == Some("172.16.0.1:22")),
        ),
    ] {
        assert!(
            reported(&sb, pred),
            "no report of {what}: {:#?}",
            sb.refusals().0
        );
    }
    assert!(sb.refusals().0.iter().all(|r| r.vm == "vm-test"));
}

#[test]
fn allow_net_routes_anything_but_private_ranges_and_the_host() {
    let w = world();
    let sb = sandbox(&w, &[], true);
    let g = Guest::new(sb.netns());
    let (_, ips) = g.run(|| resolve(GATEWAY_IP, "blocked.test.")).unwrap();
    assert_eq!(ips, [BLOCKED_IP], "every name resolves");
    assert_eq!(
        text(g.run(|| exchange(at(BLOCKED_IP, 22), b""))),
        "SSH-2.0-fake\r\n"
    );
    let echoed = g.run(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send_to(b"quic?", at(ALLOWED_IP, 4433)).unwrap();
        let mut b = [0u8; 64];
        s.recv(&mut b).map(|n| b[..n].to_vec())
    });
    assert_eq!(echoed.unwrap(), b"quic?", "UDP is routed");
    for refused in [
        at(EDGE_IP, 80),
        at(Ipv4Addr::new(169, 254, 169, 254), 80),
        at(Ipv4Addr::new(10, 201, 0, 1), 80),
    ] {
        let out = g.run(|| exchange(refused, b"x"));
        assert!(out.is_err(), "{refused}: {}", text(out));
    }
    assert!(reported(&sb, |r| r.dest.as_deref()
        == Some("169.254.169.254:80")
        && r.reason.contains("metadata")));
    assert!(reported(&sb, |r| r.dest.as_deref() == Some("192.0.2.1:80")
        && r.reason.contains("host")));
    let veth = sb.veth().unwrap().outside.clone();
    drop(g);
    drop(sb);
    // The veth went with the namespace.
    let end = Instant::now() + Duration::from_secs(5);
    while w.edge.run(|| if_exists(&veth)).unwrap() {
        assert!(Instant::now() < end, "{veth} outlived its sandbox");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn if_exists(name: &str) -> bool {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: if_nametoindex reads the valid NUL-terminated name.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

#[test]
fn published_ports_reach_the_guest_over_its_link_and_go_with_the_sandbox() {
    let w = world();
    let sb = sandbox(&w, &[], false);
    let g = Guest::new(sb.netns());
    let server = g.run(|| std::net::TcpListener::bind("0.0.0.0:8080").unwrap());
    std::thread::spawn(move || {
        for mut c in server.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut c, b"from the guest\n");
        }
    });
    let spec: PublishSpec = "8080".parse().unwrap();
    let ns = std::sync::Arc::clone(sb.netns());
    let published = publish::start(sb.runtime(), &[spec], Target::Nic(ns)).unwrap();
    let host = published[0].host;
    assert_eq!(*host.ip(), Ipv4Addr::LOCALHOST);
    assert_eq!(
        text(exchange(SocketAddr::V4(host), b"")),
        "from the guest\n"
    );
    let ino = sb.netns().inode().unwrap();
    drop(g);
    drop(sb);
    assert!(
        std::net::TcpStream::connect(host).is_err(),
        "the listener closed with the sandbox"
    );
    // Nothing in this process refers to the namespace any more, so the kernel has freed it.
    let refs = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|l| l.to_string_lossy() == format!("net:[{ino}]"))
        .count();
    assert_eq!(refs, 0);
}

/// A sandbox whose services died (its owner killed, the VM running on in its namespace) is taken
/// over in that namespace: the resolver and the proxy answer again with the same policy. A
/// namespace without a sandbox's TAP and rules, or whose uplink does not match the policy, is
/// refused by name.
#[test]
fn a_namespace_whose_services_died_is_adopted() {
    let w = world();
    let sb = sandbox(&w, &["allowed.test"], false);
    let g = Guest::new(sb.netns());
    // What the VMM would do: keep the namespace alive while its owner's services go.
    let kept = sb.netns().try_clone().unwrap();
    drop(sb);
    assert!(
        g.run(|| resolve(GATEWAY_IP, "allowed.test.")).is_none(),
        "the resolver went with its owner"
    );
    let cfg = |allow_net: bool| SandboxConfig {
        vm_id: "vm-adopted".into(),
        policy: Policy {
            domains: vec!["allowed.test".parse().unwrap()],
            allow_net,
        },
        upstream: Upstream::Servers(vec![SocketAddr::from((DNS_IP, 53))]),
        uplink: Some(w.edge.try_clone().unwrap()),
        on_refusal: None,
    };
    let e = Sandbox::adopt(kept.try_clone().unwrap(), cfg(true))
        .err()
        .expect("a policy the namespace was not made for");
    assert_eq!(
        e.to_string(),
        "cannot adopt the network of vm vm-adopted: its policy allows the net but its namespace has no uplink"
    );
    let sb = Sandbox::adopt(kept, cfg(false)).expect("adopt the namespace");
    let (code, ips) = g
        .run(|| resolve(GATEWAY_IP, "allowed.test."))
        .expect("an answer from the new resolver");
    assert_eq!((code, ips), (ResponseCode::NoError, vec![ALLOWED_IP]));
    let out = text(g.run(|| exchange(at(ALLOWED_IP, 80), &http_get("allowed.test"))));
    assert!(
        out.ends_with("hello from 203.0.113.10 host=allowed.test"),
        "{out}"
    );
    let (code, _) = g.run(|| resolve(GATEWAY_IP, "blocked.test.")).unwrap();
    assert_eq!(code, ResponseCode::NXDomain);
    assert!(reported(&sb, |r| r.vm == "vm-adopted"
        && r.name.as_deref() == Some("blocked.test")));
    drop(g);
    drop(sb);

    let bare = kiln_net::netns::NetNs::new().unwrap();
    let e = Sandbox::adopt(bare, cfg(false))
        .err()
        .expect("a bare namespace");
    assert_eq!(
        e.to_string(),
        "cannot adopt the network of vm vm-adopted: its namespace has no TAP kiln0"
    );
}
