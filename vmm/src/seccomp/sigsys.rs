//! A thread stopped by its seccomp filter is never silent. The filters' default action is
//! `trap`: the forbidden call is not made and the thread gets SIGSYS, whose handler writes
//!
//! ```text
//! kiln-vmm: seccomp: thread kiln_api made a forbidden system call 257 (openat)
//! ```
//!
//! to stderr, writes a last metrics line with `seccomp.num_faults` at 1 when metrics are
//! configured ([`crate::signals`]), and ends the process with [`EXIT_BAD_SYSCALL`] (148,
//! Firecracker's status for a bad system call). The handler runs on the thread that made the call, under that thread's
//! filter, so it makes only `write`, `clock_gettime` and `exit_group`, which every filter allows, and being a
//! signal handler it only calls what is async-signal-safe: it allocates nothing, takes no lock,
//! and formats into a buffer on its stack. The thread's name is copied into a thread-local
//! buffer when the thread installs its filter, because asking for it later would take a system
//! call the filter may not allow. If the handler itself were stopped by the filter, the kernel
//! would kill the process with SIGSYS as before: the worst case is the old, silent one.

use std::cell::Cell;
use std::io;

/// The exit status of a process whose thread made a system call its filter forbids.
pub const EXIT_BAD_SYSCALL: i32 = 148;

include!(concat!(env!("OUT_DIR"), "/syscall_names.rs"));

/// `si_code` of a SIGSYS sent by seccomp.
const SYS_SECCOMP: libc::c_int = 1;

/// The longest thread name kept (Linux keeps 15 bytes; Rust names may be longer).
const NAME_MAX: usize = 32;

/// The longest report: the text, a 32-byte name, a number and a syscall name fit easily, and so
/// does the `signals` metrics line of [`crate::signals`].
const REPORT_MAX: usize = 256;

thread_local! {
    /// This thread's name, as the handler will print it (a const initializer and no destructor:
    /// reading it is a plain thread-local access, safe in a signal handler).
    static THREAD_NAME: Cell<([u8; NAME_MAX], usize)> = const { Cell::new(([0; NAME_MAX], 0)) };
}

/// The name of system call `number`, when the table built from the kernel headers has it.
pub fn syscall_name(number: i64) -> Option<&'static str> {
    let name = *SYSCALL_NAMES.get(usize::try_from(number).ok()?)?;
    (!name.is_empty()).then_some(name)
}

/// Copies the calling thread's name for the handler; call it before the filter goes in.
pub(crate) fn remember_thread_name() {
    let current = std::thread::current();
    let name = current.name().unwrap_or("").as_bytes();
    let len = name.len().min(NAME_MAX);
    let mut buf = [0; NAME_MAX];
    buf[..len].copy_from_slice(&name[..len]);
    // Cannot fail: the value is const-initialized and has no destructor.
    let _ = THREAD_NAME.try_with(|n| n.set((buf, len)));
}

/// Installs the process-wide SIGSYS handler (see the module's doc). Safe to repeat.
pub fn install_handler() -> io::Result<()> {
    // SAFETY: an all-zero sigaction is valid; every field that matters is set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `sa_mask` is a valid sigset_t to fill: every other signal waits while the report
    // is written.
    unsafe { libc::sigfillset(&mut action.sa_mask) };
    // SAFETY: `action` is a valid sigaction whose handler is an `extern "C"` function of the
    // SA_SIGINFO shape; the old action is not asked for.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The start of the kernel's `siginfo_t` for SIGSYS on 64-bit targets (`_sigsys` in the union
/// that starts at byte 16).
#[repr(C)]
struct SigsysInfo {
    _signo: libc::c_int,
    _errno: libc::c_int,
    code: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t (SA_SIGINFO), which is larger than and starts
    // with the fields of `SigsysInfo`, laid out as the kernel lays out SIGSYS's.
    let info = unsafe { &*info.cast::<SigsysInfo>() };
    let number = (info.code == SYS_SECCOMP).then_some(i64::from(info.syscall));
    let (name, len) = thread_name();
    let mut report = Report::new();
    write_report(&mut report, &name[..len], number);
    write_all(2, report.as_bytes());
    // Firecracker's seccomp.num_faults, in a last metrics line (when metrics are configured).
    crate::signals::write_last_metrics_line(1);
    // SAFETY: _exit ends the process at once (exit_group), running nothing else.
    unsafe { libc::_exit(EXIT_BAD_SYSCALL) };
}

/// The calling thread's name as remembered by [`remember_thread_name`] (empty if it never
/// was); safe in a signal handler.
pub(crate) fn thread_name() -> ([u8; NAME_MAX], usize) {
    THREAD_NAME
        .try_with(Cell::get)
        .unwrap_or(([0; NAME_MAX], 0))
}

/// Writes `bytes` to descriptor `fd` with `write` alone, as much as it takes; safe in a signal
/// handler. Gives up on an error: there is nobody left to tell.
pub(crate) fn write_all(fd: libc::c_int, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: writes bytes of a live buffer to a descriptor; a bad descriptor only fails.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n <= 0 {
            break;
        }
        bytes = &bytes[n as usize..];
    }
}

/// A report built on the stack; bytes past its capacity are dropped.
pub(crate) struct Report {
    buf: [u8; REPORT_MAX],
    len: usize,
}

impl Report {
    pub(crate) fn new() -> Self {
        Self {
            buf: [0; REPORT_MAX],
            len: 0,
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(REPORT_MAX - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    pub(crate) fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The report's text for a thread named `thread` (empty: named by its id) that made system call
/// `number` (`None`: SIGSYS that did not come from a filter).
fn write_report(report: &mut Report, thread: &[u8], number: Option<i64>) {
    report.push(b"kiln-vmm: seccomp: thread ");
    if thread.is_empty() {
        report.push(b"with id ");
        // SAFETY: gettid has no arguments and cannot fail; every filter allows it.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        report.push_number(tid.unsigned_abs());
    } else {
        report.push(thread);
    }
    match number {
        Some(number) => {
            report.push(b" made a forbidden system call ");
            if number < 0 {
                report.push(b"-");
            }
            report.push_number(number.unsigned_abs());
            if let Some(name) = syscall_name(number) {
                report.push(b" (");
                report.push(name.as_bytes());
                report.push(b")");
            }
        }
        None => report.push(b" got a SIGSYS that no seccomp filter sent"),
    }
    report.push(b"\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(thread: &[u8], number: Option<i64>) -> String {
        let mut r = Report::new();
        write_report(&mut r, thread, number);
        String::from_utf8(r.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn the_report_names_the_thread_and_the_call() {
        let with_names = std::path::Path::new("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
            .exists()
            && cfg!(target_arch = "x86_64");
        let expected = if with_names {
            "kiln-vmm: seccomp: thread kiln_api made a forbidden system call 257 (openat)\n"
        } else {
            "kiln-vmm: seccomp: thread kiln_api made a forbidden system call 257\n"
        };
        assert_eq!(text(b"kiln_api", Some(257)), expected);
        assert_eq!(
            text(b"kiln_vcpu0", Some(100_000)),
            "kiln-vmm: seccomp: thread kiln_vcpu0 made a forbidden system call 100000\n"
        );
        assert_eq!(
            text(b"main", None),
            "kiln-vmm: seccomp: thread main got a SIGSYS that no seccomp filter sent\n"
        );
        assert!(text(b"", Some(-1)).starts_with("kiln-vmm: seccomp: thread with id "));
        assert!(text(b"", Some(-1)).ends_with(" made a forbidden system call -1\n"));
    }

    #[test]
    fn a_long_name_cannot_overflow_the_report() {
        let long = [b'x'; 4 * REPORT_MAX];
        let t = text(&long, Some(1));
        assert_eq!(t.len(), REPORT_MAX);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_table_agrees_with_libc_where_it_was_built() {
        if SYSCALL_NAMES.is_empty() {
            // Built without the kernel headers: numbers only, as the report test checks.
            assert!(
                !std::path::Path::new("/usr/include/x86_64-linux-gnu/asm/unistd_64.h").exists(),
                "the headers are here but the table is empty"
            );
            return;
        }
        for (number, name) in [
            (libc::SYS_read, "read"),
            (libc::SYS_write, "write"),
            (libc::SYS_openat, "openat"),
            (libc::SYS_socket, "socket"),
            (libc::SYS_ptrace, "ptrace"),
            (libc::SYS_clone3, "clone3"),
            (libc::SYS_exit_group, "exit_group"),
        ] {
            assert_eq!(syscall_name(number), Some(name), "{number}");
        }
        assert_eq!(syscall_name(-1), None);
        assert_eq!(syscall_name(1 << 40), None);
    }

    #[test]
    fn the_thread_name_is_kept_for_the_handler() {
        let name = std::thread::Builder::new()
            .name("kiln_vcpu_with_a_long_name_past_32_bytes".into())
            .spawn(|| {
                remember_thread_name();
                THREAD_NAME.with(Cell::get)
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(&name.0[..name.1], b"kiln_vcpu_with_a_long_name_past_");
    }
}
