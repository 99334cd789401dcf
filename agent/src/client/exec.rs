//! Running processes: [`Client::exec`] returns once the process started (or could not), then
//! its output arrives chunk by chunk as the process writes it ([`Exec::next_output`]), stdin goes in
//! through an [`ExecStdin`] that any thread may own, and an [`ExecControl`] signals or resizes it.

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

/// Everything a finished process produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How it ended.
    pub status: ExitStatus,
    /// All of stdout.
    pub stdout: Vec<u8>,
    /// All of stderr.
    pub stderr: Vec<u8>,
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
    /// program, directory or user is wrong.
    pub fn exec(&self, spec: ExecSpec) -> Result<Exec, Error> {
        let wants_stdin = spec.stdin;
        let req = self.conn.start_request(Request::Exec(spec))?;
        Exec::started(req, wants_stdin, None)
    }

    /// Runs a process to the end with no stdin and collects its output.
    pub fn run(&self, mut spec: ExecSpec) -> Result<Output, Error> {
        spec.stdin = false;
        self.exec(spec)?.output()
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
        let pid = match req.recv(deadline)? {
            Inbound::Event(Event::Started { pid }) => pid,
            Inbound::Event(Event::Error(info)) => return Err(info.into()),
            other => return Err(unexpected("exec", &other)),
        };
        let stdin = wants_stdin.then(|| ExecStdin {
            sender: req.sender(),
            closed: false,
        });
        Ok(Exec {
            req,
            pid,
            stdin,
            exited: false,
        })
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

    /// Waits for the end and collects all output.
    pub fn output(self) -> Result<Output, Error> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = self.wait_with(
            |b| stdout.extend_from_slice(b),
            |b| stderr.extend_from_slice(b),
        )?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
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
