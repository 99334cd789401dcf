//! A forbidden system call counts as Firecracker's `seccomp.num_faults`: the SIGSYS handler of a
//! process with metrics configured writes a last metrics line with the fault before it exits 148.
//! Its own test binary, with one test: the metrics file is the process's, and a forked child
//! inherits it.

use kiln_vmm::metrics::MetricsSink;
use kiln_vmm::seccomp::{EXIT_BAD_SYSCALL, ThreadKind, install_program, program};

#[test]
fn a_forbidden_call_is_counted_in_a_last_metrics_line() {
    let dir = std::env::temp_dir().join(format!("kiln-seccomp-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("metrics.json");
    let mut sink = MetricsSink::default();
    sink.configure(&path).unwrap();
    let filter = program(ThreadKind::Vmm).expect("the embedded filter decodes");
    // SAFETY: the child only makes raw system calls (no allocation, no locks) and then exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: the child's stderr goes nowhere; a plain descriptor call.
        unsafe { libc::close(2) };
        if install_program(ThreadKind::Vmm, &filter).is_err() {
            // SAFETY: _exit ends the child without running anything of the parent's.
            unsafe { libc::_exit(99) };
        }
        // SAFETY: socket() has no memory arguments; the VMM thread's filter forbids AF_INET.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        // SAFETY: ends the child, which the filter should have stopped before this.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked, into a valid status word.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), EXIT_BAD_SYSCALL);
    let text = std::fs::read_to_string(&path).unwrap();
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a last metrics line")).unwrap();
    assert_eq!(last["seccomp"]["num_faults"], 1, "{last}");
    assert!(last["utc_timestamp_ms"].as_u64().unwrap() > 0, "{last}");
    drop(sink);
    std::fs::remove_dir_all(&dir).unwrap();
}
