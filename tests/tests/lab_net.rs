//! Network sandboxes with real Linux guests, inside the lab: `kiln run` with and without a
//! network against a small internet built in network namespaces in L1 (`kiln_tests::fakenet`),
//! checked from inside the guest (what it reaches, what fails) and from the host (what was
//! reported refused, published ports).

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::cycles::{Cycle, make_snapshot_with_nic, run_cycle};
use kiln_tests::fakenet::{
    ALLOWED, ALLOWED_IP, BLOCKED_IP, Census, DNS_IP, EDGE_IP, FakeInternet, census,
};

/// L1 plays the host, but its init leaves loopback down, which no booted host does: published
/// ports listen on 127.0.0.1.
fn loopback_up() {
    kiln_net::link::up("lo").expect("bring L1's loopback up");
}

/// Waits until the host looks as it did in `before` (kiln-vmm may take a moment to be reaped
/// after kiln), then asserts it: no namespace, link, rule, listener or process left behind.
fn nothing_left_behind(before: &Census) {
    let end = Instant::now() + Duration::from_secs(10);
    let mut now = census();
    while now != *before && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
        now = census();
    }
    assert_eq!(&now, before, "a sandbox left something behind");
}

/// Runs `kiln run ARGS -- python3 -c SCRIPT --json` and returns kiln's JSON and the script's own
/// JSON (its stdout).
fn kiln_json(args: &[&str], script: &str) -> (serde_json::Value, serde_json::Value, Output) {
    let out = Command::new("kiln")
        .arg("run")
        .arg("--json")
        .args(args)
        .args(["--", "python3", "-c", script])
        .stdin(Stdio::null())
        .output()
        .expect("start kiln");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let kiln: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("kiln printed no JSON ({e}); stderr: {stderr}"));
    let guest = serde_json::from_str(kiln["stdout"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("the guest printed no JSON ({e}): {kiln}; stderr: {stderr}"));
    (kiln, guest, out)
}

/// Python helpers every guest script starts with: each probe returns what it got, or `error: ...`.
const PROBES: &str = r#"
import json, socket, ssl
def tcp(host, port, send=b"", timeout=8):
    try:
        s = socket.create_connection((host, port), timeout=timeout)
        s.sendall(send)
        d = b""
        while True:
            c = s.recv(4096)
            if not c: break
            d += c
        s.close()
        return d.decode(errors="replace")
    except Exception as e:
        return "error: %s: %s" % (type(e).__name__, e)
def http(host, port, name):
    return tcp(host, port, ("GET / HTTP/1.0\r\nHost: %s\r\n\r\n" % name).encode())
def tls(host, port, sni):
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        s = socket.create_connection((host, port), timeout=8)
        t = ctx.wrap_socket(s, server_hostname=sni)
        t.sendall(("GET / HTTP/1.0\r\nHost: %s\r\n\r\n" % (sni or host)).encode())
        d = b""
        while True:
            c = t.recv(4096)
            if not c: break
            d += c
        return d.decode(errors="replace")
    except Exception as e:
        return "error: %s: %s" % (type(e).__name__, e)
def resolve(name):
    try:
        return socket.gethostbyname(name)
    except Exception as e:
        return "error: %s" % e
def udp(host, port):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.sendto(b"quic?", (host, port))
        return s.recv(64).decode()
    except Exception as e:
        return "error: %s: %s" % (type(e).__name__, e)
r = {}
"#;

fn ok(v: &serde_json::Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

fn failed(v: &serde_json::Value, key: &str) {
    let got = ok(v, key);
    assert!(
        got.starts_with("error: ") || got.is_empty() || got.contains("kiln: refused"),
        "{key} should have failed; the guest got {got:?}"
    );
}

/// Whether kiln's JSON lists a refusal matching all of `(field, value)`.
fn refused(kiln: &serde_json::Value, fields: &[(&str, &str)]) -> bool {
    kiln["network"]["refused"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| {
            fields
                .iter()
                .all(|(k, v)| r[*k].as_str().is_some_and(|s| s.contains(v)))
        })
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn net_allowlist_reaches_the_allowed_domain_and_nothing_else() {
    loopback_up();
    let _net = FakeInternet::start();
    let script = format!(
        r#"{PROBES}
r["resolve_allowed"] = resolve("{ALLOWED}")
r["resolve_blocked"] = resolve("blocked.test")
r["https_allowed"] = tls("{ALLOWED}", 443, "{ALLOWED}")
r["http_allowed"] = http("{ALLOWED}", 80, "{ALLOWED}")
r["ip_literal"] = tls("{BLOCKED_IP}", 443, None)
r["wrong_sni"] = tls("{BLOCKED_IP}", 443, "{ALLOWED}")
r["wrong_host"] = http("{BLOCKED_IP}", 80, "{ALLOWED}")
r["fronted_sni"] = tls("{ALLOWED_IP}", 443, "blocked.test")
r["doh"] = tls("{DNS_IP}", 443, "dns.example")
r["udp"] = udp("{ALLOWED_IP}", 4433)
r["ssh"] = tcp("{ALLOWED_IP}", 22)
r["metadata"] = http("169.254.169.254", 80, "169.254.169.254")
r["host"] = http("{EDGE_IP}", 80, "{ALLOWED}")
r["gateway"] = tcp("172.16.0.1", 22)
with open("/etc/hosts", "a") as f:
    f.write("{BLOCKED_IP} {ALLOWED}\n")
r["etc_hosts"] = tls("{ALLOWED}", 443, "{ALLOWED}")
print(json.dumps(r))
"#
    );
    let before = census();
    let (kiln, g, out) = kiln_json(&["--allow-domain", ALLOWED], &script);
    nothing_left_behind(&before);
    assert_eq!(out.status.code(), Some(0), "{kiln}");
    assert_eq!(ok(&g, "resolve_allowed"), ALLOWED_IP.to_string());
    assert!(ok(&g, "resolve_blocked").starts_with("error: "), "{g}");
    assert!(
        ok(&g, "https_allowed").ends_with("hello from 203.0.113.10 sni=allowed.test"),
        "{g}"
    );
    assert!(
        ok(&g, "http_allowed").ends_with("hello from 203.0.113.10 host=allowed.test"),
        "{g}"
    );
    for key in [
        "ip_literal",
        "wrong_sni",
        "wrong_host",
        "fronted_sni",
        "doh",
        "udp",
        "ssh",
        "metadata",
        "host",
        "gateway",
        "etc_hosts",
    ] {
        failed(&g, key);
    }
    assert_eq!(kiln["network"]["address"], "172.16.0.2");
    for fields in [
        &[("proto", "dns"), ("name", "blocked.test")][..],
        &[("dest", "203.0.113.20:443"), ("reason", "SNI")],
        &[("dest", "203.0.113.20:443"), ("name", ALLOWED)],
        &[("dest", "203.0.113.20:80"), ("name", ALLOWED)],
        &[("dest", "203.0.113.10:443"), ("name", "blocked.test")],
        &[("dest", "198.51.100.53:443"), ("name", "dns.example")],
        &[("proto", "udp"), ("dest", "203.0.113.10:4433")],
        &[("dest", "203.0.113.10:22")],
        &[("dest", "169.254.169.254:80"), ("reason", "metadata")],
        &[("dest", "192.0.2.1:80"), ("reason", "host")],
        &[("dest", "172.16.0.1:22")],
    ] {
        assert!(
            refused(&kiln, fields),
            "no refusal with {fields:?} in {}",
            kiln["network"]
        );
    }
    let vms: Vec<&str> = kiln["network"]["refused"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["vm"].as_str())
        .collect();
    assert!(
        vms.iter().all(|v| v.starts_with("kiln-") && *v == vms[0]),
        "{vms:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("kiln: net: vm kiln-"),
        "refusals are printed: {stderr}"
    );
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn net_off_by_default_there_is_no_nic_and_nothing_leaves() {
    loopback_up();
    let _net = FakeInternet::start();
    let script = format!(
        r#"{PROBES}
import os
r["links"] = " ".join(sorted(os.listdir("/sys/class/net")))
r["http"] = http("{ALLOWED_IP}", 80, "{ALLOWED}")
r["resolve"] = resolve("{ALLOWED}")
print(json.dumps(r))
"#
    );
    let (kiln, g, _) = kiln_json(&[], &script);
    assert_eq!(ok(&g, "links"), "lo");
    failed(&g, "http");
    assert!(ok(&g, "resolve").starts_with("error: "), "{g}");
    assert!(kiln.get("network").is_none(), "{kiln}");
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn net_allow_net_reaches_anything_but_private_metadata_and_host_addresses() {
    loopback_up();
    let _net = FakeInternet::start();
    let script = format!(
        r#"{PROBES}
r["resolve_blocked"] = resolve("blocked.test")
r["ip_literal"] = http("{BLOCKED_IP}", 80, "x")
r["ssh"] = tcp("{BLOCKED_IP}", 22)
r["udp"] = udp("{ALLOWED_IP}", 4433)
r["metadata"] = http("169.254.169.254", 80, "x")
r["host"] = http("{EDGE_IP}", 80, "x")
r["private"] = http("10.201.0.1", 80, "x")
print(json.dumps(r))
"#
    );
    let (kiln, g, _) = kiln_json(&["--allow-net"], &script);
    assert_eq!(ok(&g, "resolve_blocked"), BLOCKED_IP.to_string());
    assert!(
        ok(&g, "ip_literal").ends_with("hello from 203.0.113.20 host=x"),
        "{g}"
    );
    assert_eq!(ok(&g, "ssh"), "SSH-2.0-fake\r\n");
    assert_eq!(ok(&g, "udp"), "quic?");
    for key in ["metadata", "host", "private"] {
        failed(&g, key);
    }
    assert!(
        refused(
            &kiln,
            &[("dest", "169.254.169.254:80"), ("reason", "metadata")]
        ),
        "{kiln}"
    );
    assert!(
        refused(&kiln, &[("dest", "192.0.2.1:80"), ("reason", "host")]),
        "{kiln}"
    );
}

/// Starts `kiln run ARGS -- python3 -m http.server 8080`, reads the published port from its
/// stderr, fetches `/` through it, and stops kiln; returns the page.
fn published_page(args: &[&str]) -> String {
    loopback_up();
    let before = census();
    let mut child = Command::new("kiln")
        .arg("run")
        .args(args)
        .args([
            "--publish",
            "8080",
            "--",
            "python3",
            "-m",
            "http.server",
            "8080",
            "--directory",
            "/etc",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln");
    let mut stderr = child.stderr.take().unwrap();
    let mut line = String::new();
    let mut b = [0u8; 1];
    while !line.ends_with('\n') && stderr.read(&mut b).unwrap_or(0) == 1 {
        line.push(b[0] as char);
    }
    let host = line
        .strip_prefix("kiln: published ")
        .and_then(|r| r.split(" -> ").next())
        .unwrap_or_else(|| panic!("no published line: {line:?}"))
        .to_string();
    // The server starts after the VM boots: retry until it answers.
    let end = Instant::now() + Duration::from_secs(120);
    let page = loop {
        let got = std::net::TcpStream::connect(&host).and_then(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(20)))?;
            c.write_all(b"GET /hostname HTTP/1.0\r\n\r\n")?;
            let mut s = String::new();
            c.read_to_string(&mut s)?;
            Ok(s)
        });
        match got {
            Ok(s) if s.starts_with("HTTP/1.0 200") => break s,
            _ if Instant::now() > end => panic!("{host} never served the page: {got:?}"),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    // SAFETY: kill with a pid we started; SIGTERM lets kiln clean up.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "kiln ends on SIGTERM"
    );
    assert!(
        std::net::TcpStream::connect(&host).is_err(),
        "{host} closed with kiln"
    );
    nothing_left_behind(&before);
    page
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn net_published_port_serves_the_guests_server_with_and_without_a_nic() {
    let page = published_page(&[]);
    assert!(page.ends_with("kiln\n"), "over vsock: {page}");
    let page = published_page(&["--net"]);
    assert!(page.ends_with("kiln\n"), "over the NIC: {page}");
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn net_clones_of_one_snapshot_run_side_by_side_each_on_its_own_network() {
    loopback_up();
    let _net = FakeInternet::start();
    let dir = kiln_tests::ScratchDir::new("net-clones");
    let snap = make_snapshot_with_nic(dir.path(), ALLOWED).expect("a snapshot with a NIC");
    let before = census();
    let script = format!(
        r#"{PROBES}
r["https_allowed"] = tls("{ALLOWED}", 443, "{ALLOWED}")
r["resolve_blocked"] = resolve("blocked.test")
print(json.dumps(r))
"#
    );
    let snap = snap.display().to_string();
    // Both clones at once: the same guest address and MAC (a snapshot fixes them), so only
    // separate networks let both through.
    let clones: Vec<_> = (0..2)
        .map(|_| {
            let (snap, script) = (snap.clone(), script.clone());
            std::thread::spawn(move || {
                kiln_json(&["--snapshot", &snap, "--allow-domain", ALLOWED], &script)
            })
        })
        .collect();
    let results: Vec<_> = clones.into_iter().map(|c| c.join().unwrap()).collect();
    nothing_left_behind(&before);
    let mut vms = Vec::new();
    for (kiln, g, out) in &results {
        assert_eq!(out.status.code(), Some(0), "{kiln}");
        assert!(
            ok(g, "https_allowed").ends_with("hello from 203.0.113.10 sni=allowed.test"),
            "{g}"
        );
        assert!(ok(g, "resolve_blocked").starts_with("error: "), "{g}");
        assert_eq!(kiln["network"]["address"], "172.16.0.2");
        // Each clone's refusals are its own: its blocked lookup, under its own VM id only.
        let ids: Vec<&str> = kiln["network"]["refused"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["vm"].as_str())
            .collect();
        assert!(
            refused(kiln, &[("proto", "dns"), ("name", "blocked.test")]),
            "{}",
            kiln["network"]
        );
        assert!(ids.iter().all(|v| *v == ids[0]), "{ids:?}");
        vms.push(ids[0].to_string());
    }
    assert_ne!(vms[0], vms[1], "each clone has a network of its own");

    // Networks made and removed one after another leave nothing behind (`cargo xtask bench
    // cycles --net 200` runs 200).
    for i in 0..10 {
        run_cycle(Cycle::NetRestore(ALLOWED), i, std::path::Path::new(&snap))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    nothing_left_behind(&before);
}
