//! Firecracker's signals on a real kiln-vmm under its seccomp filters: SIGPIPE is counted in the
//! `signals` metrics group and the VMM goes on; SIGHUP, SIGBUS, SIGXFSZ and friends end it with
//! Firecracker's exit status, a line on stderr naming the signal and a last metrics line that
//! counts it.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_api::client::request;

/// A fresh directory for one test's files.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-sig-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn start(dir: &Path) -> (Child, std::path::PathBuf, std::path::PathBuf) {
    let sock = dir.join("api.sock");
    let metrics = dir.join("metrics.json");
    let child = Command::new(env!("CARGO_BIN_EXE_kiln-vmm"))
        .arg("--api-sock")
        .arg(&sock)
        .arg("--metrics-path")
        .arg(&metrics)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln-vmm");
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "no API socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, sock, metrics)
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill on a process this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn metrics_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a metrics line is JSON"))
        .collect()
}

fn wait(child: &mut Child) -> (std::process::ExitStatus, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status, err);
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "kiln-vmm did not end"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigpipe_is_counted_and_the_vmm_goes_on() {
    let dir = scratch("sigpipe");
    let (mut child, sock, metrics) = start(&dir);
    // Signals of one kind do not queue, so each is sent once the previous one was counted.
    for expected in 1..=2 {
        signal(&child, libc::SIGPIPE);
        let start = Instant::now();
        loop {
            let (code, body) = request(
                &sock,
                "PUT",
                "/actions",
                Some(r#"{"action_type": "FlushMetrics"}"#),
            )
            .unwrap();
            assert_eq!(code, 204, "{body}");
            // Counters are per line: the total is their sum.
            let lines = metrics_lines(&metrics);
            let count: u64 = lines
                .iter()
                .map(|l| l["signals"]["sigpipe"].as_u64().unwrap())
                .sum();
            assert!(lines.iter().all(|l| l["signals"]["sighup"] == 0));
            if count == expected {
                break;
            }
            assert!(
                count < expected,
                "{count} SIGPIPEs counted, {expected} sent"
            );
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "SIGPIPE {expected} was never counted"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let (code, _) = request(&sock, "GET", "/", None).unwrap();
    assert_eq!(code, 200);
    assert!(child.try_wait().unwrap().is_none(), "kiln-vmm ended");
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fatal_signals_end_it_with_firecrackers_status_a_message_and_a_last_line() {
    for (sig, name, status) in [
        (libc::SIGHUP, "sighup", 156),
        (libc::SIGBUS, "sigbus", 149),
        (libc::SIGSEGV, "sigsegv", 150),
        (libc::SIGXFSZ, "sigxfsz", 151),
        (libc::SIGXCPU, "sigxcpu", 154),
        (libc::SIGILL, "sigill", 157),
    ] {
        let dir = scratch(name);
        let (mut child, _sock, metrics) = start(&dir);
        signal(&child, sig);
        let (exit, stderr) = wait(&mut child);
        assert_eq!(exit.code(), Some(status), "{name}: {exit} {stderr}");
        assert_eq!(exit.signal(), None);
        let upper = name.to_uppercase();
        assert!(
            stderr.contains(&format!(
                " got {upper} (code 0): shutting down with exit status {status}\n"
            )),
            "{name}: {stderr}"
        );
        let last = metrics_lines(&metrics).pop().expect("a last metrics line");
        assert_eq!(last["signals"][name], 1, "{last}");
        assert!(
            last["utc_timestamp_ms"].as_u64().unwrap() > 1_600_000_000_000,
            "{last}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
