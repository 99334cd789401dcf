//! The signals Firecracker catches, caught as Firecracker does, with its `signals` metrics group
//! (`sigbus`, `sigsegv`, `sigxfsz`, `sigxcpu`, `sigpipe`, `sighup`, `sigill`) and its exit
//! statuses.
//!
//! SIGPIPE is counted and otherwise ignored (the write that raised it fails with EPIPE, as it
//! would with the signal ignored): a log or metrics pipe whose reader left must not end the VM.
//! The others end the process: SIGBUS (a guest memory file truncated under its mapping),
//! SIGSEGV, SIGILL, SIGXFSZ (a file past `RLIMIT_FSIZE`, which the jailer sets), SIGXCPU and
//! SIGHUP (the controlling terminal went away). The handler counts the signal, writes
//!
//! ```text
//! kiln-vmm: thread kiln_vmm got SIGBUS (code 2): shutting down with exit status 149
//! ```
//!
//! to stderr and, when metrics are configured, a last metrics line holding the timestamp, the
//! `seccomp` group and the `signals` group, then exits with Firecracker's status for the signal.
//! The SIGSYS handler writes the same last line, with `seccomp.num_faults` at 1. Like the SIGSYS handler
//! ([`crate::seccomp::sigsys`]) it runs on whichever thread got the signal, under that thread's
//! seccomp filter, so it only makes `write`, `clock_gettime`, `exit_group` and (for SIGPIPE)
//! `rt_sigreturn`, which every filter allows; it allocates nothing and takes no lock. It runs on
//! the thread's alternate stack, so a stack overflow is reported too.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use kiln_devices::metrics::IncMetric;
use kiln_devices::metrics_group;

use crate::seccomp::sigsys::{Report, thread_name, write_all};

metrics_group!(
    /// Signals caught (Firecracker's `signals` group).
    SignalMetrics {
        /// SIGBUS.
        sigbus,
        /// SIGSEGV.
        sigsegv,
        /// SIGXFSZ.
        sigxfsz,
        /// SIGXCPU.
        sigxcpu,
        /// SIGPIPE.
        sigpipe,
        /// SIGHUP.
        sighup,
        /// SIGILL.
        sigill,
    }
);

/// The signals caught so far.
pub static SIGNALS: SignalMetrics = SignalMetrics::new();

/// The metrics file's descriptor for the last line, once metrics are configured (-1 before).
static METRICS_FD: AtomicI32 = AtomicI32::new(-1);

/// Remembers where metrics go, for the line a fatal signal's handler writes. The descriptor
/// must stay open for the rest of the process (the metrics file is configured once).
pub(crate) fn set_metrics_fd(fd: RawFd) {
    METRICS_FD.store(fd, Ordering::Relaxed);
}

/// A caught signal: its name, its counter and, for a fatal one, Firecracker's exit status.
struct Caught {
    signal: libc::c_int,
    name: &'static str,
    counter: &'static IncMetric,
    exit: Option<i32>,
}

/// Every signal caught, with Firecracker's exit statuses (`FcExitCode`).
static CAUGHT: [Caught; 7] = [
    Caught {
        signal: libc::SIGBUS,
        name: "SIGBUS",
        counter: &SIGNALS.sigbus,
        exit: Some(149),
    },
    Caught {
        signal: libc::SIGSEGV,
        name: "SIGSEGV",
        counter: &SIGNALS.sigsegv,
        exit: Some(150),
    },
    Caught {
        signal: libc::SIGXFSZ,
        name: "SIGXFSZ",
        counter: &SIGNALS.sigxfsz,
        exit: Some(151),
    },
    Caught {
        signal: libc::SIGXCPU,
        name: "SIGXCPU",
        counter: &SIGNALS.sigxcpu,
        exit: Some(154),
    },
    Caught {
        signal: libc::SIGPIPE,
        name: "SIGPIPE",
        counter: &SIGNALS.sigpipe,
        exit: None,
    },
    Caught {
        signal: libc::SIGHUP,
        name: "SIGHUP",
        counter: &SIGNALS.sighup,
        exit: Some(156),
    },
    Caught {
        signal: libc::SIGILL,
        name: "SIGILL",
        counter: &SIGNALS.sigill,
        exit: Some(157),
    },
];

/// Why the handlers could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the {signal} handler: {err}")]
pub struct SignalError {
    /// The signal's name.
    signal: &'static str,
    /// What the OS said.
    err: io::Error,
}

/// Installs the handlers (see the module's doc), process-wide. Call it once, early.
pub fn install_handlers() -> Result<(), SignalError> {
    for caught in &CAUGHT {
        // SAFETY: an all-zero sigaction is valid; every field that matters is set below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
        // ONSTACK: a stack overflow's SIGSEGV can only be handled on the alternate stack Rust
        // gives each thread. RESTART: a SIGPIPE does not also interrupt some other call.
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        // SAFETY: `sa_mask` is a valid sigset_t to fill: other signals wait for the handler.
        unsafe { libc::sigfillset(&mut action.sa_mask) };
        // SAFETY: `action` is a valid sigaction whose handler is an `extern "C"` function of
        // the SA_SIGINFO shape; the old action is not asked for.
        if unsafe { libc::sigaction(caught.signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(SignalError {
                signal: caught.name,
                err: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

extern "C" fn on_signal(signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let Some(caught) = CAUGHT.iter().find(|c| c.signal == signal) else {
        return;
    };
    caught.counter.inc();
    let Some(exit) = caught.exit else {
        return;
    };
    // SAFETY: the kernel passes a valid siginfo_t (SA_SIGINFO).
    let code = unsafe { (*info).si_code };
    let (name, len) = thread_name();
    let mut report = Report::new();
    shutdown_line(&mut report, &name[..len], caught.name, code, exit);
    write_all(2, report.as_bytes());
    write_last_metrics_line(0);
    // SAFETY: _exit ends the process at once (exit_group), running nothing else.
    unsafe { libc::_exit(exit) };
}

/// Writes the last metrics line of a process a handler is ending, when metrics are configured:
/// `seccomp_faults` forbidden calls (the SIGSYS handler's one) and the signals caught. Safe in a
/// signal handler.
pub(crate) fn write_last_metrics_line(seccomp_faults: u64) {
    let fd = METRICS_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let mut line = Report::new();
        metrics_line(&mut line, utc_ms(), seccomp_faults);
        write_all(fd, line.as_bytes());
    }
}

/// The stderr line for a fatal signal.
fn shutdown_line(report: &mut Report, thread: &[u8], signal: &str, code: i32, exit: i32) {
    report.push(b"kiln-vmm: thread ");
    if thread.is_empty() {
        report.push(b"with id ");
        // SAFETY: gettid has no arguments and cannot fail; every filter allows it.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        report.push_number(tid.unsigned_abs());
    } else {
        report.push(thread);
    }
    report.push(b" got ");
    report.push(signal.as_bytes());
    report.push(b" (code ");
    if code < 0 {
        report.push(b"-");
    }
    report.push_number(u64::from(code.unsigned_abs()));
    report.push(b"): shutting down with exit status ");
    report.push_number(u64::from(exit.unsigned_abs()));
    report.push(b"\n");
}

/// The last metrics line: the timestamp, Firecracker's `seccomp.num_faults` and the `signals`
/// group since the previous line.
fn metrics_line(line: &mut Report, utc_ms: u64, seccomp_faults: u64) {
    line.push(b"{\"utc_timestamp_ms\":");
    line.push_number(utc_ms);
    line.push(b",\"seccomp\":{\"num_faults\":");
    line.push_number(seccomp_faults);
    line.push(b"},\"signals\":{");
    for (i, caught) in CAUGHT.iter().enumerate() {
        if i > 0 {
            line.push(b",");
        }
        line.push(b"\"");
        for b in caught.name.bytes() {
            line.push(&[b.to_ascii_lowercase()]);
        }
        line.push(b"\":");
        line.push_number(caught.counter.take_delta());
    }
    line.push(b"}}\n");
}

/// Wall-clock milliseconds since the epoch, with `clock_gettime` alone.
fn utc_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shutdown_line_names_the_thread_the_signal_and_the_status() {
        let mut r = Report::new();
        shutdown_line(&mut r, b"kiln_vcpu0", "SIGBUS", 2, 149);
        assert_eq!(
            r.as_bytes(),
            b"kiln-vmm: thread kiln_vcpu0 got SIGBUS (code 2): shutting down with exit status 149\n"
        );
        let mut r = Report::new();
        shutdown_line(&mut r, b"x", "SIGHUP", -6, 156);
        assert!(
            r.as_bytes()
                .ends_with(b"got SIGHUP (code -6): shutting down with exit status 156\n")
        );
    }

    #[test]
    fn the_last_metrics_line_is_json_with_firecrackers_names() {
        let mut line = Report::new();
        metrics_line(&mut line, 1_765_000_000_123, 1);
        let text = std::str::from_utf8(line.as_bytes()).unwrap();
        assert!(text.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["utc_timestamp_ms"], 1_765_000_000_123u64);
        assert_eq!(v["seccomp"]["num_faults"], 1);
        let names: Vec<&String> = v["signals"].as_object().unwrap().keys().collect();
        assert_eq!(
            names.len(),
            7,
            "sigbus sigsegv sigxfsz sigxcpu sigpipe sighup sigill: {names:?}"
        );
        for name in [
            "sigbus", "sigsegv", "sigxfsz", "sigxcpu", "sigpipe", "sighup", "sigill",
        ] {
            assert!(v["signals"][name].is_u64(), "{name}: {v}");
        }
    }
}
