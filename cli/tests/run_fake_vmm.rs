//! `kiln run` end to end on the host, with this test binary standing in for `kiln-vmm` (see
//! `fake_vmm`): it checks the VMM command line and serves the real agent code (in-process)
//! behind a Firecracker-style vsock socket. What the guest would do is real; only the VM is
//! missing. (`harness = false`: `main` is either the fake VMM or the tests.)

mod fake_vmm;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use fake_vmm::{gone, setup, temp_dir_of, text};

fn main() {
    fake_vmm::main(&[
        ("streams_output_and_exit_code", streams_output_and_exit_code),
        (
            "signals_timeouts_and_could_not_start",
            signals_timeouts_and_could_not_start,
        ),
        ("stdin_env_cwd_and_json", stdin_env_cwd_and_json),
        (
            "vmm_failure_names_the_console_log",
            vmm_failure_names_the_console_log,
        ),
        ("boot_timeout_stops_the_vmm", boot_timeout_stops_the_vmm),
        ("ctrl_c_cleans_up", ctrl_c_cleans_up),
        ("bad_input_exits_125", bad_input_exits_125),
        (
            "kilnd_is_reached_over_tcp_with_its_token",
            kilnd_is_reached_over_tcp_with_its_token,
        ),
        (
            "a_port_is_published_over_vsock_without_a_nic",
            a_port_is_published_over_vsock_without_a_nic,
        ),
        (
            "a_network_puts_the_vmm_in_its_namespace_with_a_nic",
            a_network_puts_the_vmm_in_its_namespace_with_a_nic,
        ),
        (
            "a_silent_agent_cannot_outlast_the_timeout",
            a_silent_agent_cannot_outlast_the_timeout,
        ),
    ]);
}

// ---- the tests ----

fn streams_output_and_exit_code() {
    let s = setup("basic");
    let out = s.run(
        "agent",
        &[
            "--mem-mib",
            "300",
            "--vcpus",
            "2",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
    );
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    assert_eq!(out.status.code(), Some(3));

    let (pid, blocked, args) = s.vmm();
    assert_eq!(
        blocked, "SigBlk:\t0000000000000000",
        "the VMM inherited a signal mask"
    );
    let tmp = temp_dir_of(&args, "--vsock");
    let console = tmp.join("console.log");
    let expected: Vec<String> = [
        "--kernel",
        s.kernel.to_str().unwrap(),
        "--mem-mib",
        "300",
        "--vcpus",
        "2",
        "--cmdline",
        "console=ttyS0 reboot=k panic=-1 quiet init=/usr/sbin/kiln-agent KILN_OVERLAY=tmpfs",
        "--balloon",
        "amount_mib=0,deflate_on_oom,free_page_reporting",
        "--drive",
        &format!("id=rootfs,path={},root,ro", s.rootfs.display()),
        "--vsock",
        &format!("cid=3,uds={}", tmp.join("vsock.sock").display()),
        "--serial-out",
        console.to_str().unwrap(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    assert_eq!(args, expected);
    assert!(gone(pid), "the VMM outlived kiln");
    assert!(!tmp.exists(), "temp dir {} left behind", tmp.display());

    // The memory flags: zram reaches the agent on the command line; no reporting and no
    // starting target means no balloon; a target alone means a balloon without reporting.
    let out = s.run(
        "agent",
        &[
            "--zram",
            "64M",
            "--free-page-reporting",
            "off",
            "--",
            "true",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let (_, _, args) = s.vmm();
    let cmdline = &args[args.iter().position(|a| a == "--cmdline").unwrap() + 1];
    assert!(cmdline.ends_with(" kiln.zram=64M"), "{cmdline}");
    assert!(!args.iter().any(|a| a == "--balloon"), "{args:?}");
    let out = s.run(
        "agent",
        &[
            "--free-page-reporting=off",
            "--balloon-mib",
            "64",
            "--",
            "true",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let (_, _, args) = s.vmm();
    let balloon = &args[args.iter().position(|a| a == "--balloon").unwrap() + 1];
    assert_eq!(balloon, "amount_mib=64,deflate_on_oom");
}

fn signals_timeouts_and_could_not_start() {
    let s = setup("status");
    let out = s.run("agent", &["--", "sh", "-c", "kill -KILL $$"]);
    assert_eq!(out.status.code(), Some(137));

    let start = Instant::now();
    let out = s.run(
        "agent",
        &[
            "--timeout",
            "0.5",
            "--",
            "sh",
            "-c",
            "echo started; sleep 30",
        ],
    );
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "started\n");
    assert!(
        text(&out.stderr).contains("timed out"),
        "{}",
        text(&out.stderr)
    );
    assert!(start.elapsed() < Duration::from_secs(20));

    let out = s.run("agent", &["--", "/nonexistent/tool", "x"]);
    assert_eq!(out.status.code(), Some(127));
    assert_eq!(
        text(&out.stderr),
        "kiln: could not start \"/nonexistent/tool\": No such file or directory (os error 2)\n"
    );
}

fn stdin_env_cwd_and_json() {
    let s = setup("io");
    let mut child = s
        .command("agent", &["--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut stdin = child.stdin.take().unwrap();
    let p2 = payload.clone();
    let writer = thread::spawn(move || stdin.write_all(&p2).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout == payload,
        "stdin did not come back byte for byte"
    );

    let out = s.run(
        "agent",
        &[
            "--env",
            "A=1 2",
            "--cwd",
            "/tmp",
            "--",
            "sh",
            "-c",
            "echo \"$A\"; pwd",
        ],
    );
    assert_eq!(text(&out.stdout), "1 2\n/tmp\n");

    let out = s.run(
        "agent",
        &["--json", "--", "sh", "-c", "echo hi; echo e >&2; exit 2"],
    );
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stdout"], "hi\n");
    assert_eq!(v["stderr"], "e\n");
    assert_eq!(v["exit_code"], 2);
    assert_eq!(v["signal"], serde_json::Value::Null);
    assert_eq!(v["timed_out"], false);
    assert!(
        v["timings"]["boot_ms"].is_u64() && v["timings"]["exec_ms"].is_u64(),
        "{v}"
    );

    let out = s.run(
        "agent",
        &["--json", "--timeout", "0.3", "--", "sleep", "10"],
    );
    assert_eq!(out.status.code(), Some(124));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["timed_out"].clone(), v["exit_code"].clone()),
        (true.into(), serde_json::Value::Null)
    );
}

fn vmm_failure_names_the_console_log() {
    let s = setup("fail");
    let out = s.run("fail", &["--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("kiln: the VM stopped before its agent answered"),
        "{err}"
    );
    assert!(err.contains("out of memory"), "{err}");
    let console = err.trim_end().rsplit("console log: ").next().unwrap();
    assert_eq!(
        std::fs::read_to_string(console).unwrap(),
        "fake console: booting\n"
    );
    let _ = std::fs::remove_file(console);
}

fn boot_timeout_stops_the_vmm() {
    let s = setup("hang");
    let out = s.run("hang", &["--boot-timeout", "0.5", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(err.contains("did not answer within 500ms"), "{err}");
    assert!(err.contains("kiln-vmm was stopped"), "{err}");
    let console = err.trim_end().rsplit("console log: ").next().unwrap();
    let _ = std::fs::remove_file(console);
    let (pid, _, _) = s.vmm();
    assert!(gone(pid), "the hung VMM was left running");
}

fn ctrl_c_cleans_up() {
    let s = setup("sigint");
    let child = s
        .command("agent", &["--", "sh", "-c", "echo ready; sleep 100"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = child;
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 6];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"ready\n");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    assert!(
        text(&out.stderr).contains("interrupted"),
        "{}",
        text(&out.stderr)
    );
    let (pid, _, args) = s.vmm();
    assert!(gone(pid), "the VMM outlived Ctrl-C");
    let tmp = temp_dir_of(&args, "--vsock");
    assert!(!tmp.exists(), "temp dir {} left behind", tmp.display());
}

fn bad_input_exits_125() {
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(kiln);
        cmd.args(args)
            .env_remove("KILN_KERNEL")
            .env_remove("KILN_ROOTFS")
            .env_remove("KILND_URL")
            .env_remove("KILND_TOKEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(125), "{args:?}");
        assert!(out.stdout.is_empty());
        text(&out.stderr)
    };
    assert_eq!(
        run(&["run", "--env", "NOEQUALS", "true"], &[]),
        "kiln: --env \"NOEQUALS\" is not NAME=VALUE\n"
    );
    assert_eq!(
        run(
            &["run", "--", "true"],
            &[("KILN_KERNEL", "/nonexistent/vmlinux")]
        ),
        "kiln: kernel /nonexistent/vmlinux (from $KILN_KERNEL): No such file or directory (os error 2)\n"
    );
    if !Path::new("/kiln/vmlinux").exists() {
        assert!(
            run(&["run", "--", "true"], &[])
                .starts_with("kiln: kernel /kiln/vmlinux (from the default")
        );
    }
    let s = setup("novmm");
    let k = s.kernel.to_str().unwrap();
    let r = s.rootfs.to_str().unwrap();
    assert_eq!(
        run(
            &["run", "--kernel", k, "--rootfs", r, "--", "true"],
            &[("KILN_VMM", "/nonexistent/kiln-vmm")]
        ),
        "kiln: $KILN_VMM /nonexistent/kiln-vmm is not a file\n"
    );
    assert_eq!(
        run(&["frobnicate"], &[]),
        "kiln: unknown command \"frobnicate\" (run, snapshot, template, sandbox)\n"
    );
}

fn kilnd_is_reached_over_tcp_with_its_token() {
    // A stand-in for `kilnd --listen`: answers `[]` to a request carrying the token.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", server.local_addr().unwrap());
    let seen = thread::spawn(move || {
        let (mut c, _) = server.accept().unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).unwrap() == 1 {
            head.push(b[0]);
        }
        c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")
            .unwrap();
        String::from_utf8(head).unwrap()
    });
    let kiln = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args(["sandbox", "ls", "--json"])
            .env_remove("KILND_SOCKET")
            .env_remove("KILND_TOKEN");
        cmd.envs(env.iter().copied()).output().unwrap()
    };
    let out = kiln(&[("KILND_URL", &url), ("KILND_TOKEN", "tok-0123456789abcdef")]);
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "[]\n".into())
    );
    let head = seen.join().unwrap();
    assert!(head.starts_with("GET /sandboxes HTTP/1.1\r\n"), "{head}");
    assert!(
        head.contains("\r\nAuthorization: Bearer tok-0123456789abcdef\r\n"),
        "{head}"
    );
    let out = kiln(&[("KILND_URL", &url)]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        text(&out.stderr),
        format!(
            "kiln: $KILND_URL is {url}: kilnd's TCP listener needs its bearer token in $KILND_TOKEN\n"
        )
    );
    let out = kiln(&[("KILND_URL", "unix:/x"), ("KILND_TOKEN", "t")]);
    assert_eq!(
        text(&out.stderr),
        "kiln: $KILND_URL: kilnd URL \"unix:/x\" is not http://HOST:PORT (kilnd --listen serves plain HTTP)\n"
    );
}

fn a_port_is_published_over_vsock_without_a_nic() {
    // The fake agent runs on this host, so the "guest" server is one here on loopback.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let guest_port = server.local_addr().unwrap().port();
    thread::spawn(move || {
        for mut c in server.incoming().flatten() {
            let mut line = String::new();
            let mut b = [0u8; 1];
            while c.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                line.push(b[0] as char);
            }
            let _ = c.write_all(format!("guest got {line}\n").as_bytes());
        }
    });
    let s = setup("publish");
    let mut child = s
        .command(
            "agent",
            &[
                "--json",
                "--publish",
                &guest_port.to_string(),
                "--",
                "sleep",
                "3",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    let mut b = [0u8; 1];
    while !seen.ends_with('\n') && stderr.read(&mut b).unwrap_or(0) == 1 {
        seen.push(b[0] as char);
    }
    let host = seen
        .strip_prefix("kiln: published ")
        .and_then(|r| r.split(" -> ").next())
        .unwrap_or_else(|| panic!("no published line: {seen:?}"))
        .to_string();
    assert!(
        seen.ends_with(&format!("-> guest port {guest_port}\n")),
        "{seen}"
    );
    assert!(host.starts_with("127.0.0.1:"), "{host}");
    let mut c = std::net::TcpStream::connect(&host).unwrap();
    c.write_all(b"hello\n").unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "guest got hello\n");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let published = &v["network"]["published"][0];
    assert_eq!(published["host"], host);
    assert_eq!(published["guest_port"], guest_port);
    assert!(v["network"]["address"].is_null(), "no NIC: {v}");
    assert!(
        std::net::TcpStream::connect(&host).is_err(),
        "closed with the run"
    );
}

fn a_network_puts_the_vmm_in_its_namespace_with_a_nic() {
    let s = setup("nic");
    let out = s.run(
        "agent",
        &["--json", "--allow-domain", "allowed.test", "--", "true"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let (_, _, args) = s.vmm();
    let net = &args[args.iter().position(|a| a == "--net").unwrap() + 1];
    assert_eq!(net, "id=eth0,tap=kiln0,mac=06:00:ac:10:00:02");
    let cmdline = &args[args.iter().position(|a| a == "--cmdline").unwrap() + 1];
    assert!(
        cmdline.ends_with(" kiln.net=172.16.0.2/30,172.16.0.1,172.16.0.1"),
        "{cmdline}"
    );
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(
        s.vmm_netns(),
        ours.to_string_lossy(),
        "the VMM ran in the sandbox's namespace"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["network"]["address"], "172.16.0.2");
    assert_eq!(v["network"]["refused_total"], 0);
}

/// An agent that goes silent after its hello: `--timeout` bounds the whole call (the start
/// included), the VM is stopped, and the error says what happened.
fn a_silent_agent_cannot_outlast_the_timeout() {
    let s = setup("silent");
    let start = Instant::now();
    let out = s.run("silent-agent", &["--timeout", "0.5", "--", "true"]);
    let took = start.elapsed();
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no answer from the agent"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("kiln-vmm was stopped"),
        "{}",
        text(&out.stderr)
    );
    // The timeout plus the grace the guest gets to report, and a margin for a loaded machine.
    assert!(took < Duration::from_secs(25), "kiln run took {took:?}");
    let (pid, _, _) = s.vmm();
    assert!(gone(pid), "the fake VMM {pid} outlived kiln");
}
