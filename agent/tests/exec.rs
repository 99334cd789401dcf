//! Exec over a real agent process on a Unix socket: output bytes, exit codes, signals, timeouts
//! that take the whole process group, could-not-start, stdin, large output, concurrency, ttys,
//! and flow control against a host that does not read.

mod common;

use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use common::{Agent, HashWriter, sha256_of};
use kiln_agent::client::{Error, ExecOutput};
use kiln_agent::protocol::{ErrorKind, ExecSpec, ExitStatus, TtySize};

fn sh(script: &str) -> ExecSpec {
    ExecSpec::new(["sh", "-c", script])
}

#[test]
fn echo_exit_codes_and_signals() {
    let agent = Agent::start("basics");
    let c = agent.client();
    let out = c.run(ExecSpec::new(["echo", "hello", "world"])).unwrap();
    assert_eq!(out.stdout, b"hello world\n");
    assert!(out.stderr.is_empty());
    assert_eq!(out.status, ExitStatus::Exited(0));

    let out = c.run(sh("echo out; echo err >&2; exit 3")).unwrap();
    assert_eq!(
        (out.status, &out.stdout[..], &out.stderr[..]),
        (ExitStatus::Exited(3), &b"out\n"[..], &b"err\n"[..])
    );
    let out = c.run(sh("kill -TERM $$")).unwrap();
    assert_eq!(out.status, ExitStatus::Signaled(libc::SIGTERM));
    assert_eq!(out.status.shell_code(), 143);
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() }
}

#[test]
fn env_cwd_and_user() {
    let agent = Agent::start("env");
    let c = agent.client();
    let mut spec = sh("echo \"$FOO|$HOME|$(pwd)\"");
    spec.env.insert("FOO".into(), "bar baz".into());
    spec.cwd = Some("/tmp".into());
    let out = c.run(spec).unwrap();
    let home = if euid() == 0 { "/root" } else { "/" };
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("bar baz|{home}|/tmp\n")
    );

    if euid() != 0 {
        eprintln!("not root: skipping the user switch");
        return;
    }
    let mut spec = sh("id -u; id -g; id -G");
    spec.user = Some("65534:65533".into());
    let out = c.run(spec).unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "65534\n65533\n65533\n"
    );
}

#[test]
fn could_not_start_is_not_exited() {
    let agent = Agent::start("nostart");
    let c = agent.client();
    let cases: Vec<(ExecSpec, i32, &str)> = vec![
        (
            ExecSpec::new(["/nonexistent/prog"]),
            libc::ENOENT,
            "\"/nonexistent/prog\"",
        ),
        (
            ExecSpec::new(["kiln-no-such-program"]),
            libc::ENOENT,
            "kiln-no-such-program",
        ),
        (
            {
                let mut s = ExecSpec::new(["true"]);
                s.cwd = Some("/nonexistent-dir".into());
                s
            },
            libc::ENOENT,
            "cannot change directory to \"/nonexistent-dir\"",
        ),
    ];
    // A file that exists but is not executable.
    let noexec = agent.dir.join("not-executable");
    std::fs::write(&noexec, "#!/bin/sh\necho hi\n").unwrap();
    let mut cases = cases;
    cases.push((
        ExecSpec::new([noexec.to_str().unwrap()]),
        libc::EACCES,
        "Permission denied",
    ));
    for (spec, errno, needle) in cases {
        match c.exec(spec.clone()) {
            Err(Error::CouldNotStart { message, errno: e }) => {
                assert_eq!(e, Some(errno), "{spec:?}: {message}");
                assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            }
            Err(e) => panic!("{spec:?}: {e}"),
            Ok(_) => panic!("{spec:?} started"),
        }
    }
    match c.exec(ExecSpec {
        user: Some("no-such-user-kiln".into()),
        ..ExecSpec::new(["true"])
    }) {
        Err(Error::CouldNotStart { message, .. }) => {
            assert!(
                message.contains("no user \"no-such-user-kiln\""),
                "{message}"
            )
        }
        other => panic!("{:?}", other.err()),
    }
    match c.exec(ExecSpec::new(Vec::<String>::new())) {
        Err(Error::Agent {
            kind: ErrorKind::BadRequest,
            message,
            ..
        }) => {
            assert_eq!(message, "argv is empty")
        }
        other => panic!("{:?}", other.err()),
    }
    // A shell that cannot find its command did start: that is an exit, with the shell's 127.
    let out = c.run(sh("kiln-no-such-program")).unwrap();
    assert_eq!(out.status, ExitStatus::Exited(127));
}

fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
    }
}

#[test]
fn timeout_kills_the_process_group() {
    let agent = Agent::start("timeout");
    let c = agent.client();
    let mut spec = sh("sleep 1000 & echo $!; echo $$; wait");
    spec.timeout_ms = Some(500);
    let start = Instant::now();
    let out = c.run(spec).unwrap();
    assert_eq!(out.status, ExitStatus::TimedOut);
    assert!(start.elapsed() >= Duration::from_millis(500));
    let pids: Vec<u32> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    let end = Instant::now() + Duration::from_secs(5);
    while !pids.iter().all(|p| gone(*p)) {
        assert!(
            Instant::now() < end,
            "processes {pids:?} survived the timeout"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A running `cat` and its stdin.
fn cat(
    c: &kiln_agent::client::Client,
) -> (kiln_agent::client::Exec, kiln_agent::client::ExecStdin) {
    let mut exec = c
        .exec(ExecSpec {
            stdin: true,
            ..ExecSpec::new(["cat"])
        })
        .unwrap();
    let stdin = exec.take_stdin().unwrap();
    (exec, stdin)
}

#[test]
fn output_streams_before_exit_and_stdin_is_exact() {
    let agent = Agent::start("stdin");
    let c = agent.client();
    // Line by line: each answer must arrive while the process still runs.
    let (mut exec, mut stdin) = cat(&c);
    for i in 0..5 {
        let line = format!("line {i}\n");
        stdin.write_all(line.as_bytes()).unwrap();
        let mut got = Vec::new();
        while got.len() < line.len() {
            match exec.next_output().unwrap() {
                Some(ExecOutput::Stdout(b)) => got.extend(b),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, line.as_bytes());
    }
    stdin.close();
    assert_eq!(
        exec.next_output().unwrap(),
        Some(ExecOutput::Exit(ExitStatus::Exited(0)))
    );

    // 8 MiB of every byte value, fed from another thread, echoed back byte for byte.
    let (exec, mut stdin) = cat(&c);
    let writer = thread::spawn(move || {
        std::io::copy(&mut common::Pattern::new(7, 8 << 20), &mut stdin).unwrap();
    });
    let out = exec.output().unwrap();
    writer.join().unwrap();
    assert_eq!(out.status, ExitStatus::Exited(0));
    assert_eq!(out.stdout.len(), 8 << 20);
    assert_eq!(
        sha256_of(&out.stdout[..]),
        sha256_of(common::Pattern::new(7, 8 << 20))
    );
}

#[test]
fn twenty_mib_of_output_is_intact() {
    let agent = Agent::start("bigout");
    let c = agent.client();
    let len = 20u64 << 20;
    let exec = c
        .exec(sh(&format!(
            "yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {len}"
        )))
        .unwrap();
    let mut hw = HashWriter::default();
    let status = exec
        .wait_with(|b| hw.write_all(b).unwrap(), |e| panic!("stderr {e:?}"))
        .unwrap();
    assert_eq!(status, ExitStatus::Exited(0));
    assert_eq!(hw.len, len);
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz\n";
    let expected = sha256_of(std::io::Read::take(
        std::io::Read::chain(&line.repeat((len as usize) / line.len() + 1)[..], &[][..]),
        len,
    ));
    assert_eq!(hw.hex(), expected);
}

#[test]
fn concurrent_execs_share_one_connection() {
    let agent = Agent::start("concurrent");
    let c = agent.client();
    let start = Instant::now();
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let c = c.clone();
            thread::spawn(move || {
                let out = c
                    .run(ExecSpec::new([
                        "sh",
                        "-c",
                        "sleep 0.5; echo out-$0; echo err-$0 >&2; exit $0",
                        &i.to_string(),
                    ]))
                    .unwrap();
                assert_eq!(out.stdout, format!("out-{i}\n").into_bytes());
                assert_eq!(out.stderr, format!("err-{i}\n").into_bytes());
                assert_eq!(out.status, ExitStatus::Exited(i));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // 16 half-second sleeps one after another would take 8 s.
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
    assert!(c.ping().unwrap().starts_with("0."));
}

#[test]
fn signal_cancel_and_resize() {
    let agent = Agent::start("signal");
    let c = agent.client();
    let exec = c.exec(ExecSpec::new(["sleep", "100"])).unwrap();
    let control = exec.control();
    control.signal(libc::SIGTERM).unwrap();
    assert_eq!(
        exec.output().unwrap().status,
        ExitStatus::Signaled(libc::SIGTERM)
    );
    // The exec is over: signalling it again names it as not running.
    match control.signal(libc::SIGTERM) {
        Err(Error::Agent {
            kind: ErrorKind::NoSuchRequest,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }

    let exec = c.exec(ExecSpec::new(["sleep", "100"])).unwrap();
    match exec.control().resize(TtySize { rows: 1, cols: 1 }) {
        Err(Error::Agent { errno, .. }) => assert_eq!(errno, Some(libc::ENOTTY)),
        other => panic!("{other:?}"),
    }
    exec.control().cancel().unwrap();
    assert_eq!(
        exec.output().unwrap().status,
        ExitStatus::Signaled(libc::SIGKILL)
    );
}

#[test]
fn tty_exec() {
    let agent = Agent::start("tty");
    let c = agent.client();
    let out = c
        .run(ExecSpec {
            tty: Some(TtySize {
                rows: 33,
                cols: 101,
            }),
            ..sh("tty; stty size; test -t 0 && test -t 2 && echo all-tty; echo $TERM")
        })
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("/dev/pts/"), "{text:?}");
    assert!(text.contains("33 101\r\n"), "{text:?}");
    assert!(text.contains("all-tty\r\n"), "{text:?}");
    assert!(text.contains("xterm-256color"), "{text:?}");
    assert!(out.stderr.is_empty());
    assert_eq!(out.status, ExitStatus::Exited(0));

    // Typed input is echoed by the terminal and read by the process; resize reaches it.
    let mut exec = c
        .exec(ExecSpec {
            tty: Some(TtySize { rows: 10, cols: 20 }),
            stdin: true,
            ..sh("read line; echo \"got $line\"; stty size")
        })
        .unwrap();
    exec.control()
        .resize(TtySize { rows: 50, cols: 60 })
        .unwrap();
    let mut stdin = exec.take_stdin().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    let mut out = Vec::new();
    let status = exec
        .wait_with(|b| out.extend_from_slice(b), |_| {})
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("got hello\r\n"), "{text:?}");
    assert!(text.contains("50 60\r\n"), "{text:?}");
    assert_eq!(status, ExitStatus::Exited(0));
}

#[test]
fn a_host_that_does_not_read_holds_the_process_not_the_agent_memory() {
    let agent = Agent::start("flow");
    let c = agent.client();
    let before = agent.rss_kib();
    let len = 200u64 << 20;
    let mut exec = c
        .exec(ExecSpec::new(["head", "-c", &len.to_string(), "/dev/zero"]))
        .unwrap();
    thread::sleep(Duration::from_millis(1500));
    let during = agent.rss_kib();
    // Without flow control the agent would now hold most of 200 MiB.
    assert!(
        during < before + 16 * 1024,
        "agent RSS grew from {before} KiB to {during} KiB while the host did not read"
    );
    let mut total = 0u64;
    loop {
        match exec.next_output().unwrap() {
            Some(ExecOutput::Stdout(b)) => total += b.len() as u64,
            Some(ExecOutput::Exit(status)) => {
                assert_eq!(status, ExitStatus::Exited(0));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(total, len);
}

#[test]
fn a_dropped_exec_does_not_stall_the_connection() {
    let agent = Agent::start("dropped");
    let c = agent.client();
    let exec = c
        .exec(ExecSpec::new(["head", "-c", "50000000", "/dev/zero"]))
        .unwrap();
    drop(exec);
    let out = c.run(ExecSpec::new(["echo", "still here"])).unwrap();
    assert_eq!(out.stdout, b"still here\n");
}

#[test]
fn shutdown_ends_a_non_pid1_agent_cleanly() {
    let mut agent = Agent::start("shutdown");
    let c = agent.client();
    let _sleeper = c.exec(ExecSpec::new(["sleep", "100"])).unwrap();
    c.shutdown().unwrap();
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0));
}
