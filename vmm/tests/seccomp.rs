//! Each kind of thread's seccomp filter stops the process at the first system call it does not
//! allow, and says so: a forked child installs one filter, makes calls the filter allows, then
//! one it does not, and must exit with status 148 after writing which thread made which call.
//! The same child without the forbidden call exits normally, so the stop comes from that call and
//! not from the setup around it. `--no-seccomp` runs a guest without filters, saying so.

mod common;

use std::io::Read;
use std::os::fd::FromRawFd;
use std::time::Duration;

use common::{GREETING, Program, kiln_vmm, scratch, tiny_kernel, write};
use kiln_vmm::seccomp::sigsys::syscall_name;
use kiln_vmm::seccomp::{EXIT_BAD_SYSCALL, ThreadKind, install_program, program};

/// How a forked child ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Exited(i32),
    Signaled(i32),
}

/// Forks a child that installs the `kind` filter, runs `body` (raw system calls only: the child
/// of a multi-threaded process may not allocate) and ends the way that kind of thread does: the
/// VMM thread with `exit_group(0)`, the others with `exit(0)` (its only thread, so the process).
/// Returns how it ended and what it wrote on stderr.
fn run_filtered(kind: ThreadKind, body: impl FnOnce()) -> (End, String) {
    let filter = program(kind).expect("the embedded filter decodes");
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe() returns.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: the child only makes raw system calls (no allocation, no locks) and then exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: the child's stderr becomes the pipe; plain descriptor calls.
        unsafe {
            libc::dup2(fds[1], 2);
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        if install_program(kind, &filter).is_err() {
            // SAFETY: _exit ends the child without running anything of the parent's.
            unsafe { libc::_exit(99) };
        }
        body();
        let exit = match kind {
            ThreadKind::Vmm => libc::SYS_exit_group,
            _ => libc::SYS_exit,
        };
        // SAFETY: ends the calling (and only) thread of the child.
        unsafe { libc::syscall(exit, 0) };
        unreachable!("exit returned");
    }
    let mut stderr = String::new();
    // SAFETY: the write end is the child's; the read end is ours alone from here.
    unsafe {
        libc::close(fds[1]);
        let _ = std::fs::File::from_raw_fd(fds[0]).read_to_string(&mut stderr);
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked, into a valid status word.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid, "waitpid: {}", std::io::Error::last_os_error());
    let end = if libc::WIFSIGNALED(status) {
        End::Signaled(libc::WTERMSIG(status))
    } else {
        End::Exited(libc::WEXITSTATUS(status))
    };
    (end, stderr)
}

/// Asserts that `kind`'s filter stopped the child at system call `number` named `name`, saying
/// so on stderr.
fn assert_stopped_at(kind: ThreadKind, (end, stderr): (End, String), number: i64, name: &str) {
    assert_eq!(
        end,
        End::Exited(EXIT_BAD_SYSCALL),
        "{kind}: stderr {stderr:?}"
    );
    // A build without the kernel headers reports numbers only.
    let report = match syscall_name(number) {
        Some(known) => {
            assert_eq!(known, name);
            format!(" made a forbidden system call {number} ({name})\n")
        }
        None => format!(" made a forbidden system call {number}\n"),
    };
    assert!(
        stderr.starts_with("kiln-vmm: seccomp: thread ") && stderr.ends_with(&report),
        "{kind}: {stderr:?}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
}

/// A call each filter allows: a write to a descriptor that is not open.
fn allowed_write() {
    // SAFETY: writing 0 bytes from a null buffer to fd -1 fails with EBADF and touches nothing.
    unsafe { libc::write(-1, std::ptr::null(), 0) };
}

#[test]
fn the_vmm_filter_stops_an_inet_socket_and_names_it() {
    let inet = || {
        allowed_write();
        // SAFETY: socket() has no memory arguments; the descriptor, if any, is never used.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    };
    assert_eq!(
        run_filtered(ThreadKind::Vmm, allowed_write),
        (End::Exited(0), String::new())
    );
    let stopped = run_filtered(ThreadKind::Vmm, inet);
    assert_stopped_at(ThreadKind::Vmm, stopped, libc::SYS_socket, "socket");
}

#[test]
fn the_api_filter_stops_ptrace_and_names_it() {
    let ptrace = || {
        allowed_write();
        // SAFETY: PTRACE_TRACEME has no memory arguments.
        unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
    };
    assert_eq!(
        run_filtered(ThreadKind::Api, allowed_write),
        (End::Exited(0), String::new())
    );
    let stopped = run_filtered(ThreadKind::Api, ptrace);
    assert_stopped_at(ThreadKind::Api, stopped, libc::SYS_ptrace, "ptrace");
}

#[test]
fn the_vcpu_filter_stops_open_and_an_ioctl_outside_its_list() {
    // KVM_RUN on a descriptor that is not open fails with EBADF: allowed.
    let kvm_run = || {
        allowed_write();
        // SAFETY: an ioctl on fd -1 fails before looking at its argument.
        unsafe { libc::ioctl(-1, 0xae80, 0) };
    };
    let open = || {
        // SAFETY: the path is a valid NUL-terminated string; the descriptor is never used.
        unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
    };
    // KVM_CREATE_VM is not something a vCPU thread does.
    let create_vm = || {
        // SAFETY: as above.
        unsafe { libc::ioctl(-1, 0xae01, 0) };
    };
    assert_eq!(
        run_filtered(ThreadKind::Vcpu, kvm_run),
        (End::Exited(0), String::new())
    );
    // glibc's open() is the openat system call.
    let stopped = run_filtered(ThreadKind::Vcpu, open);
    assert_stopped_at(ThreadKind::Vcpu, stopped, libc::SYS_openat, "openat");
    let stopped = run_filtered(ThreadKind::Vcpu, create_vm);
    assert_stopped_at(ThreadKind::Vcpu, stopped, libc::SYS_ioctl, "ioctl");
}

#[test]
fn abort_after_a_panic_still_ends_with_sigabrt_under_every_filter() {
    for kind in ThreadKind::ALL {
        let abort = || {
            // SAFETY: abort() ends the process; it touches no memory of ours.
            unsafe { libc::abort() };
        };
        assert_eq!(
            run_filtered(kind, abort).0,
            End::Signaled(libc::SIGABRT),
            "{kind}"
        );
    }
}

#[test]
fn an_install_failure_names_the_thread_and_the_filter() {
    let err = std::thread::Builder::new()
        .name("kiln_vcpu7".into())
        .spawn(|| install_program(ThreadKind::Vcpu, &Vec::new()).unwrap_err())
        .unwrap()
        .join()
        .unwrap()
        .to_string();
    assert!(
        err.contains("kiln_vcpu7") && err.contains("vcpu seccomp filter"),
        "{err}"
    );
}

#[test]
fn no_seccomp_warns_and_the_guest_still_runs() {
    let dir = scratch("no-seccomp");
    let kernel = write(&dir, "tiny.elf", &tiny_kernel(Program::Hello, false));
    let args = ["--kernel", kernel.to_str().unwrap(), "--mem-mib", "32"];
    let with = kiln_vmm(&args, Duration::from_secs(60));
    let without = kiln_vmm(
        &[&args[..], &["--no-seccomp"]].concat(),
        Duration::from_secs(60),
    );
    for out in [&with, &without] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(GREETING));
    }
    assert!(with.stderr.is_empty(), "no warning with the filters on");
    assert!(
        String::from_utf8_lossy(&without.stderr)
            .contains("warning: --no-seccomp: no seccomp filters"),
        "{}",
        String::from_utf8_lossy(&without.stderr)
    );
}
