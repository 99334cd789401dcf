//! The agent's process table: every process an exec request started, whatever connection it came
//! on, so it can be listed, signalled, written to and followed again by pid or tag. A process's
//! output goes through a bounded buffer: its pumps read the pipes into it and each follower
//! ("attacher") takes from it at its own pace.
//!
//! The buffer's rules keep memory bounded whatever the process does:
//! - while someone follows the process, nothing is lost: a full buffer stops the pumps, so the
//!   process blocks in `write` until the slowest follower catches up (flow control end to end);
//! - while nobody follows it (a `keep` process whose request went away), the pumps keep reading
//!   and only the newest [`KEPT_OUTPUT`] bytes are kept, so a chatty background server never
//!   blocks; the next follower gets what was kept.
//!
//! A new follower starts at the first byte no follower has been given yet. Output that every
//! current follower has taken is dropped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use super::exec::output_grace;
use super::reaper::reaper;
use super::sys::{self, Flag};
use crate::protocol::{ExitStatus, MAX_CHUNK, ProcessInfo, Selector, Stream};

/// Output kept for a process nobody follows; also the most a follower may lag behind.
pub const KEPT_OUTPUT: usize = 1 << 20;

/// Exited `keep` processes whose status nobody collected yet, kept for a later `attach`.
const KEPT_EXITED: usize = 64;

struct Chunk {
    start: u64,
    stream: Stream,
    data: Vec<u8>,
}

impl Chunk {
    fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }
}

#[derive(Default)]
struct Output {
    chunks: VecDeque<Chunk>,
    /// Offset of the first byte still kept.
    base: u64,
    /// Offset after the last byte read from the process.
    end: u64,
    /// Bytes held in `chunks`.
    held: usize,
    /// The furthest offset any follower was given.
    delivered: u64,
    /// Each follower's offset.
    cursors: HashMap<u64, u64>,
    next_follower: u64,
    /// Pumps still reading.
    pumps: u8,
    /// How it ended, once it did.
    status: Option<ExitStatus>,
    /// A follower was given the exit.
    reported: bool,
}

impl Output {
    /// Drops what every follower (or, with none, some earlier follower) has taken.
    fn trim(&mut self) {
        let upto = self
            .cursors
            .values()
            .copied()
            .min()
            .unwrap_or(self.delivered);
        while let Some(front) = self.chunks.front() {
            if front.end() > upto {
                break;
            }
            self.held -= front.data.len();
            self.base = front.end();
            self.chunks.pop_front();
        }
    }

    fn done(&self) -> bool {
        self.status.is_some() && self.pumps == 0
    }
}

/// What a process was started with, for listing.
pub struct Started {
    /// Its tag.
    pub tag: Option<String>,
    /// Its argv.
    pub argv: Vec<String>,
    /// The environment its request added.
    pub env: BTreeMap<String, String>,
    /// Its request's working directory.
    pub cwd: Option<String>,
    /// It runs on a terminal.
    pub tty: bool,
    /// It outlives its request.
    pub keep: bool,
}

/// One process in the table.
pub struct Proc {
    /// Its pid (and process group).
    pub pid: libc::pid_t,
    /// How it was started.
    pub started: Started,
    /// Its terminal's master, for a tty process.
    pub pty: Option<Arc<OwnedFd>>,
    stdin: Mutex<Option<OwnedFd>>,
    out: Mutex<Output>,
    changed: Condvar,
    exited: Flag,
}

/// What a follower gets next.
pub enum Next {
    /// Output, from the follower's offset.
    Data(Stream, Vec<u8>),
    /// The process ended and all its output was given.
    Exit(ExitStatus),
    /// Nothing yet.
    Nothing,
}

/// Why stdin could not be written.
#[derive(Debug, thiserror::Error)]
pub enum StdinError {
    /// The process was started without stdin, or its stdin was closed.
    #[error("process {0} has no open stdin (start it with stdin, and do not close it)")]
    NotOpen(libc::pid_t),
    /// The process stopped reading (it exited, or closed its stdin).
    #[error("process {0} stopped reading its stdin")]
    Gone(libc::pid_t),
}

impl Proc {
    fn out(&self) -> MutexGuard<'_, Output> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether it still runs.
    pub fn running(&self) -> bool {
        self.out().status.is_none()
    }

    /// Starts following its output.
    pub fn attach(self: &Arc<Self>) -> Follower {
        let mut out = self.out();
        let id = out.next_follower;
        out.next_follower += 1;
        let at = out.delivered.max(out.base);
        out.cursors.insert(id, at);
        Follower {
            proc: self.clone(),
            id,
        }
    }

    /// Writes `bytes` to its stdin, waiting while the pipe is full.
    pub fn write_stdin(&self, bytes: &[u8]) -> Result<(), StdinError> {
        let mut stdin = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
        let Some(fd) = stdin.as_ref() else {
            return Err(StdinError::NotOpen(self.pid));
        };
        if write_all(fd, bytes, &self.exited) {
            return Ok(());
        }
        *stdin = None;
        Err(StdinError::Gone(self.pid))
    }

    /// Closes its stdin: end of file, or ^D on a terminal (closing a terminal's master would
    /// hang it up).
    pub fn close_stdin(&self) -> Result<(), StdinError> {
        let mut stdin = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
        let Some(fd) = stdin.take() else {
            return Err(StdinError::NotOpen(self.pid));
        };
        if self.started.tty {
            write_all(&fd, b"\x04", &self.exited);
        }
        Ok(())
    }

    /// As the `processes` request lists it.
    pub fn info(&self) -> ProcessInfo {
        let s = &self.started;
        ProcessInfo {
            pid: self.pid as u32,
            tag: s.tag.clone(),
            argv: s.argv.clone(),
            env: s.env.clone(),
            cwd: s.cwd.clone(),
            tty: s.tty,
            keep: s.keep,
        }
    }

    /// Adds output read from the process: waits while the buffer is full and someone follows,
    /// drops the oldest while nobody does.
    fn push(&self, stream: Stream, data: Vec<u8>) {
        let mut out = self.out();
        while out.held >= KEPT_OUTPUT && !out.cursors.is_empty() {
            out = self.changed.wait(out).unwrap_or_else(|p| p.into_inner());
        }
        let start = out.end;
        out.end += data.len() as u64;
        out.held += data.len();
        out.chunks.push_back(Chunk {
            start,
            stream,
            data,
        });
        while out.held > KEPT_OUTPUT && out.cursors.is_empty() {
            let Some(old) = out.chunks.pop_front() else {
                break;
            };
            out.held -= old.data.len();
            out.base = old.end();
            out.delivered = out.delivered.max(out.base);
        }
        self.changed.notify_all();
    }

    fn pump_done(&self) {
        self.out().pumps -= 1;
        self.changed.notify_all();
    }

    fn exit(&self, status: ExitStatus) {
        self.out().status = Some(status);
        self.exited.raise();
        self.changed.notify_all();
    }
}

/// One follower of a process's output. Dropping it stops following.
pub struct Follower {
    proc: Arc<Proc>,
    id: u64,
}

impl Follower {
    /// The process followed.
    pub fn proc(&self) -> &Arc<Proc> {
        &self.proc
    }

    /// Up to `max` bytes of the next output (not yet taken: see [`Follower::advance`]), the exit
    /// once everything was given, or [`Next::Nothing`] after waiting `wait` for either.
    pub fn next(&self, max: usize, wait: Duration) -> Next {
        let deadline = Instant::now() + wait;
        let mut out = self.proc.out();
        loop {
            let at = out.cursors.get(&self.id).copied().unwrap_or(out.end);
            let at = at.max(out.base);
            if let Some(chunk) = out.chunks.iter().find(|c| c.end() > at) {
                let from = (at - chunk.start) as usize;
                let n = (chunk.data.len() - from).min(max);
                return Next::Data(chunk.stream, chunk.data[from..from + n].to_vec());
            }
            if out.done() {
                out.reported = true;
                // Every byte was given: the exit follows them.
                return Next::Exit(out.status.unwrap_or(ExitStatus::TimedOut));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Nothing;
            }
            out = self
                .proc
                .changed
                .wait_timeout(out, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Takes `n` bytes of what [`Follower::next`] returned: they were sent. Taking only after
    /// sending means a follower that stops mid-way (its host went away) loses nothing for the
    /// next one.
    pub fn advance(&self, n: usize) {
        let mut out = self.proc.out();
        let at = out.cursors.get(&self.id).copied().unwrap_or(out.end);
        let to = at.max(out.base) + n as u64;
        out.cursors.insert(self.id, to);
        out.delivered = out.delivered.max(to);
        out.trim();
        self.proc.changed.notify_all();
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let mut out = self.proc.out();
        out.cursors.remove(&self.id);
        out.trim();
        self.proc.changed.notify_all();
    }
}

/// Every process the agent started.
#[derive(Default)]
pub struct Procs {
    table: Mutex<HashMap<libc::pid_t, Arc<Proc>>>,
    /// Exited `keep` processes not yet reported, oldest first.
    exited: Mutex<VecDeque<libc::pid_t>>,
}

/// The agent-wide table.
pub fn procs() -> &'static Procs {
    static PROCS: OnceLock<Procs> = OnceLock::new();
    PROCS.get_or_init(Procs::default)
}

/// The ends of a freshly spawned process that the table takes over.
pub struct Spawned {
    /// Its pid.
    pub pid: libc::pid_t,
    /// How it was started.
    pub started: Started,
    /// Our end of its stdin, if it reads one.
    pub stdin: Option<OwnedFd>,
    /// Our end of its stdout (its terminal, for a tty).
    pub stdout: OwnedFd,
    /// Our end of its stderr (none for a tty).
    pub stderr: Option<OwnedFd>,
    /// Its terminal's master.
    pub pty: Option<Arc<OwnedFd>>,
    /// When it is killed.
    pub deadline: Option<Instant>,
}

impl Procs {
    fn table(&self) -> MutexGuard<'_, HashMap<libc::pid_t, Arc<Proc>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A running process whose tag is `tag`.
    pub fn tag_in_use(&self, tag: &str) -> bool {
        self.table()
            .values()
            .any(|p| p.running() && p.started.tag.as_deref() == Some(tag))
    }

    /// Takes over a spawned process: its pumps and its waiter start now, and `follow` is
    /// attached before the first byte is read, so it misses nothing.
    pub fn add(&self, s: Spawned) -> std::io::Result<(Arc<Proc>, Follower)> {
        let pumps = 1 + u8::from(s.stderr.is_some());
        let proc = Arc::new(Proc {
            pid: s.pid,
            started: s.started,
            pty: s.pty,
            stdin: Mutex::new(s.stdin),
            out: Mutex::new(Output {
                pumps,
                ..Output::default()
            }),
            changed: Condvar::new(),
            exited: Flag::new()?,
        });
        let follower = proc.attach();
        self.table().insert(s.pid, proc.clone());
        for (fd, stream) in [(Some(s.stdout), Stream::Stdout), (s.stderr, Stream::Stderr)] {
            let Some(fd) = fd else { continue };
            let p = proc.clone();
            thread::Builder::new()
                .name(format!("pump-{}", s.pid))
                .spawn(move || {
                    pump(&p, &fd, stream);
                    p.pump_done();
                })?;
        }
        let p = proc.clone();
        let deadline = s.deadline;
        thread::Builder::new()
            .name(format!("wait-{}", s.pid))
            .spawn(move || {
                let status = match reaper().wait(p.pid, deadline) {
                    Some(status) => status,
                    None => {
                        let _ = reaper().signal(p.pid, libc::SIGKILL);
                        reaper().wait(p.pid, None);
                        ExitStatus::TimedOut
                    }
                };
                p.exit(status);
                procs().exited(&p);
            })?;
        Ok((proc, follower))
    }

    /// Forgets process `pid` (its request reported the exit, or it was not a `keep` one).
    pub fn remove(&self, pid: libc::pid_t) {
        self.table().remove(&pid);
    }

    /// Called once a process ended: a `keep` one nobody has told about stays findable, within
    /// [`KEPT_EXITED`].
    fn exited(&self, proc: &Proc) {
        if !proc.started.keep {
            return;
        }
        let mut exited = self.exited.lock().unwrap_or_else(|p| p.into_inner());
        exited.push_back(proc.pid);
        while exited.len() > KEPT_EXITED {
            if let Some(old) = exited.pop_front() {
                let mut table = self.table();
                if table.get(&old).is_some_and(|p| !p.running()) {
                    table.remove(&old);
                }
            }
        }
    }

    /// The process `sel` names: running, or ended with its exit not yet reported.
    pub fn find(&self, sel: &Selector) -> Option<Arc<Proc>> {
        let table = self.table();
        match sel {
            Selector::Pid(pid) => table.get(&(*pid as libc::pid_t)).cloned(),
            Selector::Tag(tag) => table
                .values()
                .filter(|p| p.started.tag.as_deref() == Some(tag.as_str()))
                .max_by_key(|p| p.running())
                .cloned(),
        }
        .filter(|p| p.running() || !p.out().reported)
    }

    /// The running processes, by pid.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let mut all: Vec<ProcessInfo> = self
            .table()
            .values()
            .filter(|p| p.running())
            .map(|p| p.info())
            .collect();
        all.sort_by_key(|p| p.pid);
        all
    }
}

/// Reads one of the process's outputs into its buffer until end of file, or until the pipe stays
/// quiet for [`output_grace`] after the process exited (a background child holding it open does
/// not hold the result).
fn pump(proc: &Proc, fd: &OwnedFd, stream: Stream) {
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut after_exit = false;
    loop {
        let ready = if after_exit {
            sys::poll(&[(fd.as_raw_fd(), libc::POLLIN)], Some(output_grace()))
        } else {
            sys::poll(
                &[
                    (fd.as_raw_fd(), libc::POLLIN),
                    (proc.exited.fd(), libc::POLLIN),
                ],
                None,
            )
        };
        match ready {
            Err(_) => return,
            Ok(r) if r[0] != 0 => {}
            Ok(_) if after_exit => return,
            Ok(_) => {
                after_exit = true;
                continue;
            }
        }
        match sys::read(fd, &mut buf) {
            Ok(0) => return,
            Ok(n) => proc.push(stream, buf[..n].to_vec()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            // EIO is how a terminal master says the last slave closed.
            Err(_) => return,
        }
    }
}

/// Writes all of `bytes` to non-blocking `fd`; false if the reader went away or the process
/// exited while the pipe was full.
fn write_all(fd: &OwnedFd, mut bytes: &[u8], exited: &Flag) -> bool {
    while !bytes.is_empty() {
        match sys::write(fd, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let ready = sys::poll(
                    &[(fd.as_raw_fd(), libc::POLLOUT), (exited.fd(), libc::POLLIN)],
                    None,
                );
                match ready {
                    Ok(r) if r[0] != 0 => {}
                    _ => return false,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}
