//! `kiln run` end to end on the host, with this test binary standing in for `kiln-vmm`: run with
//! `KILN_FAKE_VMM` set, it checks the VMM command line, writes a console log, and serves the real
//! agent code (in-process) behind a Firecracker-style vsock socket. What the guest would do is
//! real; only the VM is missing. (`harness = false`: `main` is either the fake VMM or the tests.)

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kiln_agent::guest::{Agent, ShutdownMode, serve_connection};
use kiln_agent::link::Socket;

fn main() {
    if let Ok(mode) = std::env::var("KILN_FAKE_VMM") {
        fake_vmm(&mode);
        return;
    }
    let tests: &[(&str, fn())] = &[
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
    ];
    let mut failed = 0;
    for (name, test) in tests {
        match std::panic::catch_unwind(test) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    println!("{} passed, {failed} failed", tests.len() - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}

// ---- the fake VMM ----

fn fake_vmm(mode: &str) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        let i = args.iter().position(|a| a == flag).expect(flag);
        args[i + 1].clone()
    };
    if let Ok(log) = std::env::var("KILN_FAKE_VMM_LOG") {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let blocked = status.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
        let text = format!(
            "pid {}\n{blocked}\n{}\n",
            std::process::id(),
            args.join("\n")
        );
        std::fs::write(log, text).unwrap();
    }
    std::fs::write(value("--serial-out"), "fake console: booting\n").unwrap();
    match mode {
        "fail" => {
            eprintln!("kiln-vmm: guest memory: out of memory");
            std::process::exit(1);
        }
        "hang" => thread::sleep(Duration::from_secs(3600)),
        _ => {}
    }
    let vsock = value("--vsock");
    let uds = vsock
        .split(',')
        .find_map(|p| p.strip_prefix("uds="))
        .unwrap();
    let listener = UnixListener::bind(uds).unwrap();
    let agent = Arc::new(Agent::new(ShutdownMode::Exit));
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { return };
        let agent = agent.clone();
        thread::spawn(move || {
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while conn.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            if line != b"CONNECT 1024" {
                return;
            }
            conn.write_all(b"OK 1073741824\n").unwrap();
            serve_connection(agent, Socket::from_fd(conn.into()));
        });
    }
}

// ---- helpers ----

struct Setup {
    dir: PathBuf,
    kernel: PathBuf,
    rootfs: PathBuf,
    log: PathBuf,
}

fn setup(name: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("kiln-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (kernel, rootfs) = (dir.join("vmlinux"), dir.join("rootfs.ext4"));
    std::fs::write(&kernel, b"kernel").unwrap();
    std::fs::write(&rootfs, b"rootfs").unwrap();
    let log = dir.join("vmm-args.log");
    Setup {
        dir,
        kernel,
        rootfs,
        log,
    }
}

impl Setup {
    fn command(&self, mode: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.arg("run")
            .arg("--kernel")
            .arg(&self.kernel)
            .arg("--rootfs")
            .arg(&self.rootfs)
            .args(args)
            .env("KILN_VMM", std::env::current_exe().unwrap())
            .env("KILN_FAKE_VMM", mode)
            .env("KILN_FAKE_VMM_LOG", &self.log)
            .env_remove("KILN_KERNEL")
            .env_remove("KILN_ROOTFS")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, mode: &str, args: &[&str]) -> Output {
        self.command(mode, args).output().unwrap()
    }

    /// The fake VMM's pid and arguments.
    fn vmm(&self) -> (u32, String, Vec<String>) {
        let text = std::fs::read_to_string(&self.log).unwrap();
        let mut lines = text.lines();
        let pid = lines
            .next()
            .unwrap()
            .strip_prefix("pid ")
            .unwrap()
            .parse()
            .unwrap();
        let blocked = lines.next().unwrap().to_string();
        (pid, blocked, lines.map(String::from).collect())
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn gone(pid: u32) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty()
            || stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
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
    let uds = args[args.iter().position(|a| a == "--vsock").unwrap() + 1].clone();
    let tmp = Path::new(uds.split_once("uds=").unwrap().1)
        .parent()
        .unwrap()
        .to_path_buf();
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
    let uds = args[args.iter().position(|a| a == "--vsock").unwrap() + 1].clone();
    let tmp = Path::new(uds.split_once("uds=").unwrap().1)
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(!tmp.exists(), "temp dir {} left behind", tmp.display());
}

fn bad_input_exits_125() {
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(kiln);
        cmd.args(args)
            .env_remove("KILN_KERNEL")
            .env_remove("KILN_ROOTFS");
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
        "kiln: unknown command \"frobnicate\" (only `run` exists)\n"
    );
}
