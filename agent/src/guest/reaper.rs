//! The agent's only `wait`: one thread reaps every child (and, as PID 1 or a subreaper, every
//! orphan) and hands each status to whoever registered for that pid. Registration happens under
//! the same lock as the fork, so a child that exits at once cannot be reaped before it is known.
//! Nothing else in the agent may call `wait*` or `std::process`, or statuses would be stolen.

use std::collections::HashMap;
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::Instant;

use crate::protocol::ExitStatus;

struct State {
    /// Registered pids; `Some` once reaped.
    watched: HashMap<libc::pid_t, Option<ExitStatus>>,
    /// Bumped on every fork, so the reaper knows a new child may exist.
    forks: u64,
}

/// The central reaper.
pub struct Reaper {
    state: Mutex<State>,
    /// Signalled when a watched pid is reaped.
    reaped: Condvar,
    /// Signalled when a child is forked.
    forked: Condvar,
}

/// The process-wide reaper, started on first use.
pub fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<&'static Reaper> = OnceLock::new();
    REAPER.get_or_init(|| {
        let r: &'static Reaper = Box::leak(Box::new(Reaper {
            state: Mutex::new(State {
                watched: HashMap::new(),
                forks: 0,
            }),
            reaped: Condvar::new(),
            forked: Condvar::new(),
        }));
        let spawned = thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r.run());
        if let Err(e) = spawned {
            crate::guest::log(format_args!("cannot start the reaper thread: {e}"));
        }
        r
    })
}

fn decode(status: libc::c_int) -> Option<ExitStatus> {
    if libc::WIFEXITED(status) {
        Some(ExitStatus::Exited(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(ExitStatus::Signaled(libc::WTERMSIG(status)))
    } else {
        None
    }
}

impl Reaper {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self) {
        loop {
            let forks = self.lock().forks;
            let mut status = 0;
            // SAFETY: waitpid with a valid out-pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid > 0 {
                let Some(st) = decode(status) else { continue };
                let mut s = self.lock();
                if let Some(slot) = s.watched.get_mut(&pid) {
                    *slot = Some(st);
                    self.reaped.notify_all();
                }
                continue;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                // No children: sleep until the next fork.
                _ => {
                    let mut s = self.lock();
                    while s.forks == forks {
                        s = self.forked.wait(s).unwrap_or_else(|p| p.into_inner());
                    }
                }
            }
        }
    }

    /// Runs `fork` (which returns the new child's pid in the parent) with the reaper locked, and
    /// registers the pid before anyone can reap it.
    pub fn spawn(&self, fork: impl FnOnce() -> io::Result<libc::pid_t>) -> io::Result<libc::pid_t> {
        let mut s = self.lock();
        let pid = fork()?;
        s.watched.insert(pid, None);
        s.forks += 1;
        self.forked.notify_all();
        Ok(pid)
    }

    /// Waits for registered `pid` to end, until `deadline` if given; `None` on timeout. A
    /// returned status unregisters the pid.
    pub fn wait(&self, pid: libc::pid_t, deadline: Option<Instant>) -> Option<ExitStatus> {
        let mut s = self.lock();
        loop {
            match s.watched.get(&pid) {
                Some(Some(st)) => {
                    let st = *st;
                    s.watched.remove(&pid);
                    return Some(st);
                }
                Some(None) => {}
                None => return None,
            }
            s = match deadline {
                None => self.reaped.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.checked_duration_since(Instant::now())?;
                    self.reaped
                        .wait_timeout(s, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Signals `pid`'s process group (each exec leads its own), or `pid` alone if the group is
    /// gone, but only while `pid` has not been reaped, so a recycled pid is never hit.
    pub fn signal(&self, pid: libc::pid_t, signal: i32) -> io::Result<()> {
        let s = self.lock();
        if !matches!(s.watched.get(&pid), Some(None)) {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: kill(2) has no memory effects; the pid is a live child we registered.
        if unsafe { libc::kill(-pid, signal) } == 0 {
            return Ok(());
        }
        // SAFETY: as above.
        if unsafe { libc::kill(pid, signal) } == 0 {
            return Ok(());
        }
        Err(io::Error::last_os_error())
    }

    /// Kills the process group of every registered, still running child.
    pub fn kill_all(&self) {
        let pids: Vec<libc::pid_t> = self
            .lock()
            .watched
            .iter()
            .filter(|(_, st)| st.is_none())
            .map(|(pid, _)| *pid)
            .collect();
        for pid in pids {
            let _ = self.signal(pid, libc::SIGKILL);
        }
    }
}
