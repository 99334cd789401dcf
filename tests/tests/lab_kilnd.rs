//! kilnd with real Linux guests, inside the lab: both bundled templates build (and rebuild as a
//! cache hit); a template from an OCI layout made here keeps its files, owners and modes; 20
//! sandboxes of one template are each their own machine, with a copy-on-write root disk each
//! (their writes land in their own overlay files, never in the template's image or overlay), and
//! a `disk = "tmpfs"` template keeps writes in guest memory; forks of a sandbox running a Python
//! process share its state up to the fork and nothing after; a paused sandbox survives kilnd being
//! SIGKILLed; expiry ends a sandbox; the host limit refuses the 51st VM when it is 50. Sandboxes
//! have networks: one allowed a domain of a small internet in L1 (`kiln_tests::fakenet`) reaches
//! it by name and nothing else, one with the template's default policy reaches nothing.
//!
//! One kilnd serves all of it (its state on the lab's work disk), so templates are built once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use kiln_pool::client::{ClientError, Kilnd};
use kiln_pool::template::spec::Spec;
use kiln_pool::types::{
    BuildEvent, CreateSandbox, ExecEvent, ExecRequest, NetworkRequest, SandboxState,
};
use kiln_tests::file_sha256;

/// Bytes of data (not holes) in a sparse file.
fn data_bytes(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    kiln_snapshot::data_ranges(&f, path)
        .unwrap()
        .iter()
        .map(|r| r.end - r.start)
        .sum()
}

/// Whether the data of the sparse file at `path` holds `needle`.
fn data_holds(path: &Path, needle: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    kiln_snapshot::data_ranges(&f, path)
        .unwrap()
        .iter()
        .any(|r| {
            let mut buf = vec![0u8; (r.end - r.start) as usize];
            f.read_exact_at(&mut buf, r.start).unwrap();
            buf.windows(needle.len()).any(|w| w == needle)
        })
}

/// kilnd started on a state folder, stopped with SIGKILL when dropped.
struct Daemon {
    child: Child,
    sock: PathBuf,
}

fn start_kilnd(state: &Path) -> Daemon {
    let sock = state.join("kilnd.sock");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.with_extension("log"))
        .unwrap();
    let child = Command::new("kilnd")
        .arg("--state-dir")
        .arg(state)
        .args(["--max-vms", "50", "--refill-concurrency", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start kilnd");
    let end = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < end,
            "kilnd did not listen; see {}",
            state.with_extension("log").display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Daemon { child, sock }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The jail kilnd runs the VM of the sandbox folder `dir` in: `vm-` and the first 10 bytes of
/// the folder path's SHA-256, in hex (kiln_pool::jail::jail_id).
fn jail_id(dir: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    let hex: String = digest[..10].iter().map(|b| format!("{b:02x}")).collect();
    format!("vm-{hex}")
}

/// The VMM of sandbox `id` (found by its cgroup, `kiln/<jail id>`) and its uid.
fn vmm_of(state: &Path, id: &str) -> Option<(u32, u32)> {
    let cgroup = format!("/kiln/{}\n", jail_id(&state.join("sandboxes").join(id)));
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let groups = std::fs::read_to_string(e.path().join("cgroup")).ok()?;
        if !groups.contains(&cgroup) {
            return None;
        }
        let status = std::fs::read_to_string(e.path().join("status")).ok()?;
        // A zombie (dead, not yet reaped by whoever inherited it) is not a running VMM.
        if status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains("zombie"))
        {
            return None;
        }
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some((pid, uid))
    })
}

/// The state folder of the kilnd under test, for diagnostics.
static STATE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The last `n` lines of `path`, or why there are none.
fn tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// What kilnd says of sandbox `id`, its VMM's stderr and kilnd's log, for a failure message.
fn what_went_on(k: &Kilnd, id: &str) -> String {
    let Some(state) = STATE.get() else {
        return String::new();
    };
    let jail = state
        .join("jail/kiln-vmm")
        .join(jail_id(&state.join("sandboxes").join(id)))
        .join("root");
    // L1's kernel log (an OOM kill, a KVM complaint) from its ring buffer.
    let kernel = std::process::Command::new("dmesg")
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        })
        .unwrap_or_else(|e| format!("(dmesg: {e})"));
    format!(
        "sandbox {id}: {:?}\n-- its VMM's stderr:\n{}\n-- its console:\n{}\n-- kilnd's log:\n{}\n-- L1's kernel log:\n{kernel}",
        k.sandbox(id).map(|s| s.state),
        tail(&state.join("sandboxes").join(id).join("vmm.stderr"), 20),
        tail(&jail.join("console.log"), 20),
        tail(&state.with_extension("log"), 30),
    )
}

/// Runs `script` with `sh -c` in sandbox `id`: its stdout; panics unless it exits 0.
fn sh(k: &Kilnd, id: &str, script: &str) -> String {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let last = k
        .exec(
            id,
            &ExecRequest {
                argv: vec!["sh".into(), "-c".into(), script.into()],
                timeout_ms: Some(120_000),
                ..Default::default()
            },
            |ev| match ev {
                ExecEvent::Stdout { data_b64 } => out.extend(
                    base64::engine::general_purpose::STANDARD
                        .decode(data_b64)
                        .unwrap(),
                ),
                ExecEvent::Stderr { data_b64 } => err.extend(
                    base64::engine::general_purpose::STANDARD
                        .decode(data_b64)
                        .unwrap(),
                ),
                _ => {}
            },
        )
        .unwrap_or_else(|e| panic!("{script}: {e}\n{}", what_went_on(k, id)));
    assert!(
        matches!(
            last,
            ExecEvent::Exit {
                exit_code: Some(0),
                ..
            }
        ),
        "{script}: {last:?}; stderr: {}\n{}",
        String::from_utf8_lossy(&err),
        what_went_on(k, id)
    );
    String::from_utf8(out).unwrap()
}

fn build(k: &Kilnd, spec: &Spec) -> (String, bool) {
    match k.build(spec, |ev| {
        if let BuildEvent::Step { name } = ev {
            eprintln!("build {}: {name}", spec.name);
        }
    }) {
        Ok(BuildEvent::Done { template, cached }) => (template.id, cached),
        other => panic!("building {}: {other:?}", spec.name),
    }
}

fn create(k: &Kilnd, template: &str) -> String {
    k.create(&CreateSandbox {
        template: template.into(),
        timeout_s: Some(1800),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("create from {template}: {e}"))
    .id
}

/// What a guest reaches of the small internet, as JSON: each probe's answer or `error: ...`.
const NET_PROBE: &str = r#"
import json, socket
def tcp(host, port, send=b""):
    try:
        s = socket.create_connection((host, port), timeout=8)
        s.sendall(send)
        d = b""
        while True:
            c = s.recv(4096)
            if not c:
                break
            d += c
        return d.decode(errors="replace")
    except Exception as e:
        return "error: %s: %s" % (type(e).__name__, e)
def resolve(name):
    try:
        return socket.gethostbyname(name)
    except Exception as e:
        return "error: %s" % e
def get(host, name):
    return tcp(host, 80, ("GET / HTTP/1.0\r\nHost: %s\r\n\r\n" % name).encode())
print(json.dumps({
    "allowed_ip": resolve("allowed.test"),
    "allowed_http": get("allowed.test", "allowed.test"),
    "blocked_ip": resolve("blocked.test"),
    "blocked_literal": get("203.0.113.20", "blocked.test"),
    "allowed_literal": get("203.0.113.10", "allowed.test"),
    "allowed_ssh": tcp("203.0.113.10", 22),
}))
"#;

/// Runs [`NET_PROBE`] in sandbox `id`: what it reached.
fn probe_net(k: &Kilnd, id: &str) -> serde_json::Value {
    k.write_file(id, "/tmp/net-probe.py", NET_PROBE.as_bytes())
        .unwrap();
    let out = sh(k, id, "python3 /tmp/net-probe.py");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Whether a probe failed (an error, nothing, or the proxy's refusal), never reaching a server.
fn unreached(v: &serde_json::Value, key: &str) -> bool {
    let got = v[key].as_str().unwrap_or_default();
    !got.contains("hello from") && !got.contains("SSH-2.0") && !got.starts_with("203.0.113.")
}

/// A Python process holding `x` in memory, served on a Unix socket: `get` and `set N`.
const HOLDER: &str = r#"setsid python3 -c '
import os, socket
x = 41
s = socket.socket(socket.AF_UNIX)
s.bind("/tmp/holder.sock")
s.listen()
while True:
    c, _ = s.accept()
    cmd = c.recv(100).decode()
    if cmd.startswith("set "):
        x = int(cmd[4:])
    c.send(str(x).encode())
    c.close()
' </dev/null >/dev/null 2>&1 &
while [ ! -S /tmp/holder.sock ]; do sleep 0.05; done"#;

fn holder(k: &Kilnd, id: &str, cmd: &str) -> String {
    sh(
        k,
        id,
        &format!(
            "python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.connect(\"/tmp/holder.sock\"); s.send(b\"{cmd}\"); print(s.recv(100).decode())'"
        ),
    )
    .trim()
    .to_string()
}

/// An OCI layout with two layers: busybox (so the guest has a shell) and a few files, then a
/// layer whiting one out and adding a setuid file owned by 1000:1000.
fn oci_layout(dir: &Path) {
    use sha2::{Digest, Sha256};
    let layer = |items: &[(&str, Vec<u8>, u32, u64)]| {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data, mode, owner) in items {
            let mut h = tar::Header::new_gnu();
            h.set_mode(*mode);
            h.set_uid(*owner);
            h.set_gid(*owner);
            h.set_mtime(1_700_000_000);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    };
    let busybox = std::fs::read("/bin/busybox").expect("L1's busybox");
    let lower = layer(&[
        ("bin/sh", busybox, 0o755, 0),
        ("etc/keep", b"kept\n".to_vec(), 0o644, 0),
        ("etc/gone", b"x".to_vec(), 0o644, 0),
    ]);
    let upper = layer(&[
        ("etc/.wh.gone", Vec::new(), 0o644, 0),
        (
            "home/user/tool",
            b"#!/bin/sh\necho tool\n".to_vec(),
            0o4755,
            1000,
        ),
    ]);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8], media: &str| {
        let hex = format!("{:x}", Sha256::digest(data));
        std::fs::write(blobs.join(&hex), data).unwrap();
        serde_json::json!({"mediaType": media, "digest": format!("sha256:{hex}"), "size": data.len()})
    };
    let layers = vec![
        put(&lower, "application/vnd.oci.image.layer.v1.tar"),
        put(&upper, "application/vnd.oci.image.layer.v1.tar"),
    ];
    let config = put(b"{}", "application/vnd.oci.image.config.v1+json");
    let manifest = serde_json::json!({"schemaVersion": 2, "config": config, "layers": layers});
    let m = put(
        manifest.to_string().as_bytes(),
        "application/vnd.oci.image.manifest.v1+json",
    );
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        serde_json::json!({"schemaVersion": 2, "manifests": [m]}).to_string(),
    )
    .unwrap();
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn kilnd_serves_templates_and_sandboxes() {
    // The lab's work disk, not /tmp (a tmpfs in L1's memory): templates are hundreds of MiB.
    let root = kiln_tests::lab_dir().join("kilnd-test");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let state = root.join("state");
    let _ = STATE.set(state.clone());
    let d = start_kilnd(&state);
    let k = Kilnd::new(&d.sock);

    // Both bundled templates; the second build of each is a cache hit.
    let examples = kiln_tests::lab_dir().join("examples");
    let base = Spec::load(&examples.join("base.toml")).unwrap();
    let python = Spec::load(&examples.join("python.toml")).unwrap();
    let (base_id, cached) = build(&k, &base);
    assert!(!cached);
    build(&k, &python);
    assert_eq!(build(&k, &base), (base_id.clone(), true));
    assert!(build(&k, &python).1, "a second build is a cache hit");

    // The python template has numpy and pandas.
    let p = create(&k, "python");
    assert_eq!(
        sh(
            &k,
            &p,
            "python3 -c 'import numpy, pandas; print(numpy.arange(4).sum(), pandas.Series([1, 2]).sum())'"
        ),
        "6 3\n"
    );
    k.kill(&p).unwrap();

    // Sandbox networks, against a small internet in L1 (its name server in L1's resolv.conf,
    // which kilnd's per-sandbox resolvers ask). One allowed `allowed.test` resolves it and
    // reaches it by name (through kilnd's proxy) and nothing else: not `blocked.test`, not an
    // address literal, not another port; every refusal counted in its info. One with the base
    // template's default policy (none) reaches nothing at all.
    {
        use kiln_tests::fakenet::{ALLOWED, ALLOWED_IP, FakeInternet};
        let _internet = FakeInternet::start();
        let allowed = k
            .create(&CreateSandbox {
                template: "base".into(),
                timeout_s: Some(900),
                network: Some(NetworkRequest {
                    allow_domains: Some(vec![ALLOWED.into()]),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("a sandbox allowed {ALLOWED}: {e}"));
        assert_eq!(allowed.network.allow_domains, [ALLOWED]);
        assert_eq!(allowed.network.address.as_deref(), Some("172.16.0.2"));
        let got = probe_net(&k, &allowed.id);
        assert_eq!(got["allowed_ip"], ALLOWED_IP.to_string(), "{got}");
        assert!(
            got["allowed_http"]
                .as_str()
                .unwrap_or_default()
                .ends_with("hello from 203.0.113.10 host=allowed.test"),
            "{got}\n{}",
            what_went_on(&k, &allowed.id)
        );
        for refused in ["blocked_ip", "blocked_literal", "allowed_ssh"] {
            assert!(unreached(&got, refused), "{refused}: {got}");
        }
        assert!(
            k.sandbox(&allowed.id).unwrap().network.refused >= 3,
            "the refusals are counted: {:?}",
            k.sandbox(&allowed.id).unwrap().network
        );
        let none = create(&k, "base");
        let info = k.sandbox(&none).unwrap();
        assert!(info.network.allow_domains.is_empty() && !info.network.allow_net);
        let got = probe_net(&k, &none);
        for key in [
            "allowed_ip",
            "allowed_http",
            "blocked_ip",
            "blocked_literal",
            "allowed_literal",
            "allowed_ssh",
        ] {
            assert!(unreached(&got, key), "no egress, but {key}: {got}");
        }
        k.kill(&allowed.id).unwrap();
        k.kill(&none).unwrap();
    }

    // A template from an OCI layout keeps files, whiteouts, owners and modes.
    let layout = root.join("oci");
    oci_layout(&layout);
    let oci = Spec::parse(&format!(
        "name = \"oci\"\nmem_mib = 128\n[from]\noci = \"{}\"\n",
        layout.display()
    ))
    .unwrap();
    build(&k, &oci);
    let o = create(&k, "oci");
    assert_eq!(
        String::from_utf8(k.read_file(&o, "/etc/keep").unwrap()).unwrap(),
        "kept\n"
    );
    let etc: Vec<String> = k
        .list_dir(&o, "/etc")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(
        etc.contains(&"keep".to_string()) && !etc.contains(&"gone".to_string()),
        "{etc:?}"
    );
    let tool = k
        .list_dir(&o, "/home/user")
        .unwrap()
        .into_iter()
        .find(|e| e.name == "tool")
        .unwrap();
    assert_eq!((tool.mode, tool.uid, tool.gid), (0o4755, 1000, 1000));
    assert_eq!(sh(&k, &o, "/home/user/tool"), "tool\n");
    k.kill(&o).unwrap();

    // 20 sandboxes of one template: each its own machine; the template is never written.
    let image = state.join("templates").join(&base_id).join("rootfs.ext4");
    let template_overlay = image.with_file_name("rootfs.overlay");
    let image_sum = file_sha256(&image);
    let overlay_sum = file_sha256(&template_overlay);

    // What a sandbox's disk costs at creation: a sparse copy of the template's overlay, against
    // a sparse copy of the whole image (what a writable disk per sandbox costs without CoW).
    let scratch = root.join("copy-cost");
    std::fs::create_dir_all(&scratch).unwrap();
    let timed = |from: &Path, name: &str| {
        let start = Instant::now();
        // As kilnd copies an overlay (kiln_pool::disk::copy_sparse): data ranges only.
        let to = scratch.join(name);
        let src = std::fs::File::open(from).unwrap();
        let dst = std::fs::File::create(&to).unwrap();
        dst.set_len(src.metadata().unwrap().len()).unwrap();
        let ranges = kiln_snapshot::data_ranges(&src, from).unwrap();
        let n = kiln_snapshot::memfile::copy_ranges((&src, from), (&dst, &to), &ranges).unwrap();
        (n, start.elapsed())
    };
    let (image_bytes, image_took) = timed(&image, "image");
    let (overlay_bytes, overlay_took) = timed(&template_overlay, "overlay");
    println!(
        "a sandbox's root disk: CoW overlay copy {} KiB in {:?}; full image copy {} MiB in {:?} ({:.0}x the time)",
        overlay_bytes >> 10,
        overlay_took,
        image_bytes >> 20,
        image_took,
        image_took.as_secs_f64() / overlay_took.as_secs_f64().max(1e-6)
    );
    let _ = std::fs::remove_dir_all(&scratch);

    let ids: Vec<String> = (0..20).map(|_| create(&k, "base")).collect();
    let mut uuids = std::collections::BTreeSet::new();
    for (i, id) in ids.iter().enumerate() {
        let out = sh(
            &k,
            id,
            &format!(
                "echo {i} > /root/mine; echo {i} > /tmp/mine; python3 -c 'print({i} * 2)'; cat /proc/sys/kernel/random/uuid"
            ),
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], (i * 2).to_string());
        uuids.insert(lines[1].to_string());
    }
    assert_eq!(uuids.len(), 20, "every sandbox has its own random state");
    // Each VMM runs jailed: its own uid, chrooted into its jail, in a cgroup with its limits.
    let mut uids = std::collections::BTreeSet::new();
    for id in &ids {
        let (pid, uid) = vmm_of(&state, id).expect("a sandbox's VMM in its cgroup");
        assert!(uid >= 100_000, "sandbox {id}'s VMM runs as uid {uid}");
        uids.insert(uid);
        let jail = jail_id(&state.join("sandboxes").join(id));
        // Pivoted into the jail in its own mount namespace (so /proc/PID/root reads "/"): its
        // root is the jail's root folder.
        use std::os::unix::fs::MetadataExt;
        let seen = std::fs::metadata(format!("/proc/{pid}/root/")).unwrap();
        let root = std::fs::metadata(state.join("jail/kiln-vmm").join(&jail).join("root")).unwrap();
        assert_eq!(
            (seen.dev(), seen.ino()),
            (root.dev(), root.ino()),
            "sandbox {id}'s VMM is chrooted in its jail"
        );
        let max =
            std::fs::read_to_string(format!("/sys/fs/cgroup/kiln/{jail}/memory.max")).unwrap();
        assert_eq!(max.trim(), ((256u64 + 128) << 20).to_string(), "memory.max");
    }
    assert_eq!(uids.len(), 20, "every VMM has a uid of its own");
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            sh(&k, id, "cat /root/mine /tmp/mine"),
            format!("{i}\n{i}\n"),
            "only its own writes"
        );
    }
    // The root is the ext4 disk itself, written through the sandbox's own overlay on the host: a
    // file under / in one sandbox is in its overlay file and in no other sandbox.
    let marker = |i: usize| format!("kiln-cow-marker-{i}-{}", "x".repeat(40));
    for (i, id) in ids.iter().take(2).enumerate() {
        assert_eq!(
            sh(&k, id, "stat -f -c %T /"),
            "ext2/ext3\n",
            "the root is the disk"
        );
        sh(&k, id, &format!("echo {} > /only-{i}; sync", marker(i)));
    }
    assert_eq!(
        sh(&k, &ids[1], "cat /only-1; test -e /only-0 || echo absent"),
        format!("{}\nabsent\n", marker(1))
    );
    assert_eq!(
        sh(&k, &ids[0], "test -e /only-1 || echo absent"),
        "absent\n"
    );
    let sandbox_overlay = |id: &str| state.join("sandboxes").join(id).join("rootfs.overlay");
    assert!(data_holds(&sandbox_overlay(&ids[0]), marker(0).as_bytes()));
    assert!(!data_holds(&sandbox_overlay(&ids[0]), marker(1).as_bytes()));
    assert!(data_holds(&sandbox_overlay(&ids[1]), marker(1).as_bytes()));
    println!(
        "template overlay {} KiB of data; a sandbox's after its writes {} KiB; image {} MiB",
        data_bytes(&template_overlay) >> 10,
        data_bytes(&sandbox_overlay(&ids[0])) >> 10,
        std::fs::metadata(&image).unwrap().len() >> 20
    );
    for id in &ids {
        k.kill(id).unwrap();
    }
    assert_eq!(
        file_sha256(&image),
        image_sum,
        "the template's image is unchanged"
    );
    assert_eq!(
        file_sha256(&template_overlay),
        overlay_sum,
        "the template's overlay is unchanged"
    );
    assert!(!data_holds(&template_overlay, marker(0).as_bytes()));

    // A `disk = "tmpfs"` template: the root is the image read-only under a tmpfs overlay, writes
    // stay in guest memory and no overlay file is made on the host.
    let mut tmpfs = base.clone();
    tmpfs.name = "base-tmpfs".into();
    tmpfs.disk = kiln_pool::template::spec::DiskMode::Tmpfs;
    let (tmpfs_id, _) = build(&k, &tmpfs);
    assert!(
        !state
            .join("templates")
            .join(&tmpfs_id)
            .join("rootfs.overlay")
            .exists()
    );
    let t = create(&k, "base-tmpfs");
    assert_eq!(sh(&k, &t, "stat -f -c %T /"), "overlayfs\n");
    assert_eq!(sh(&k, &t, "echo t > /root/mine; cat /root/mine"), "t\n");
    assert!(
        !state
            .join("sandboxes")
            .join(&t)
            .join("rootfs.overlay")
            .exists()
    );
    k.kill(&t).unwrap();

    // Forks of a sandbox holding a Python variable: they see it, and their changes stay theirs.
    let orig = create(&k, "base");
    sh(&k, &orig, HOLDER);
    assert_eq!(holder(&k, &orig, "set 42"), "42");
    sh(&k, &orig, "echo before > /root/fork-disk");
    let forks = k.fork(&orig, 2).unwrap();
    // The disk forks too: each fork has the original's file, and what one writes is its own.
    sh(&k, &forks[0].id, "echo fork0 > /root/fork-disk");
    assert_eq!(sh(&k, &forks[1].id, "cat /root/fork-disk"), "before\n");
    assert_eq!(sh(&k, &forks[0].id, "cat /root/fork-disk"), "fork0\n");
    assert_eq!(sh(&k, &orig, "cat /root/fork-disk"), "before\n");
    assert_eq!(holder(&k, &forks[0].id, "get"), "42");
    assert_eq!(holder(&k, &forks[0].id, "set 100"), "100");
    assert_eq!(holder(&k, &forks[1].id, "get"), "42");
    assert_eq!(holder(&k, &orig, "get"), "42");
    assert_ne!(
        sh(&k, &forks[0].id, "cat /proc/sys/kernel/random/uuid"),
        sh(&k, &forks[1].id, "cat /proc/sys/kernel/random/uuid")
    );

    // Pause to disk, SIGKILL kilnd, start it again: the paused sandbox resumes with its state.
    sh(&k, &orig, "echo paused > /root/pause-disk");
    assert_eq!(k.pause(&orig).unwrap().state, SandboxState::Paused);
    drop(d);
    let d = start_kilnd(&state);
    let k = Kilnd::new(&d.sock);
    assert_eq!(k.sandbox(&orig).unwrap().state, SandboxState::Paused);
    assert_eq!(k.resume(&orig).unwrap().state, SandboxState::Running);
    assert_eq!(holder(&k, &orig, "get"), "42");
    assert_eq!(
        sh(&k, &orig, "cat /root/pause-disk /root/fork-disk"),
        "paused\nbefore\n",
        "the disk survives pause and resume"
    );
    assert_eq!(
        holder(&k, &forks[1].id, "get"),
        "42",
        "a running fork was adopted"
    );

    // Expiry ends a sandbox and its VM.
    let pid_of = |id: &str| vmm_of(&state, id).map(|(pid, _)| pid);
    assert!(pid_of(&forks[0].id).is_some());
    k.set_timeout(&forks[0].id, 1).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while k.sandbox(&forks[0].id).is_ok() {
        assert!(Instant::now() < end, "the sandbox did not expire");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(pid_of(&forks[0].id).is_none(), "its VMM is gone");

    // The host limit: 50 VMs; the 51st is refused by name.
    let mut many = Vec::new();
    let refused = loop {
        match k.create(&CreateSandbox {
            template: "base".into(),
            timeout_s: Some(600),
            ..Default::default()
        }) {
            Ok(s) => many.push(s.id),
            Err(e) => break e,
        }
        assert!(many.len() <= 50, "more than 50 VMs were started");
    };
    let running = k
        .sandboxes()
        .unwrap()
        .iter()
        .filter(|s| s.state == SandboxState::Running)
        .count();
    assert_eq!(running, 50);
    match refused {
        ClientError::Api {
            status: 429,
            message,
        } => assert!(message.contains("50 of 50 VMs"), "{message}"),
        other => panic!("{other}"),
    }
    for s in k.sandboxes().unwrap() {
        k.kill(&s.id).unwrap();
    }
    let left: Vec<_> = std::fs::read_dir(state.join("sandboxes"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "sandbox folders left: {left:?}");
    // `.shared` holds the one copy of kiln-vmm's code every jail links to; it stays.
    let jails: Vec<_> = std::fs::read_dir(state.join("jail/kiln-vmm"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name() != ".shared")
        .collect();
    assert!(jails.is_empty(), "jails left: {jails:?}");
    assert!(
        state
            .join("jail/kiln-vmm/.shared/")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "the jails shared one copy of their code"
    );
    let cgroups: Vec<_> = std::fs::read_dir("/sys/fs/cgroup/kiln")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .collect();
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    drop(d);
    let _ = std::fs::remove_dir_all(&root);
}
