//! Starting a process: everything is prepared (C strings, pointer arrays, groups, the `PATH`
//! candidates) before `fork`, because the child of a threaded process may only make
//! async-signal-safe calls. The child reports a failure (which step, which errno) through a
//! close-on-exec pipe, so "could not start" is told apart from "started and exited".

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::ptr;

use super::reaper::reaper;
use super::sys;
use super::user::{self, Identity};
use crate::protocol::{ErrorInfo, ErrorKind, ExecSpec};

/// `PATH` when the request does not set one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A process ready to be forked.
pub struct Plan {
    program: String,
    argv: Vec<CString>,
    envp: Vec<CString>,
    candidates: Vec<CString>,
    cwd: CString,
    cwd_text: String,
    user_text: String,
    identity: Option<Identity>,
}

fn c_string(what: &str, s: &str) -> Result<CString, ErrorInfo> {
    CString::new(s).map_err(|_| {
        ErrorInfo::new(
            ErrorKind::BadRequest,
            format!("{what} {s:?} contains a NUL byte"),
        )
    })
}

impl Plan {
    /// Checks and converts `spec`, whose environment starts from the built-in variables with
    /// `defaults` (the agent's default environment) over them. Errors are bad requests (malformed
    /// values) or could-not-start (an unknown user).
    pub fn new(spec: &ExecSpec, defaults: &BTreeMap<String, String>) -> Result<Plan, ErrorInfo> {
        let program = spec
            .argv
            .first()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| ErrorInfo::new(ErrorKind::BadRequest, "argv is empty"))?
            .clone();
        let identity = match &spec.user {
            None => None,
            Some(u) => Some(user::resolve(u, Path::new("/")).map_err(|e| {
                ErrorInfo::new(
                    ErrorKind::CouldNotStart,
                    format!("could not start {program:?}: {e}"),
                )
            })?),
        };
        let env = environment(spec, defaults, identity.as_ref())?;
        let path = env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
        let candidates = if program.contains('/') {
            vec![program.clone()]
        } else {
            path.split(':')
                .map(|dir| {
                    let dir = if dir.is_empty() { "." } else { dir };
                    format!("{}/{program}", dir.trim_end_matches('/'))
                })
                .collect()
        };
        let cwd_text = spec.cwd.clone().unwrap_or_else(|| "/".into());
        Ok(Plan {
            argv: spec
                .argv
                .iter()
                .map(|a| c_string("argument", a))
                .collect::<Result<_, _>>()?,
            envp: env
                .iter()
                .map(|(k, v)| c_string("environment variable", &format!("{k}={v}")))
                .collect::<Result<_, _>>()?,
            candidates: candidates
                .iter()
                .map(|c| c_string("program", c))
                .collect::<Result<_, _>>()?,
            cwd: c_string("directory", &cwd_text)?,
            cwd_text,
            user_text: spec.user.clone().unwrap_or_default(),
            program,
            identity,
        })
    }
}

fn environment(
    spec: &ExecSpec,
    defaults: &BTreeMap<String, String>,
    identity: Option<&Identity>,
) -> Result<BTreeMap<String, String>, ErrorInfo> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
    let root = identity.map_or_else(|| sys::euid() == 0, |id| id.uid == 0);
    let home = identity.and_then(|id| id.home.clone());
    let home = home.unwrap_or_else(|| if root { "/root" } else { "/" }.to_string());
    env.insert("HOME".to_string(), home);
    if let Some(name) = identity.and_then(|id| id.name.clone()) {
        env.insert("USER".to_string(), name.clone());
        env.insert("LOGNAME".to_string(), name);
    }
    if spec.tty.is_some() {
        env.insert("TERM".to_string(), "xterm-256color".to_string());
    }
    for (k, v) in defaults.iter().chain(&spec.env) {
        if k.is_empty() || k.contains('=') {
            return Err(ErrorInfo::new(
                ErrorKind::BadRequest,
                format!("environment variable name {k:?} is empty or contains '='"),
            ));
        }
        env.insert(k.clone(), v.clone());
    }
    Ok(env)
}

/// The descriptors the child gets as 0, 1 and 2.
pub struct ChildStdio {
    /// Becomes stdin.
    pub stdin: OwnedFd,
    /// Becomes stdout.
    pub stdout: OwnedFd,
    /// Becomes stderr.
    pub stderr: OwnedFd,
    /// Stdin is a terminal that becomes the controlling terminal.
    pub tty: bool,
}

/// The step of starting that failed in the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Stage {
    Session = 1,
    Stdio = 2,
    User = 3,
    Cwd = 4,
    Exec = 5,
}

/// Why the child could not be started.
#[derive(Debug)]
pub struct SpawnError {
    message: String,
    errno: i32,
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<SpawnError> for ErrorInfo {
    fn from(e: SpawnError) -> ErrorInfo {
        ErrorInfo {
            kind: ErrorKind::CouldNotStart,
            message: e.message,
            errno: Some(e.errno),
        }
    }
}

fn spawn_error(plan: &Plan, stage: Option<Stage>, errno: i32) -> SpawnError {
    let err = std::io::Error::from_raw_os_error(errno);
    let p = &plan.program;
    let message = match stage {
        Some(Stage::Exec) => format!("could not start {p:?}: {err}"),
        Some(Stage::Cwd) => format!(
            "could not start {p:?}: cannot change directory to {:?}: {err}",
            plan.cwd_text
        ),
        Some(Stage::User) => format!(
            "could not start {p:?}: cannot switch to user {:?}: {err}",
            plan.user_text
        ),
        Some(Stage::Stdio) => format!("could not start {p:?}: cannot set up stdio: {err}"),
        Some(Stage::Session) => format!("could not start {p:?}: cannot create a session: {err}"),
        None => format!("could not start {p:?}: fork failed: {err}"),
    };
    SpawnError { message, errno }
}

/// Forks and execs `plan` in a new session (so its pid is also its process group), registered
/// with the reaper. Returns the pid once the exec succeeded.
pub fn spawn(plan: &Plan, stdio: &ChildStdio) -> Result<libc::pid_t, SpawnError> {
    let mut argv: Vec<*const libc::c_char> = plan.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(ptr::null());
    let mut envp: Vec<*const libc::c_char> = plan.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(ptr::null());
    let groups: Vec<libc::gid_t> = plan
        .identity
        .as_ref()
        .map(|id| id.groups.clone())
        .unwrap_or_default();
    let (err_read, err_write) =
        sys::pipe().map_err(|e| spawn_error(plan, None, e.raw_os_error().unwrap_or(0)))?;
    let child = Child {
        plan,
        argv: &argv,
        envp: &envp,
        groups: &groups,
        stdio,
        err_fd: err_write.as_raw_fd(),
    };
    let pid = reaper()
        .spawn(|| {
            // SAFETY: fork(2); the child branch only runs `Child::exec`, which makes
            // async-signal-safe calls on memory prepared before the fork and never returns.
            match unsafe { libc::fork() } {
                -1 => Err(std::io::Error::last_os_error()),
                // SAFETY: we are the freshly forked child (see above).
                0 => unsafe { child.exec() },
                pid => Ok(pid),
            }
        })
        .map_err(|e| spawn_error(plan, None, e.raw_os_error().unwrap_or(0)))?;
    drop(err_write);
    let mut report = [0u8; 8];
    let got = sys::read_full(&err_read, &mut report);
    if got == 0 {
        return Ok(pid);
    }
    // The child failed before exec and exited 127; collect it so nothing is left behind.
    reaper().wait(pid, None);
    let stage = [
        Stage::Session,
        Stage::Stdio,
        Stage::User,
        Stage::Cwd,
        Stage::Exec,
    ]
    .into_iter()
    .find(|s| *s as u8 == report[0]);
    let errno = i32::from_le_bytes([report[4], report[5], report[6], report[7]]);
    Err(spawn_error(plan, stage, errno))
}

/// What the forked child needs, all prepared in the parent.
struct Child<'a> {
    plan: &'a Plan,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    groups: &'a [libc::gid_t],
    stdio: &'a ChildStdio,
    err_fd: RawFd,
}

fn errno() -> i32 {
    // SAFETY: reading the calling thread's errno.
    unsafe { *libc::__errno_location() }
}

impl Child<'_> {
    /// Reports `stage`/`errno` to the parent and exits.
    ///
    /// # Safety
    /// Only in the forked child.
    unsafe fn fail(&self, stage: Stage, errno: i32) -> ! {
        let mut report = [0u8; 8];
        report[0] = stage as u8;
        report[4..].copy_from_slice(&errno.to_le_bytes());
        // SAFETY: write(2) and _exit(2) are async-signal-safe; `report` is a local buffer.
        unsafe {
            libc::write(self.err_fd, report.as_ptr().cast(), report.len());
            libc::_exit(127)
        }
    }

    /// Sets up the process and execs it.
    ///
    /// # Safety
    /// Only in the forked child: it replaces the process image or exits.
    unsafe fn exec(&self) -> ! {
        // SAFETY: every call below is async-signal-safe and uses memory that the parent prepared
        // before the fork and that stays valid (the parent's stack frame is copied into ours).
        unsafe {
            // The agent ignores SIGPIPE (Rust's runtime does) and may block signals; the child
            // must start with the defaults, since both are inherited across exec.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            if libc::setsid() < 0 {
                self.fail(Stage::Session, errno());
            }
            let io = self.stdio;
            if io.tty && libc::ioctl(io.stdin.as_raw_fd(), libc::TIOCSCTTY, 0) < 0 {
                self.fail(Stage::Session, errno());
            }
            for (fd, target) in [(&io.stdin, 0), (&io.stdout, 1), (&io.stderr, 2)] {
                let fd = fd.as_raw_fd();
                let ok = if fd == target {
                    libc::fcntl(fd, libc::F_SETFD, 0) == 0
                } else {
                    libc::dup2(fd, target) == target
                };
                if !ok {
                    self.fail(Stage::Stdio, errno());
                }
            }
            if let Some(id) = &self.plan.identity
                && (libc::setgroups(self.groups.len(), self.groups.as_ptr()) < 0
                    || libc::setgid(id.gid) < 0
                    || libc::setuid(id.uid) < 0)
            {
                self.fail(Stage::User, errno());
            }
            if libc::chdir(self.plan.cwd.as_ptr()) < 0 {
                self.fail(Stage::Cwd, errno());
            }
            // Like execvp: keep searching past "not here", remember "not allowed", stop at
            // anything else.
            let mut denied = false;
            let mut last = libc::ENOENT;
            for path in &self.plan.candidates {
                libc::execve(path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr());
                last = errno();
                match last {
                    libc::EACCES => denied = true,
                    libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENAMETOOLONG => {}
                    _ => break,
                }
            }
            let reported = if denied && matches!(last, libc::ENOENT | libc::ENOTDIR) {
                libc::EACCES
            } else {
                last
            };
            self.fail(Stage::Exec, reported)
        }
    }
}
