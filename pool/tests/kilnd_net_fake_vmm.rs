//! kilnd's sandbox networks end to end on the host, with the stand-in VMM (this test binary, run
//! with `KILN_FAKE_VMM`, serving the real agent code in-process). The stand-in attaches no TAP
//! and runs no guest kernel, but kilnd starts it inside the VM's network namespace, so what its
//! "guest" runs (this host's programs, as the agent's children) sees that namespace as a real
//! guest's host side would: its links (`/proc/net/dev`), its nftables ruleset, the resolver on
//! the gateway address. What is checked is what a user could check: the links and rules, the
//! resolver's answers and kilnd's log of refusals, published ports reached through the agent,
//! the refusal of bad policies with a 400, and that every namespace, uplink and listener is
//! gone after kill, expiry, a failed create, a restart and shutdown. Needs root, `nft` and `ip`.

#[path = "../../cli/tests/fake_vmm/vmm.rs"]
mod fake_vmm;
#[path = "common/host_net.rs"]
mod host_net;
#[path = "common/kilnd_daemon.rs"]
mod kilnd_daemon;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use host_net::{gone, refs, uplinks};
use kilnd_daemon::Daemon;
use std::time::{Duration, Instant};

use base64::Engine;
use kiln_pool::client::{ClientError, Kilnd};
use kiln_pool::template::spec::Spec;
use kiln_pool::types::{
    BuildEvent, CreateSandbox, ExecEvent, ExecRequest, NetworkRequest, PoolSettings, PortRequest,
    SandboxState,
};

fn main() {
    fake_vmm::main(&[("kilnd_gives_each_vm_a_network_of_its_own", networks)]);
}

/// A kilnd on `dir/state`, its log in `dir/kilnd.log`, the stand-in VMM's API requests in
/// `dir/vmm-api.log`.
fn start_kilnd(dir: &Path) -> Daemon {
    let mut cmd = kilnd_daemon::command(dir);
    cmd.args(["--max-vms", "8", "--default-timeout", "300"])
        .env("KILN_FAKE_VMM_API_LOG", dir.join("vmm-api.log"));
    Daemon::spawn(dir, cmd)
}

/// Runs `script` with `sh -c` in sandbox `id`: its stdout; panics unless it exits 0.
fn sh(k: &Kilnd, id: &str, script: &str) -> String {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let b64 = base64::engine::general_purpose::STANDARD;
    let last = k
        .exec(
            id,
            &ExecRequest {
                argv: vec!["sh".into(), "-c".into(), script.into()],
                timeout_ms: Some(30_000),
                ..Default::default()
            },
            |ev| match ev {
                ExecEvent::Stdout { data_b64 } => out.extend(b64.decode(data_b64).unwrap()),
                ExecEvent::Stderr { data_b64 } => err.extend(b64.decode(data_b64).unwrap()),
                _ => {}
            },
        )
        .unwrap();
    assert!(
        matches!(
            last,
            ExecEvent::Exit {
                exit_code: Some(0),
                ..
            }
        ),
        "{script}: {last:?}; stderr: {}",
        String::from_utf8_lossy(&err)
    );
    String::from_utf8(out).unwrap()
}

/// Asks the sandbox's resolver (on the gateway, in its namespace) for `name`: the answer's
/// response code (3 is NXDOMAIN).
fn resolve(k: &Kilnd, id: &str, name: &str) -> String {
    let script = format!(
        r#"python3 -c '
import socket, struct
q = struct.pack(">HHHHHH", 7, 0x100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in "{name}".split(".")) + b"\0"
q += struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(q, ("172.16.0.1", 53))
print(s.recv(512)[3] & 15)
'"#
    );
    sh(k, id, &script).trim().to_string()
}

/// What a user sees of a sandbox's network namespace from inside it: its namespace, links and
/// ruleset.
struct Inside {
    ns: String,
    links: String,
    ruleset: String,
}

fn inside(k: &Kilnd, id: &str) -> Inside {
    Inside {
        ns: sh(k, id, "readlink /proc/self/ns/net").trim().to_string(),
        links: sh(k, id, "cat /proc/net/dev"),
        ruleset: sh(k, id, "nft list ruleset"),
    }
}

fn status(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Api { status, message } => (status, message),
        other => panic!("{other}"),
    }
}

fn create(k: &Kilnd, network: Option<NetworkRequest>) -> Result<String, ClientError> {
    k.create(&CreateSandbox {
        template: "t".into(),
        network,
        ..Default::default()
    })
    .map(|s| s.id)
}

fn policy(domains: &[&str], allow_net: bool) -> NetworkRequest {
    NetworkRequest {
        allow_domains: Some(domains.iter().map(|s| s.to_string()).collect()),
        allow_net: Some(allow_net),
        publish: Vec::new(),
    }
}

fn ports(guest: &[u16]) -> NetworkRequest {
    NetworkRequest {
        publish: guest
            .iter()
            .map(|&guest_port| PortRequest {
                guest_port,
                host_port: None,
            })
            .collect(),
        ..Default::default()
    }
}

/// Starts a server in sandbox `id` on its loopback port `port` that answers `hello` to every
/// connection; returns its pid (its socket would keep the namespace alive: kill it after).
fn serve(k: &Kilnd, id: &str, port: u16) -> String {
    let script = format!(
        r#"setsid python3 -c '
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", {port}))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(b"hello from port {port}\n")
    c.close()
' </dev/null >/dev/null 2>&1 & echo $!"#
    );
    sh(k, id, &script).trim().to_string()
}

/// What the published host port `port` answers (retried while the server starts).
fn fetch(port: u16) -> String {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let got = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut s = String::new();
            c.read_to_string(&mut s)?;
            Ok(s)
        });
        match got {
            Ok(s) if !s.is_empty() => return s,
            _ if Instant::now() > end => panic!("nothing answered on 127.0.0.1:{port}: {got:?}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn log_has(dir: &Path, pred: impl Fn(&str) -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(dir.join("kilnd.log")).unwrap_or_default();
        if log.lines().any(&pred) {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn networks() {
    let _ = OTHERS.set(fake_vmms());
    let _cleanup = KillVmms;
    let dir = std::env::temp_dir().join(format!("kilnd-net-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tree/etc")).unwrap();
    std::fs::write(dir.join("vmlinux"), "kernel").unwrap();
    std::fs::write(dir.join("agent"), vec![0x7f; 4096]).unwrap();
    let out = dir.display().to_string();
    let host_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
    let d = start_kilnd(&dir);
    let k = d.client();

    // A template whose build may reach one domain and whose sandboxes another, by default. Its
    // build step runs in the build VM's namespace, with the TAP the VM's eth0 is on.
    let spec = Spec::parse(&format!(
        r#"name = "t"
run = ['cat /proc/net/dev > "{out}/build-links"; nft list ruleset > "{out}/build-rules"']
[from]
dir = "{out}/tree"
[build]
allow_domains = ["deb.debian.org"]
[network]
allow_domains = ["pypi.org"]
"#
    ))
    .unwrap();
    let last = k.build(&spec, |_| {}).unwrap();
    let BuildEvent::Done { template, .. } = last else {
        panic!("{last:?}")
    };
    let build_links = std::fs::read_to_string(dir.join("build-links")).unwrap();
    assert!(build_links.contains("kiln0:"), "{build_links}");
    let build_rules = std::fs::read_to_string(dir.join("build-rules")).unwrap();
    assert!(
        build_rules.contains("table inet kiln") && build_rules.contains("redirect to :15001"),
        "{build_rules}"
    );
    assert!(
        dir.join("state/templates")
            .join(&template.id)
            .join("nic")
            .exists()
    );
    // The template VM was booted with eth0 on the TAP, so its snapshot has the interface.
    let api = std::fs::read_to_string(dir.join("vmm-api.log")).unwrap();
    assert!(
        api.contains(r#"PUT /network-interfaces {"iface_id":"eth0","host_dev_name":"kiln0""#),
        "{api}"
    );

    // A sandbox with the template's default policy: a namespace of its own, with the TAP, the
    // rules of a domain allowlist (DNS to the resolver, TCP to the proxy), restored onto its TAP.
    let a = create(&k, Some(ports(&[8080]))).unwrap();
    let info = k.sandbox(&a).unwrap();
    assert_eq!(
        (info.network.allow_domains.clone(), info.network.allow_net),
        (vec!["pypi.org".to_string()], false)
    );
    assert_eq!(info.network.address.as_deref(), Some("172.16.0.2"));
    let a_in = inside(&k, &a);
    assert_ne!(a_in.ns, host_ns.to_string_lossy(), "its own namespace");
    assert!(a_in.links.contains("kiln0:"), "{}", a_in.links);
    assert!(
        a_in.ruleset.contains("table inet kiln")
            && a_in.ruleset.contains("redirect to :15001")
            && a_in.ruleset.contains("udp dport 53 redirect to :53")
            && !a_in.ruleset.contains("masquerade"),
        "{}",
        a_in.ruleset
    );
    let api = std::fs::read_to_string(dir.join("vmm-api.log")).unwrap();
    assert!(
        api.contains(r#""network_overrides":[{"iface_id":"eth0","host_dev_name":"kiln0"}]"#),
        "{api}"
    );
    // The build recorded the template's working set once, and the sandbox's load maps it in.
    assert_eq!(api.matches("PUT /snapshot/working-set").count(), 1, "{api}");
    let sandbox_load = api
        .lines()
        .rfind(|l| l.starts_with("PUT /snapshot/load"))
        .unwrap();
    assert!(
        sandbox_load.contains(r#""working_set_path":"#)
            && sandbox_load.contains("working-set.json"),
        "{sandbox_load}"
    );
    // Its resolver answers on the gateway and refuses a name it was not allowed; the refusal is
    // in kilnd's log with the sandbox's id, and counted in its info.
    assert_eq!(resolve(&k, &a, "blocked.test"), "3", "NXDOMAIN");
    assert!(
        log_has(&dir, |l| l.contains(&format!("sandbox={a}"))
            && l.contains("network refused dns blocked.test")),
        "no refusal in kilnd's log"
    );
    assert!(k.sandbox(&a).unwrap().network.refused >= 1);
    // Its published port reaches a server on the guest's loopback, through the agent.
    let a_port = info.network.published[0].host_port;
    assert_eq!(info.network.published[0].guest_port, 8080);
    let a_server = serve(&k, &a, 8080);
    assert_eq!(fetch(a_port), "hello from port 8080\n");

    // A sandbox with the net allowed: routed out through an uplink veth, masqueraded.
    let before = uplinks();
    let b = create(&k, Some(policy(&[], true))).unwrap();
    let b_in = inside(&k, &b);
    assert!(b_in.links.contains("uplink0:"), "{}", b_in.links);
    assert!(b_in.ruleset.contains("masquerade"), "{}", b_in.ruleset);
    assert!(!b_in.ruleset.contains("redirect to :15001"), "no proxy");
    let b_uplink: Vec<String> = uplinks()
        .into_iter()
        .filter(|l| !before.contains(l))
        .collect();
    assert_eq!(b_uplink.len(), 1, "{b_uplink:?}");
    assert_ne!(a_in.ns, b_in.ns);

    // Bad policies and ports are refused with a 400 naming the field, and leave nothing.
    let refusals = [
        (
            policy(&["exa mple.com"], false),
            "network.allow_domains: \"exa mple.com\" is not",
        ),
        (policy(&["a.io"], true), "network.allow_net: "),
        (
            policy(&["*.com"], false),
            "network.allow_domains: \"*.com\" would allow",
        ),
        (
            NetworkRequest {
                publish: vec![PortRequest {
                    guest_port: 80,
                    host_port: Some(a_port),
                }],
                ..Default::default()
            },
            "network.publish ",
        ),
    ];
    let vmms_before = fake_vmms();
    for (req, named) in refusals {
        let (code, msg) = status(create(&k, Some(req)).unwrap_err());
        assert!(code == 400 && msg.starts_with(named), "{code} {msg}");
    }
    // The last one got as far as a VM with its network: both are gone again.
    wait_until("the failed create's VMM is gone", || {
        fake_vmms() == vmms_before
    });
    // Warm VMs have the template's default policy: a create asking for it gets one, a create
    // asking for another is restored on demand.
    k.set_pool(
        "t",
        &PoolSettings {
            min_ready: 1,
            max_sandboxes: 0,
        },
    )
    .unwrap();
    wait_until("a warm VM", || k.templates().unwrap()[0].ready == 1);
    let w = create(&k, None).unwrap();
    assert!(
        log_has(&dir, |l| l.contains(&format!("sandbox={w}"))
            && l.contains("warm=true")),
        "the default policy is served warm"
    );
    wait_until("the pool refilled", || k.templates().unwrap()[0].ready == 1);
    // A warm VM whose handout fails (the host port asked for is taken) is ended and forgotten:
    // once the pool has refilled, kilnd's database holds one warm VM, not a dead one beside it.
    let taken = NetworkRequest {
        publish: vec![PortRequest {
            guest_port: 80,
            host_port: Some(a_port),
        }],
        ..Default::default()
    };
    let (code, msg) = status(create(&k, Some(taken)).unwrap_err());
    assert!(
        code == 400 && msg.starts_with("network.publish "),
        "{code} {msg}"
    );
    wait_until("the pool refilled", || k.templates().unwrap()[0].ready == 1);
    let db = kiln_pool::db::Db::open(&dir.join("state/kilnd.db")).unwrap();
    let warm_rows: Vec<_> = db
        .sandboxes()
        .unwrap()
        .into_iter()
        .filter(|r| r.state == "warm")
        .map(|r| r.id)
        .collect();
    drop(db);
    assert_eq!(warm_rows.len(), 1, "warm VM records: {warm_rows:?}");
    let c = create(&k, Some(policy(&[], false))).unwrap();
    assert!(
        log_has(&dir, |l| l.contains(&format!("sandbox={c}"))
            && l.contains("warm=false")),
        "another policy is restored on demand"
    );
    assert!(inside(&k, &c).ruleset.contains("table inet kiln"));
    k.set_pool(
        "t",
        &PoolSettings {
            min_ready: 0,
            max_sandboxes: 0,
        },
    )
    .unwrap();

    // Kill and expiry take the namespace, its uplink and its listeners with the VM.
    let w_ns = inside(&k, &w).ns;
    k.kill(&w).unwrap();
    gone("kill", &w_ns, &[], &[]);
    let b_ns = b_in.ns.clone();
    k.set_timeout(&b, 1).unwrap();
    wait_until("the sandbox to expire", || k.sandbox(&b).is_err());
    gone("expiry", &b_ns, &[], &b_uplink);
    let c_ns = inside(&k, &c).ns;
    k.kill(&c).unwrap();
    gone("kill", &c_ns, &[], &[]);

    // A fork: a network of its own with the original's policy, its ports on host ports of its
    // own.
    let forks = k.fork(&a, 1).unwrap();
    let f = &forks[0];
    assert_eq!(f.network.allow_domains, ["pypi.org"]);
    let f_port = f.network.published[0].host_port;
    assert_ne!(f_port, a_port);
    let f_in = inside(&k, &f.id);
    assert_ne!(f_in.ns, a_in.ns);
    assert!(f_in.links.contains("kiln0:"));
    let f_server = serve(&k, &f.id, 8080);
    assert_eq!(fetch(f_port), "hello from port 8080\n");
    sh(&k, &f.id, &format!("kill {f_server}"));
    k.kill(&f.id).unwrap();
    gone("a fork's kill", &f_in.ns, &[f_port], &[]);

    // Pause ends the VM and its network; resume makes a new one with the same policy and its
    // port on the same host port.
    sh(&k, &a, &format!("kill {a_server}"));
    let paused = k.pause(&a).unwrap();
    assert_eq!(paused.state, SandboxState::Paused);
    assert!(paused.network.published.is_empty());
    assert_eq!(paused.network.allow_domains, ["pypi.org"]);
    gone("pause", &a_in.ns, &[a_port], &[]);
    let resumed = k.resume(&a).unwrap();
    assert_eq!(resumed.network.allow_domains, ["pypi.org"]);
    assert_eq!(resumed.network.published[0].host_port, a_port);
    let a_in = inside(&k, &a);
    assert!(a_in.ruleset.contains("redirect to :15001"));
    let a_server = serve(&k, &a, 8080);
    assert_eq!(fetch(a_port), "hello from port 8080\n");

    // After a SIGKILL of kilnd, the sandbox runs on in its namespace (held by its VMM alone),
    // with no resolver; the next kilnd adopts the namespace and starts its resolver, proxy and
    // listeners again.
    drop(d);
    assert!(refs(&a_in.ns) > 0, "the VMM keeps its namespace");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", a_port)).is_err(),
        "the listener died with kilnd"
    );
    let d = start_kilnd(&dir);
    let k = d.client();
    let adopted = k.sandbox(&a).unwrap();
    assert_eq!(adopted.network.published[0].host_port, a_port);
    assert_eq!(inside(&k, &a).ns, a_in.ns, "the same namespace");
    assert_eq!(
        resolve(&k, &a, "blocked.test"),
        "3",
        "the resolver answers again"
    );
    assert_eq!(fetch(a_port), "hello from port 8080\n");
    sh(&k, &a, &format!("kill {a_server}"));

    // A namespace that lost its rules while kilnd was down cannot be adopted cleanly: the
    // sandbox is killed, and kilnd's log says why.
    let e = create(&k, None).unwrap();
    let e_ns = inside(&k, &e).ns;
    let e_vmm: u32 = sh(&k, &e, "echo $PPID").trim().parse().unwrap();
    drop(d);
    let broken = kiln_net::netns::NetNs::of_process(e_vmm)
        .unwrap()
        .run(|| {
            Command::new("nft")
                .args(["delete", "table", "inet", "kiln"])
                .status()
        })
        .unwrap()
        .unwrap();
    assert!(broken.success());
    let d = start_kilnd(&dir);
    let k = d.client();
    assert!(
        k.sandbox(&e).is_err(),
        "the sandbox with a broken network was killed"
    );
    assert!(
        log_has(&dir, |l| l.contains(&format!("sandbox={e}"))
            && l.contains("cannot adopt it, so it is killed")
            && l.contains("no nftables table kiln")),
        "kilnd's log says why"
    );
    gone("a failed adoption", &e_ns, &[], &[]);
    assert_eq!(
        resolve(&k, &a, "blocked.test"),
        "3",
        "the other was adopted"
    );

    // kilnd's stop (SIGTERM) ends the VMs it still holds, warm ones and sandboxes, and their
    // networks and listeners go with them.
    k.set_pool(
        "t",
        &PoolSettings {
            min_ready: 1,
            max_sandboxes: 0,
        },
    )
    .unwrap();
    wait_until("a warm VM", || k.templates().unwrap()[0].ready == 1);
    let warm_vmms = fake_vmms();
    let warm_ns: Vec<String> = warm_vmms
        .iter()
        .filter_map(|p| std::fs::read_link(format!("/proc/{p}/ns/net")).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|ns| *ns != a_in.ns)
        .collect();
    assert_eq!(
        warm_ns.len(),
        1,
        "the warm VM's namespace: {warm_ns:?} of {warm_vmms:?}; {:?}",
        k.sandboxes().unwrap()
    );
    d.stop();
    gone("shutdown", &a_in.ns, &[a_port], &[]);
    for ns in &warm_ns {
        gone("shutdown", ns, &[], &[]);
    }
    assert!(fake_vmms().is_empty(), "VMMs left: {:?}", fake_vmms());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stand-in VMMs that were running before this test (another run's), left out of its counts.
static OTHERS: std::sync::OnceLock<BTreeSet<u32>> = std::sync::OnceLock::new();

/// The stand-in VMMs this test's kilnds started that run now (this binary, but not this
/// process).
fn fake_vmms() -> BTreeSet<u32> {
    let me = std::env::current_exe().unwrap();
    let mine = std::process::id();
    let others = OTHERS.get().cloned().unwrap_or_default();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != mine && !others.contains(pid))
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == me))
        .collect()
}

/// Kills the stand-in VMMs this test started when it ends, failed or not (a killed kilnd
/// leaves its VMMs running, as it should).
struct KillVmms;

impl Drop for KillVmms {
    fn drop(&mut self) {
        for pid in fake_vmms() {
            // SAFETY: kill(2) with a pid and a signal touches no memory.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
