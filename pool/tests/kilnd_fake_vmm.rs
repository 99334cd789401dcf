//! kilnd end to end on the host, with the CLI tests' stand-in VMM (this test binary, run with
//! `KILN_FAKE_VMM`, serving the real agent code in-process behind a vsock socket): everything
//! kilnd does is real — template builds (root image with e2fsprogs, build steps, start, ready,
//! snapshot files), the database, warm pools, sandboxes, exec, files, fork, pause and resume,
//! expiry, limits, and a restart after SIGKILL — except that the "guest" is this host. The build
//! steps and commands therefore only touch this test's own folder.

#[path = "../../cli/tests/fake_vmm/vmm.rs"]
mod fake_vmm;
#[path = "common/kilnd_daemon.rs"]
mod kilnd_daemon;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use kiln_pool::client::{ClientError, Kilnd};
use kiln_pool::template::spec::Spec;
use kiln_pool::types::{
    BuildEvent, CreateSandbox, ExecEvent, ExecRequest, PoolSettings, SandboxState,
};

fn main() {
    fake_vmm::main(&[("kilnd_end_to_end_with_a_stand_in_vmm", end_to_end)]);
}

/// The bearer token of the daemon's TCP listener.
const TOKEN: &str = "kilnd-test-token-0123456789";

/// A kilnd process on a state folder, also on a TCP port behind [`TOKEN`].
struct Daemon {
    d: kilnd_daemon::Daemon,
    url: String,
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let mut cmd = kilnd_daemon::command(dir);
        cmd.args(["--max-vms", "4", "--default-timeout", "120"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("KILND_TOKEN", TOKEN);
        Daemon {
            d: kilnd_daemon::Daemon::spawn(dir, cmd),
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    fn client(&self) -> Kilnd {
        self.d.client()
    }

    fn stop(self) {
        self.d.stop()
    }
}

/// Runs `argv` in sandbox `id`: (stdout, exit code).
fn run(k: &Kilnd, id: &str, argv: &[&str]) -> (String, Option<i32>) {
    let mut out = Vec::new();
    let last = k
        .exec(
            id,
            &ExecRequest {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            |ev| {
                if let ExecEvent::Stdout { data_b64 } = ev {
                    out.extend(
                        base64::engine::general_purpose::STANDARD
                            .decode(data_b64)
                            .unwrap(),
                    );
                }
            },
        )
        .unwrap();
    match last {
        ExecEvent::Exit { exit_code, .. } => (String::from_utf8(out).unwrap(), exit_code),
        other => panic!("{argv:?}: {other:?}"),
    }
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Api { status, message } => (status, message),
        other => panic!("{other}"),
    }
}

/// The status and message of kilnd's refusal to create a sandbox of `template`.
fn refused_create(k: &Kilnd, template: &str) -> (u16, String) {
    status(
        k.create(&CreateSandbox {
            template: template.into(),
            ..Default::default()
        })
        .unwrap_err(),
    )
}

fn end_to_end() {
    let dir = std::env::temp_dir().join(format!("kilnd-fake-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tree/etc")).unwrap();
    std::fs::write(dir.join("tree/etc/hello"), "hi\n").unwrap();
    std::fs::write(dir.join("vmlinux"), "kernel").unwrap();
    std::fs::write(dir.join("agent"), vec![0x7f; 4096]).unwrap();
    let out = dir.display().to_string();
    let d = Daemon::start(&dir);
    let k = d.client();

    // A build: root image, a build step, the start command, the ready check, the snapshot.
    let spec = Spec::parse(&format!(
        r#"name = "t"
run = ['echo built >> "$OUT/steps"']
env = {{ OUT = "{out}", WHO = "template" }}
start = 'echo started >> "$OUT/starts"'
ready = 'test -f "$OUT/starts"'
[from]
dir = "{out}/tree"
"#
    ))
    .unwrap();
    let mut steps = Vec::new();
    let last = k
        .build(&spec, |ev| {
            if let BuildEvent::Step { name } = ev {
                steps.push(name.clone());
            }
        })
        .unwrap();
    let BuildEvent::Done {
        template,
        cached: false,
    } = last
    else {
        panic!("{last:?}")
    };
    assert_eq!(template.name, "t");
    assert!(
        steps.iter().any(|s| s.contains("build step 1/1")),
        "{steps:?}"
    );
    assert!(steps.iter().any(|s| s == "snapshot"), "{steps:?}");
    assert!(steps.iter().any(|s| s == "working set"), "{steps:?}");
    assert_eq!(
        std::fs::read_to_string(dir.join("steps")).unwrap(),
        "built\n"
    );
    let stored = dir.join("state/templates").join(&template.id);
    for f in [
        "rootfs.ext4",
        "rootfs.overlay",
        "vmstate",
        "memory",
        "spec.json",
        "ready",
        "working-set.json",
    ] {
        assert!(stored.join(f).exists(), "{f} is missing from the template");
    }
    // The same spec again is found, not rebuilt.
    let again = k.build(&spec, |_| {}).unwrap();
    assert!(
        matches!(again, BuildEvent::Done { cached: true, .. }),
        "{again:?}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("steps")).unwrap(),
        "built\n"
    );
    // A bad source is named.
    let bad = Spec::parse(&format!("name = \"bad\"\n[from]\ndir = \"{out}/nope\"\n")).unwrap();
    match k.build(&bad, |_| {}).unwrap() {
        BuildEvent::Failed { message } => assert!(message.contains("nope"), "{message}"),
        other => panic!("{other:?}"),
    }

    // A sandbox: its environment over the template's; exit codes; a program that is missing.
    let sb = k
        .create(&CreateSandbox {
            template: "t".into(),
            env: [("WHO".to_string(), "a".to_string())].into(),
            metadata: [("team".to_string(), "x".to_string())].into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        (sb.state, sb.template.as_str()),
        (SandboxState::Running, "t")
    );
    // Its root disk: a copy of the template's overlay, in its own folder (a cow template).
    assert!(
        dir.join("state/sandboxes")
            .join(&sb.id)
            .join("rootfs.overlay")
            .exists(),
        "the sandbox has no overlay of its own"
    );
    assert_eq!(
        run(&k, &sb.id, &["sh", "-c", "echo $WHO-$OUT"]),
        (format!("a-{out}\n"), Some(0))
    );
    assert_eq!(run(&k, &sb.id, &["sh", "-c", "exit 3"]).1, Some(3));
    let last = k
        .exec(
            &sb.id,
            &ExecRequest {
                argv: vec!["/nonexistent".into()],
                ..Default::default()
            },
            |_| {},
        )
        .unwrap();
    assert!(
        matches!(
            last,
            ExecEvent::Error {
                could_not_start: true,
                ..
            }
        ),
        "{last:?}"
    );
    // stdin.
    let mut echoed = Vec::new();
    k.exec(
        &sb.id,
        &ExecRequest {
            argv: vec!["cat".into()],
            stdin_b64: Some(base64::engine::general_purpose::STANDARD.encode(b"through stdin")),
            ..Default::default()
        },
        |ev| {
            if let ExecEvent::Stdout { data_b64 } = ev {
                echoed.extend(
                    base64::engine::general_purpose::STANDARD
                        .decode(data_b64)
                        .unwrap(),
                );
            }
        },
    )
    .unwrap();
    assert_eq!(echoed, b"through stdin");

    // Files.
    let f = format!("{out}/files/a.txt");
    k.write_file(&sb.id, &f, b"some bytes").unwrap();
    assert_eq!(k.read_file(&sb.id, &f).unwrap(), b"some bytes");
    let names: Vec<String> = k
        .list_dir(&sb.id, &format!("{out}/files"))
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["a.txt"]);
    let (code, msg) = status(
        k.read_file(&sb.id, &format!("{out}/files/none"))
            .unwrap_err(),
    );
    assert_eq!(code, 404, "{msg}");
    let (code, msg) = status(k.read_file(&sb.id, "relative").unwrap_err());
    assert!(code == 400 && msg.contains("not absolute"), "{msg}");

    // Unknown things are named.
    let (code, msg) = refused_create(&k, "nope");
    assert!(code == 404 && msg.contains("nope"), "{msg}");
    let (code, _) = status(k.sandbox("nope").unwrap_err());
    assert_eq!(code, 404);

    // A warm pool: two ready, a create takes one, the filler tops it up.
    k.set_pool(
        "t",
        &PoolSettings {
            min_ready: 2,
            max_sandboxes: 0,
        },
    )
    .unwrap();
    let ready = || k.templates().unwrap()[0].ready;
    wait_for("two warm VMs", || ready() == 2);
    let warm = k
        .create(&CreateSandbox {
            template: "t".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        run(&k, &warm.id, &["sh", "-c", "echo $WHO"]).0,
        "template\n"
    );
    // One with variables of its own gets them over the template's (its clone step is redone).
    wait_for("the pool refilled", || ready() == 2);
    let own = k
        .create(&CreateSandbox {
            template: "t".into(),
            env: [("WHO".to_string(), "own".to_string())].into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        run(&k, &own.id, &["sh", "-c", "echo $WHO-${OUT:+out}"]).0,
        "own-out\n"
    );
    k.kill(&own.id).unwrap();
    wait_for("the pool refilled", || ready() == 2);
    // A limit set after creates have looked the template up holds for the next one.
    let of_t = k
        .sandboxes()
        .unwrap()
        .iter()
        .filter(|s| s.template == "t")
        .count() as u32;
    k.set_pool(
        "t",
        &PoolSettings {
            min_ready: 0,
            max_sandboxes: of_t,
        },
    )
    .unwrap();
    let (code, msg) = refused_create(&k, "t");
    assert!(code == 429 && msg.contains("already has"), "{msg}");
    k.set_pool(
        "t",
        &PoolSettings {
            min_ready: 0,
            max_sandboxes: 0,
        },
    )
    .unwrap();

    // A snapshot is a template of kind snapshot: sandboxes start from it with the source's
    // environment, the source runs on, and `template rm` removes it with its files.
    let (code, msg) = status(k.snapshot(&sb.id, Some("Bad/Name")).unwrap_err());
    assert!(code == 400 && msg.contains("\"Bad/Name\""), "{msg}");
    let snap = k.snapshot(&sb.id, Some("s1")).unwrap();
    assert_eq!((snap.name.as_str(), snap.kind.as_str()), ("s1", "snapshot"));
    assert_eq!(run(&k, &sb.id, &["sh", "-c", "echo on"]).0, "on\n");
    let from = k
        .create(&CreateSandbox {
            template: "s1".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(from.template, "s1");
    assert_eq!(run(&k, &from.id, &["sh", "-c", "echo $WHO"]).0, "a\n");
    let (code, _) = status(k.remove_template("s1").unwrap_err());
    assert_eq!(code, 409, "a snapshot in use stays");
    k.kill(&from.id).unwrap();
    k.remove_template("s1").unwrap();
    let (code, _) = refused_create(&k, "s1");
    assert_eq!(code, 404, "a removed template is gone for creates too");
    assert!(!dir.join(format!("state/templates/{}", snap.id)).exists());
    let kinds: Vec<String> = k.templates().unwrap().into_iter().map(|t| t.kind).collect();
    assert_eq!(kinds, ["build"]);

    // Fork; then the host limit (4 VMs, warm ones included until the pool is emptied).
    k.kill(&warm.id).unwrap();
    let forks = k.fork(&sb.id, 2).unwrap();
    assert_eq!(forks.len(), 2);
    for f in &forks {
        assert_eq!(run(&k, &f.id, &["sh", "-c", "echo $WHO"]).0, "a\n");
        assert_eq!(f.metadata.get("team").map(String::as_str), Some("x"));
    }
    // One more fits under the limit of 4 VMs; the next is refused.
    let (code, msg) = loop {
        match k.create(&CreateSandbox {
            template: "t".into(),
            ..Default::default()
        }) {
            Ok(_) => continue,
            Err(e) => break status(e),
        }
    };
    assert!(code == 429 && msg.contains("host limit"), "{msg}");

    // Pause to disk and resume.
    let paused = k.pause(&sb.id).unwrap();
    assert_eq!(paused.state, SandboxState::Paused);
    let (code, msg) = status(
        k.exec(
            &sb.id,
            &ExecRequest {
                argv: vec!["true".into()],
                ..Default::default()
            },
            |_| {},
        )
        .unwrap_err(),
    );
    assert!(code == 409 && msg.contains("paused"), "{msg}");
    assert_eq!(k.resume(&sb.id).unwrap().state, SandboxState::Running);
    assert_eq!(run(&k, &sb.id, &["sh", "-c", "echo back"]).0, "back\n");

    // A restart after SIGKILL adopts what runs and keeps what is paused.
    k.pause(&forks[1].id).unwrap();
    let before = k.sandboxes().unwrap();
    drop(d);
    let d = Daemon::start(&dir);
    let k = d.client();
    let after = k.sandboxes().unwrap();
    assert_eq!(
        after.iter().map(|s| (&s.id, s.state)).collect::<Vec<_>>(),
        before.iter().map(|s| (&s.id, s.state)).collect::<Vec<_>>()
    );
    assert_eq!(
        run(&k, &forks[0].id, &["sh", "-c", "echo adopted"]).0,
        "adopted\n"
    );
    assert_eq!(k.resume(&forks[1].id).unwrap().state, SandboxState::Running);

    // The TCP listener serves the same API, streams included, behind its bearer token.
    let t = Kilnd::tcp(&d.url, TOKEN).unwrap();
    assert_eq!(
        t.sandboxes()
            .unwrap()
            .iter()
            .map(|s| &s.id)
            .collect::<Vec<_>>(),
        k.sandboxes()
            .unwrap()
            .iter()
            .map(|s| &s.id)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        run(&t, &forks[0].id, &["sh", "-c", "echo over tcp"]),
        ("over tcp\n".to_string(), Some(0))
    );
    let wrong = Kilnd::tcp(&format!("{}/", d.url), "not-the-token-at-all").unwrap();
    let (code, msg) = status(wrong.sandboxes().unwrap_err());
    assert_eq!((code, msg.as_str()), (401, "missing or wrong bearer token"));
    for bad in [
        "unix:/x",
        "http://",
        "http://127.0.0.1",
        "https://127.0.0.1:1",
    ] {
        assert!(
            matches!(Kilnd::tcp(bad, TOKEN), Err(ClientError::Url(u)) if u == bad),
            "{bad}"
        );
    }

    // A VM that dies under a command (here the stand-in VMM, the command's parent, is killed)
    // is named as the reason, and so is it for the next command, not a bare lost connection.
    for s in k.sandboxes().unwrap() {
        if s.id != forks[0].id {
            k.kill(&s.id).unwrap();
        }
    }
    let doomed = k.fork(&forks[0].id, 1).unwrap().remove(0);
    let last = k
        .exec(
            &doomed.id,
            &ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "kill -9 $PPID; sleep 30".into()],
                ..Default::default()
            },
            |_| {},
        )
        .unwrap();
    match last {
        // Lost while it ran or as it started (the kill can beat the agent's reply to the start).
        ExecEvent::Error { message, .. } => assert!(
            message.contains("its VM ended: ") && message.contains("9"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    let (code, msg) = status(
        k.exec(
            &doomed.id,
            &ExecRequest {
                argv: vec!["true".into()],
                ..Default::default()
            },
            |_| {},
        )
        .unwrap_err(),
    );
    assert!(
        code >= 500 && msg.contains(&format!("sandbox {}'s VM ended: ", doomed.id)),
        "{code} {msg}"
    );
    k.kill(&doomed.id).unwrap();

    // Expiry kills; metrics count; kill removes everything.
    k.set_timeout(&forks[0].id, 1).unwrap();
    wait_for("the sandbox to expire", || k.sandbox(&forks[0].id).is_err());
    let metrics = k.metrics().unwrap();
    assert!(
        metrics.contains("kiln_sandboxes{state=\"running\"}"),
        "{metrics}"
    );
    // A snapshot outlives its sandbox, and holds the template whose image is its disk.
    let s2 = k
        .create(&CreateSandbox {
            template: "t".into(),
            ..Default::default()
        })
        .unwrap();
    k.snapshot(&s2.id, Some("s2")).unwrap();
    for s in k.sandboxes().unwrap() {
        k.kill(&s.id).unwrap();
    }
    assert!(k.sandboxes().unwrap().is_empty());
    let (code, msg) = status(k.remove_template("t").unwrap_err());
    assert!(code == 409 && msg.contains("snapshot s2"), "{msg}");
    k.remove_template("s2").unwrap();
    k.remove_template("t").unwrap();
    assert!(k.templates().unwrap().is_empty());
    assert!(!stored.exists(), "the template's files were removed");
    d.stop();
    assert!(!dir.join("state/kilnd.sock").exists());
    // Nothing is left in the sandboxes folder.
    let left: Vec<_> = std::fs::read_dir(dir.join("state/sandboxes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
