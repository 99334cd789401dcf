//! The last steps, inside the jail: optionally a new PID namespace, `--daemonize`, dropping to
//! uid:gid, and the exec of `/<exec-name>` with an empty environment.
//!
//! Without `--new-pid-ns` the jailer process itself becomes the VMM. With it, the jailer forks
//! the VMM as init of a new PID namespace and writes its host PID to `/<exec-name>.pid` in the
//! jail; a close-on-exec pipe tells it whether the child reached the exec or why not. Then it
//! either returns at once (`--daemonize`) or waits, passing on SIGINT, SIGTERM, SIGHUP and SIGQUIT,
//! and ends the way the VMM ended. The waiting jailer stays root inside the jail, so it can
//! still take the jail back if the child fails before the exec.
//!
//! The VMM gets Firecracker's jailer's arguments first, `--id`, `--start-time-us`,
//! `--start-time-cpu-us` and `--parent-cpu-time-us` (so its start-up metrics begin when the
//! jailer did), then the arguments given after `--`. With `--daemonize` and no new PID namespace, a failure
//! after the standard streams went to /dev/null shows only in the exit status, as in Firecracker;
//! the steps left by then (prctl, the id change, an exec whose files were checked) do not fail
//! on a sane host.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::env::{self, EnvError};
use crate::privs::{self, PrivError};
use crate::sys::{check, getpid};

/// The flags the jailer passes to the VMM itself (so they may not follow `--`).
pub const PASSED_FLAGS: [&str; 4] = [
    "--id",
    "--start-time-us",
    "--start-time-cpu-us",
    "--parent-cpu-time-us",
];

/// A moment as the VMM's start-up metrics measure it: microseconds of `CLOCK_MONOTONIC` and of
/// this process's CPU time (`CLOCK_PROCESS_CPUTIME_ID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartTime {
    /// Monotonic clock.
    pub wall_us: u64,
    /// CPU time of this process so far.
    pub cpu_us: u64,
}

impl StartTime {
    /// Now.
    pub fn now() -> Self {
        Self {
            wall_us: clock_us(libc::CLOCK_MONOTONIC),
            cpu_us: clock_us(libc::CLOCK_PROCESS_CPUTIME_ID),
        }
    }
}

fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which outlives the call; both clocks exist on
    // every Linux kiln-jailer runs on.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1000
}

/// The VMM's arguments: Firecracker's jailer's four, then `extra` (those after `--`). `started`
/// is when the jailer started. A VMM exec'd in this process keeps its CPU clock, so it counts
/// from the jailer's start itself; a forked one starts its clock at zero, and is told the CPU
/// time the jailer had used by then as its parent's (`cpu_now`).
pub fn vmm_args(
    id: &str,
    started: StartTime,
    forked_at_cpu: Option<u64>,
    extra: &[String],
) -> Vec<String> {
    let (start_cpu, parent_cpu) = match forked_at_cpu {
        None => (started.cpu_us, 0),
        Some(cpu_now) => (0, cpu_now.saturating_sub(started.cpu_us)),
    };
    let mut args = vec![
        "--id".to_string(),
        id.to_string(),
        "--start-time-us".to_string(),
        started.wall_us.to_string(),
        "--start-time-cpu-us".to_string(),
        start_cpu.to_string(),
        "--parent-cpu-time-us".to_string(),
        parent_cpu.to_string(),
    ];
    args.extend_from_slice(extra);
    args
}

/// How the jailed process is started.
pub struct Spec {
    /// The exec file inside the jail, `/<exec-name>`.
    pub exec: PathBuf,
    /// The jail's id, passed on as `--id`.
    pub id: String,
    /// When the jailer started.
    pub started: StartTime,
    /// The arguments given after `--`.
    pub args: Vec<String>,
    /// Who it runs as.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// `/dev/null`, opened before entering the jail, when `--daemonize` is given.
    pub dev_null: Option<File>,
    /// Where the child's PID goes with `--new-pid-ns`.
    pub pid_file: PathBuf,
}

/// A launch step that failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The PID namespace or the fork into it failed.
    #[error("cannot {what}: {err}")]
    PidNs {
        /// Which call.
        what: &'static str,
        /// What the OS said.
        err: io::Error,
    },
    /// The PID file could not be written.
    #[error("cannot write the PID file {}: {err}", path.display())]
    PidFile {
        /// Its path inside the jail.
        path: PathBuf,
        /// What the OS said.
        err: io::Error,
    },
    /// `--daemonize` failed.
    #[error(transparent)]
    Daemonize(#[from] EnvError),
    /// Dropping privileges failed.
    #[error("dropping to uid:gid: {0}")]
    Privileges(#[from] PrivError),
    /// The exec itself failed.
    #[error("cannot exec {}: {err}", path.display())]
    Exec {
        /// The exec file inside the jail.
        path: PathBuf,
        /// What the OS said.
        err: io::Error,
    },
    /// The child in the new PID namespace failed before its exec; it said why.
    #[error("{0}")]
    Child(String),
}

impl LaunchError {
    /// The step named in messages.
    pub fn step(&self) -> &'static str {
        match self {
            LaunchError::PidNs { .. } | LaunchError::PidFile { .. } => "pid namespace",
            LaunchError::Daemonize(_) => "daemonize",
            LaunchError::Privileges(_) => "drop privileges",
            LaunchError::Exec { .. } => "exec",
            LaunchError::Child(_) => "in the new PID namespace",
        }
    }
}

/// The host PID of the VMM forked into a new PID namespace, once it has been exec'd.
pub struct Started(pub libc::pid_t);

/// Becomes the VMM in this process: daemonizes if asked, drops privileges, execs. Returns only
/// on failure, with whether the process is still root (and so can still clean up).
pub fn exec_here(spec: &Spec) -> (LaunchError, bool) {
    if let Some(dev_null) = &spec.dev_null
        && let Err(e) = env::daemonize(dev_null)
    {
        return (e.into(), true);
    }
    let args = vmm_args(&spec.id, spec.started, None, &spec.args);
    become_vmm(spec, &args, false)
}

/// Forks the VMM as init of a new PID namespace. Returns in the jailer once the child has exec'd,
/// or with the child's reason when it could not; the child never returns.
pub fn fork_into_pid_ns(spec: &Spec) -> Result<Started, LaunchError> {
    let pidns = |what| move |err| LaunchError::PidNs { what, err };
    // SAFETY: unshare has no memory effects; only children forked from now on are affected.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) })
        .map_err(pidns("unshare the PID namespace"))?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })
        .map_err(pidns("make the exec pipe"))?;
    // SAFETY: both descriptors were just made and are owned by nobody else.
    let (mut report_rx, report_tx) = unsafe {
        (
            File::from(OwnedFd::from_raw_fd(fds[0])),
            File::from(OwnedFd::from_raw_fd(fds[1])),
        )
    };
    // The child's CPU clock starts at zero: it is told what the jailer used up to here.
    let args = vmm_args(
        &spec.id,
        spec.started,
        Some(StartTime::now().cpu_us),
        &spec.args,
    );
    // SAFETY: the jailer is single-threaded, so the child may go on running Rust code.
    let pid = check(unsafe { libc::fork() }).map_err(pidns("fork into the PID namespace"))?;
    if pid == 0 {
        drop(report_rx);
        child(spec, &args, report_tx);
    }
    drop(report_tx);
    // A tiny `--resource-limit fsize` must fail this write, not kill the jailer with SIGXFSZ
    // before it can clean up; the child, which execs, keeps the default.
    // SAFETY: ignoring a signal has no memory effects.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    if let Err(err) = std::fs::write(&spec.pid_file, pid.to_string()) {
        // SAFETY: kill and waitpid on our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(LaunchError::PidFile {
            path: spec.pid_file.clone(),
            err,
        });
    }
    let mut report = String::new();
    let _ = report_rx.read_to_string(&mut report);
    if report.is_empty() {
        return Ok(Started(pid));
    }
    // SAFETY: the child is exiting after its report; reap it so its cgroups empty.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    Err(LaunchError::Child(report))
}

/// The child: everything up to the exec, reporting through `report` (closed by a good exec).
/// `args` are the VMM's, made before the fork.
fn child(spec: &Spec, args: &[String], mut report: File) -> ! {
    let daemonized = match &spec.dev_null {
        Some(dev_null) => env::daemonize(dev_null).map(|()| true),
        None => Ok(false),
    };
    let err = match daemonized {
        Ok(daemonized) => become_vmm(spec, args, !daemonized).0,
        Err(e) => e.into(),
    };
    let _ = report.write_all(format!("{}: {err}", err.step()).as_bytes());
    // SAFETY: _exit ends the child without running the parent's atexit handlers.
    unsafe { libc::_exit(1) }
}

/// Drops privileges and execs with `args`; returns only on failure, with whether ids are still
/// root's.
fn become_vmm(spec: &Spec, args: &[String], die_with_parent: bool) -> (LaunchError, bool) {
    if let Err(e) = privs::prepare() {
        return (e.into(), true);
    }
    if let Err(e) = privs::drop_to(spec.uid, spec.gid) {
        let still_root = !e.ids_changed;
        return (e.into(), still_root);
    }
    if die_with_parent {
        // Set after the id change, which clears it. If the waiting jailer is killed, so is the VMM.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    }
    let err = exec(spec, args);
    (
        LaunchError::Exec {
            path: spec.exec.clone(),
            err,
        },
        false,
    )
}

/// execve with an empty environment; returns why it failed.
fn exec(spec: &Spec, args: &[String]) -> io::Error {
    let Ok(path) = crate::sys::cstring(&spec.exec) else {
        return io::Error::from(io::ErrorKind::InvalidInput);
    };
    let mut argv = vec![path.clone()];
    for a in args {
        match CString::new(a.as_bytes()) {
            Ok(c) => argv.push(c),
            Err(_) => return io::Error::new(io::ErrorKind::InvalidInput, "an argument holds NUL"),
        }
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: path and every argv entry are NUL-terminated and outlive the call; both arrays end
    // with a null pointer.
    unsafe { libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}

/// The VMM's PID for the signal handler.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: libc::c_int) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Waits for the VMM, passing signals on, and ends this process the way the VMM ended: its exit
/// status, or the same signal.
pub fn wait_and_mirror(Started(pid): Started) -> ! {
    CHILD.store(pid, Ordering::Relaxed);
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: a zeroed sigaction with a handler that only calls kill; SA_RESTART keeps
        // waitpid going.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = forward as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into `status`.
        let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
        if ret == pid {
            break;
        }
        if ret == -1 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            eprintln!(
                "kiln-jailer: cannot wait for the VMM (pid {pid}): {}",
                io::Error::last_os_error()
            );
            std::process::exit(1);
        }
    }
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        // SAFETY: restoring the default action and raising the signal on ourselves.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::kill(getpid(), signal);
        }
        std::process::exit(128 + signal);
    }
    std::process::exit(libc::WEXITSTATUS(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_vmm_gets_firecrackers_jailer_arguments_before_the_callers() {
        let started = StartTime {
            wall_us: 5_000_000,
            cpu_us: 700,
        };
        let extra = strings(&["--api-sock", "/api.sock"]);
        // Exec'd here: the CPU clock goes on, so it counts from the jailer's start itself.
        assert_eq!(
            vmm_args("vm-1", started, None, &extra),
            strings(&[
                "--id",
                "vm-1",
                "--start-time-us",
                "5000000",
                "--start-time-cpu-us",
                "700",
                "--parent-cpu-time-us",
                "0",
                "--api-sock",
                "/api.sock",
            ])
        );
        // Forked: its clock starts at zero, and the jailer's CPU time so far is its parent's.
        assert_eq!(
            vmm_args("vm-1", started, Some(1_900), &[])[4..],
            strings(&["--start-time-cpu-us", "0", "--parent-cpu-time-us", "1200"])
        );
    }

    #[test]
    fn start_times_come_from_clocks_that_move() {
        let a = StartTime::now();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        let b = StartTime::now();
        assert!(
            b.wall_us > a.wall_us && b.cpu_us > a.cpu_us,
            "{a:?} then {b:?}"
        );
    }
}
