//! Running processes: [`Client::exec`] returns once the process started (or could not), then
//! its output arrives chunk by chunk as the process writes it ([`Exec::next_output`]), stdin goes in
//! through an [`ExecStdin`] that any thread may own, and an [`ExecControl`] signals or resizes it.
//!
//! The start is always awaited with a deadline. Output is awaited as long as the process runs,
//! unless the caller gives a deadline ([`Exec::next_output_until`], [`Exec::output_until`]), or the
//! spec has a timeout ([`Client::run`] then gives up [`REPORT_GRACE`] after it). Collected output
//! ([`Exec::output`]) keeps at most [`MAX_COLLECTED_STDOUT`] and [`MAX_COLLECTED_STDERR`] bytes; the
//! rest is read, counted in [`Output::stdout_dropped`] / [`Output::stderr_dropped`], and dropped.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::{Conn, Inbound, Req, ReqSender};
use super::{Client, Error, unexpected};
use crate::protocol::{Event, ExecSpec, ExitStatus, Request, Stream, TtySize};

/// One piece of what a running process produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutput {
    /// Bytes it wrote to stdout (or its terminal).
    Stdout(Vec<u8>),
    /// Bytes it wrote to stderr.
    Stderr(Vec<u8>),
    /// It ended; nothing follows.
    Exit(ExitStatus),
}

/// The most stdout bytes [`Exec::output`] keeps.
pub const MAX_COLLECTED_STDOUT: usize = 8 << 20;
/// The most stderr bytes [`Exec::output`] keeps.
pub const MAX_COLLECTED_STDERR: usize = 1 << 20;

/// How long past a process's own timeout the agent may take to report its end before the host
/// gives up on the agent.
pub const REPORT_GRACE: Duration = Duration::from_secs(10);

/// Everything a finished process produced (up to the collection caps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How it ended.
    pub status: ExitStatus,
    /// Its stdout, up to [`MAX_COLLECTED_STDOUT`] bytes.
    pub stdout: Vec<u8>,
    /// Its stderr, up to [`MAX_COLLECTED_STDERR`] bytes.
    pub stderr: Vec<u8>,
    /// Stdout bytes past the cap, read and dropped.
    pub stdout_dropped: u64,
    /// Stderr bytes past the cap, read and dropped.
    pub stderr_dropped: u64,
}

/// Appends `b` to `buf` up to `cap` bytes; counts the rest in `dropped`.
pub fn collect_capped(buf: &mut Vec<u8>, dropped: &mut u64, cap: usize, b: &[u8]) {
    let room = cap.saturating_sub(buf.len()).min(b.len());
    buf.extend_from_slice(&b[..room]);
    *dropped += (b.len() - room) as u64;
}

/// A running process.
pub struct Exec {
    req: Req,
    pid: u32,
    stdin: Option<ExecStdin>,
    exited: bool,
}

impl Client {
    /// Starts a process. Returns when it is running, or [`Error::CouldNotStart`] when the
    /// program, directory or user is wrong, or [`Error::Timeout`] when the agent did not say
    /// within the client's reply timeout.
    pub fn exec(&self, spec: ExecSpec) -> Result<Exec, Error> {
        self.exec_until(spec, Instant::now() + self.reply_timeout)
    }

    /// [`Client::exec`], giving up at `deadline` instead.
    pub fn exec_until(&self, spec: ExecSpec, deadline: Instant) -> Result<Exec, Error> {
        let wants_stdin = spec.stdin;
        let mut req = self.conn.start_request(Request::Exec(spec))?;
        match Exec::wait_started(&mut req, Some(deadline)) {
            Ok(pid) => Ok(Exec::new(req, pid, wants_stdin)),
            Err(e @ Error::Timeout(_)) => {
                req.abandon();
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Runs a process to the end with no stdin and collects its output (see [`Exec::output`]).
    /// With a `timeout_ms` in the spec, gives up on the agent [`REPORT_GRACE`] after it.
    pub fn run(&self, mut spec: ExecSpec) -> Result<Output, Error> {
        spec.stdin = false;
        let start = Instant::now();
        let limit = spec
            .timeout_ms
            .map(|ms| start + Duration::from_millis(ms) + REPORT_GRACE);
        let exec = self.exec_until(spec, limit.unwrap_or(start + self.reply_timeout))?;
        exec.collect(limit)
    }
}

impl Exec {
    /// Waits (until `deadline`, if given) for the agent to say whether exec request `req`
    /// started.
    pub(crate) fn started(
        mut req: Req,
        wants_stdin: bool,
        deadline: Option<Instant>,
    ) -> Result<Exec, Error> {
        let pid = Self::wait_started(&mut req, deadline)?;
        Ok(Self::new(req, pid, wants_stdin))
    }

    /// The pid the agent reports for exec request `req`.
    fn wait_started(req: &mut Req, deadline: Option<Instant>) -> Result<u32, Error> {
        match req.recv(deadline)? {
            Inbound::Event(Event::Started { pid }) => Ok(pid),
            Inbound::Event(Event::Error(info)) => Err(info.into()),
            other => Err(unexpected("exec", &other)),
        }
    }

    fn new(req: Req, pid: u32, wants_stdin: bool) -> Exec {
        let stdin = wants_stdin.then(|| ExecStdin {
            sender: req.sender(),
            closed: false,
        });
        Exec {
            req,
            pid,
            stdin,
            exited: false,
        }
    }

    /// The process's pid inside the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its stdin, once (only if the spec asked for stdin). Dropping it closes stdin.
    pub fn take_stdin(&mut self) -> Option<ExecStdin> {
        self.stdin.take()
    }

    /// A handle to signal, resize or cancel the process from any thread.
    pub fn control(&self) -> ExecControl {
        ExecControl {
            conn: self.req.conn().clone(),
            target: self.req.id,
        }
    }

    /// The next piece of output, or the exit; `Ok(None)` after the exit was returned.
    pub fn next_output(&mut self) -> Result<Option<ExecOutput>, Error> {
        self.next_before(None)
    }

    /// Like [`Exec::next_output`], but gives up with [`Error::Timeout`] at `deadline`.
    pub fn next_output_until(&mut self, deadline: Instant) -> Result<Option<ExecOutput>, Error> {
        self.next_before(Some(deadline))
    }

    fn next_before(&mut self, deadline: Option<Instant>) -> Result<Option<ExecOutput>, Error> {
        if self.exited {
            return Ok(None);
        }
        loop {
            let out = match self.req.recv(deadline)? {
                Inbound::Data(Stream::Stdout, bytes) => ExecOutput::Stdout(bytes),
                Inbound::Data(Stream::Stderr, bytes) => ExecOutput::Stderr(bytes),
                Inbound::Eof(_) => continue,
                Inbound::Event(Event::Exit { status }) => {
                    self.exited = true;
                    ExecOutput::Exit(status)
                }
                Inbound::Event(Event::Error(info)) => {
                    self.exited = true;
                    return Err(info.into());
                }
                other => return Err(unexpected("exec", &other)),
            };
            return Ok(Some(out));
        }
    }

    /// Stops this request: a plain exec's process group is killed; a `keep` process (or an
    /// attached one) runs on, its output kept for the next [`Client::attach`].
    pub fn detach(mut self) {
        self.req.abandon();
    }

    /// Streams output to the callbacks as it arrives and returns how the process ended.
    pub fn wait_with(
        mut self,
        mut on_stdout: impl FnMut(&[u8]),
        mut on_stderr: impl FnMut(&[u8]),
    ) -> Result<ExitStatus, Error> {
        loop {
            match self.next_output()? {
                Some(ExecOutput::Stdout(b)) => on_stdout(&b),
                Some(ExecOutput::Stderr(b)) => on_stderr(&b),
                Some(ExecOutput::Exit(status)) => return Ok(status),
                None => return Err(Error::Protocol("exec already ended".into())),
            }
        }
    }

    /// Waits for the end (as long as the process runs) and collects its output, up to
    /// [`MAX_COLLECTED_STDOUT`] and [`MAX_COLLECTED_STDERR`] bytes.
    pub fn output(self) -> Result<Output, Error> {
        self.collect(None)
    }

    /// [`Exec::output`], giving up at `deadline` with [`Error::Timeout`] (the process is
    /// cancelled then).
    pub fn output_until(self, deadline: Instant) -> Result<Output, Error> {
        self.collect(Some(deadline))
    }

    fn collect(mut self, deadline: Option<Instant>) -> Result<Output, Error> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let (mut stdout_dropped, mut stderr_dropped) = (0, 0);
        loop {
            let next = match self.next_before(deadline) {
                Err(e @ Error::Timeout(_)) => {
                    self.req.abandon();
                    return Err(e);
                }
                other => other?,
            };
            match next {
                Some(ExecOutput::Stdout(b)) => {
                    collect_capped(&mut stdout, &mut stdout_dropped, MAX_COLLECTED_STDOUT, &b)
                }
                Some(ExecOutput::Stderr(b)) => {
                    collect_capped(&mut stderr, &mut stderr_dropped, MAX_COLLECTED_STDERR, &b)
                }
                Some(ExecOutput::Exit(status)) => {
                    return Ok(Output {
                        status,
                        stdout,
                        stderr,
                        stdout_dropped,
                        stderr_dropped,
                    });
                }
                None => return Err(Error::Protocol("exec already ended".into())),
            }
        }
    }
}

/// A running process's stdin. Writes block while the agent has no room (the process is not
/// reading); they fail with `BrokenPipe` once the process has ended.
pub struct ExecStdin {
    sender: ReqSender,
    closed: bool,
}

impl ExecStdin {
    /// Closes stdin: the process reads end of file (on a tty: a ^D).
    pub fn close(mut self) {
        self.close_now();
    }

    fn close_now(&mut self) {
        if !self.closed {
            self.closed = true;
            self.sender.eof(Stream::Stdin);
        }
    }
}

impl Write for ExecStdin {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stdin was closed",
            ));
        }
        self.sender
            .send(Stream::Stdin, buf)
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "the process has ended"))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ExecStdin {
    fn drop(&mut self) {
        self.close_now();
    }
}

/// Signals, resizes or cancels a running process.
#[derive(Clone)]
pub struct ExecControl {
    conn: Arc<Conn>,
    target: u64,
}

impl ExecControl {
    fn client(&self) -> Client {
        Client::new(self.conn.clone()).with_reply_timeout(Duration::from_secs(10))
    }

    /// Sends `signal` to the process's group.
    pub fn signal(&self, signal: i32) -> Result<(), Error> {
        self.client()
            .call(Request::Signal {
                target: self.target,
                signal,
            })
            .map(drop)
    }

    /// Resizes its terminal (tty execs only).
    pub fn resize(&self, size: TtySize) -> Result<(), Error> {
        self.client()
            .call(Request::Resize {
                target: self.target,
                size,
            })
            .map(drop)
    }

    /// Kills its process group and drops its remaining output.
    pub fn cancel(&self) -> Result<(), Error> {
        self.client()
            .call(Request::Cancel {
                target: self.target,
            })
            .map(drop)
    }
}
