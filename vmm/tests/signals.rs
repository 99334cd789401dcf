//! Firecracker's signals on a real kiln-vmm under its seccomp filters: SIGPIPE is counted in the
//! `signals` metrics group and the VMM goes on; SIGHUP, SIGBUS, SIGXFSZ and friends end it with
//! Firecracker's exit status, a line on stderr naming the signal and a last metrics line that
//! counts it.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{ApiVmm, scratch};

/// kiln-vmm serving `dir/api.sock` and writing metrics to `dir/metrics.json`; and that path.
fn start(dir: &Path) -> (ApiVmm, PathBuf) {
    let metrics = dir.join("metrics.json");
    let vmm = ApiVmm::options()
        .arg("--metrics-path")
        .arg(&metrics)
        .start(dir, "api");
    (vmm, metrics)
}

/// Sends `sig` to the VMM.
fn signal(vmm: &ApiVmm, sig: libc::c_int) {
    // SAFETY: kill on a process this test started.
    assert_eq!(unsafe { libc::kill(vmm.pid() as i32, sig) }, 0);
}

fn metrics_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a metrics line is JSON"))
        .collect()
}

#[test]
fn sigpipe_is_counted_and_the_vmm_goes_on() {
    let dir = scratch("sigpipe");
    let (mut vmm, metrics) = start(&dir);
    // Signals of one kind do not queue, so each is sent once the previous one was counted.
    for expected in 1..=2 {
        signal(&vmm, libc::SIGPIPE);
        let start = Instant::now();
        loop {
            let (code, body) = vmm.call("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
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
    let (code, _) = vmm.call("GET", "/", "");
    assert_eq!(code, 200);
    vmm.assert_alive("after the SIGPIPEs");
    drop(vmm);
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
        let (mut vmm, metrics) = start(&dir);
        signal(&vmm, sig);
        let exit = vmm.wait_exit(Duration::from_secs(30));
        let stderr = vmm.stderr();
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
