//! Each kind of thread's seccomp filter kills the whole process (SIGSYS) at the first system call
//! it does not allow: a forked child installs one filter, makes calls the filter allows, then one
//! it does not. The same child without the forbidden call exits normally, so the kill comes from
//! that call and not from the setup around it. `--no-seccomp` runs a guest without filters,
//! saying so.

mod common;

use std::time::Duration;

use common::{GREETING, Program, kiln_vmm, scratch, tiny_kernel, write};
use kiln_vmm::seccomp::{ThreadKind, install_program, program};

/// How a forked child ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Exited(i32),
    Signaled(i32),
}

/// Forks a child that installs the `kind` filter, runs `body` (raw system calls only: the child
/// of a multi-threaded process may not allocate) and ends the way that kind of thread does: the
/// VMM thread with `exit_group(0)`, the others with `exit(0)` (its only thread, so the process).
fn run_filtered(kind: ThreadKind, body: impl FnOnce()) -> End {
    let filter = program(kind).expect("the embedded filter decodes");
    // SAFETY: the child only makes raw system calls (no allocation, no locks) and then exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed: {}", std::io::Error::last_os_error());
    if pid == 0 {
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
    let mut status = 0;
    // SAFETY: waits for the child just forked, into a valid status word.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFSIGNALED(status) {
        End::Signaled(libc::WTERMSIG(status))
    } else {
        End::Exited(libc::WEXITSTATUS(status))
    }
}

/// A call each filter allows: a write to a descriptor that is not open.
fn allowed_write() {
    // SAFETY: writing 0 bytes from a null buffer to fd -1 fails with EBADF and touches nothing.
    unsafe { libc::write(-1, std::ptr::null(), 0) };
}

#[test]
fn the_vmm_filter_kills_on_an_inet_socket() {
    let inet = || {
        allowed_write();
        // SAFETY: socket() has no memory arguments; the descriptor, if any, is never used.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    };
    assert_eq!(run_filtered(ThreadKind::Vmm, allowed_write), End::Exited(0));
    assert_eq!(
        run_filtered(ThreadKind::Vmm, inet),
        End::Signaled(libc::SIGSYS)
    );
}

#[test]
fn the_api_filter_kills_on_ptrace() {
    let ptrace = || {
        allowed_write();
        // SAFETY: PTRACE_TRACEME has no memory arguments.
        unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
    };
    assert_eq!(run_filtered(ThreadKind::Api, allowed_write), End::Exited(0));
    assert_eq!(
        run_filtered(ThreadKind::Api, ptrace),
        End::Signaled(libc::SIGSYS)
    );
}

#[test]
fn the_vcpu_filter_kills_on_open_and_on_an_ioctl_outside_its_list() {
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
    assert_eq!(run_filtered(ThreadKind::Vcpu, kvm_run), End::Exited(0));
    assert_eq!(
        run_filtered(ThreadKind::Vcpu, open),
        End::Signaled(libc::SIGSYS)
    );
    assert_eq!(
        run_filtered(ThreadKind::Vcpu, create_vm),
        End::Signaled(libc::SIGSYS)
    );
}

#[test]
fn abort_after_a_panic_still_ends_with_sigabrt_under_every_filter() {
    for kind in ThreadKind::ALL {
        let abort = || {
            // SAFETY: abort() ends the process; it touches no memory of ours.
            unsafe { libc::abort() };
        };
        assert_eq!(
            run_filtered(kind, abort),
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
