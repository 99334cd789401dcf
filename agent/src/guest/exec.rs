//! Serving an exec request: spawn, stream stdout/stderr as they come (only as fast as the host
//! returns credit, so a slow host blocks the child's writes instead of growing our memory), feed
//! stdin, enforce the timeout on the whole process group, report how it ended.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::reaper::reaper;
use super::session::{Ctx, ExecHandle, Input, InputMsg};
use super::spawn::{ChildStdio, Plan, spawn};
use super::sys::{self, Flag};
use crate::protocol::{ErrorInfo, ErrorKind, Event, ExecSpec, ExitStatus, MAX_CHUNK, Stream};

/// After the process exits, how long its output pipes may stay open with nothing to read before
/// the agent stops waiting: a background process that kept them open does not hold the result.
pub const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// Runs one exec request to its final event.
pub fn run(ctx: Ctx, input: Input, spec: ExecSpec) {
    let event = match execute(&ctx, input, &spec) {
        Ok(status) => Event::Exit { status },
        Err(info) => Event::Error(info),
    };
    ctx.set_exec(None);
    ctx.finish(event);
}

fn io_error(what: &'static str) -> impl Fn(io::Error) -> ErrorInfo {
    move |e| ErrorInfo {
        kind: ErrorKind::Io,
        message: format!("{what}: {e}"),
        errno: e.raw_os_error(),
    }
}

/// The parent's ends of the child's stdio.
struct Ends {
    child: ChildStdio,
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: Option<OwnedFd>,
    pty: Option<Arc<OwnedFd>>,
}

fn stdio(spec: &ExecSpec) -> io::Result<Ends> {
    if let Some(size) = spec.tty {
        let (master, slave) = sys::openpty(size)?;
        sys::set_nonblocking(&master)?;
        return Ok(Ends {
            child: ChildStdio {
                stdout: slave.try_clone()?,
                stderr: slave.try_clone()?,
                stdin: slave,
                tty: true,
            },
            stdin: Some(master.try_clone()?),
            pty: Some(Arc::new(master.try_clone()?)),
            stdout: master,
            stderr: None,
        });
    }
    let (out_r, out_w) = sys::pipe()?;
    let (err_r, err_w) = sys::pipe()?;
    let (child_in, stdin) = if spec.stdin {
        let (r, w) = sys::pipe()?;
        sys::set_nonblocking(&w)?;
        (r, Some(w))
    } else {
        (sys::dev_null()?, None)
    };
    sys::set_nonblocking(&out_r)?;
    sys::set_nonblocking(&err_r)?;
    Ok(Ends {
        child: ChildStdio {
            stdin: child_in,
            stdout: out_w,
            stderr: err_w,
            tty: false,
        },
        stdin,
        stdout: out_r,
        stderr: Some(err_r),
        pty: None,
    })
}

fn execute(ctx: &Ctx, input: Input, spec: &ExecSpec) -> Result<ExitStatus, ErrorInfo> {
    let plan = Plan::new(spec, &ctx.agent().default_env())?;
    let ends = stdio(spec).map_err(io_error("setting up the process's stdio"))?;
    let exited = Arc::new(Flag::new().map_err(io_error("creating an eventfd"))?);
    let start = Instant::now();
    let pid = spawn(&plan, &ends.child)?;
    let Ends {
        child,
        stdin,
        stdout,
        stderr,
        pty,
    } = ends;
    // Our copies of the child's ends must go, or the pipes never reach end of file.
    drop(child);
    ctx.set_exec(Some(ExecHandle { pid, pty }));
    ctx.event(Event::Started { pid: pid as u32 });

    let tty = spec.tty.is_some();
    let feeder_flag = exited.clone();
    // The feeder is not joined: it ends when the request's input ends, which is when the request
    // is finished (after this function) or cancelled.
    let _ = thread::Builder::new()
        .name("exec-stdin".into())
        .spawn(move || feed(input, stdin, tty, &feeder_flag));

    let deadline = spec.timeout_ms.map(|ms| start + Duration::from_millis(ms));
    thread::scope(|s| {
        s.spawn(|| pump(ctx, &stdout, Stream::Stdout, &exited));
        if let Some(err) = &stderr {
            s.spawn(|| pump(ctx, err, Stream::Stderr, &exited));
        }
        let status = match reaper().wait(pid, deadline) {
            Some(status) => Ok(status),
            None => {
                let _ = reaper().signal(pid, libc::SIGKILL);
                reaper()
                    .wait(pid, None)
                    .map(|_| ExitStatus::TimedOut)
                    .ok_or(())
            }
        };
        exited.raise();
        status
    })
    .map_err(|()| ErrorInfo::new(ErrorKind::Io, format!("lost track of process {pid}")))
}

/// Copies one output stream to the host, reading only as much as the host has credited.
fn pump(ctx: &Ctx, fd: &OwnedFd, stream: Stream, exited: &Flag) {
    let window = ctx.window(stream);
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut after_exit = false;
    while let Some(credit) = window.wait(MAX_CHUNK) {
        loop {
            let ready = if after_exit {
                sys::poll(&[(fd.as_raw_fd(), libc::POLLIN)], Some(OUTPUT_GRACE))
            } else {
                sys::poll(
                    &[(fd.as_raw_fd(), libc::POLLIN), (exited.fd(), libc::POLLIN)],
                    None,
                )
            };
            match ready {
                Err(_) => return,
                Ok(r) if r[0] != 0 => break,
                // The process is gone and the pipe stayed quiet: someone else holds it open.
                Ok(_) if after_exit => return,
                Ok(_) => after_exit = true,
            }
        }
        match sys::read(fd, &mut buf[..credit]) {
            Ok(0) => return,
            Ok(n) => {
                window.consume(n);
                ctx.data(stream, &buf[..n]);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            // EIO is how a terminal master says the last slave closed.
            Err(_) => return,
        }
    }
}

/// Writes the host's stdin data to the process. Without a stdin pipe (stdin not requested, or the
/// process stopped reading) data is still consumed, so the host is never left waiting for credit.
fn feed(input: Input, stdin: Option<OwnedFd>, tty: bool, exited: &Flag) {
    let mut stdin = stdin;
    while let Some(msg) = input.recv() {
        match msg {
            InputMsg::Data(bytes) => {
                if let Some(fd) = &stdin
                    && !write_all(fd, &bytes, exited)
                {
                    stdin = None;
                }
                input.consumed(bytes.len());
            }
            InputMsg::Eof => {
                // Closing a terminal's master would hang it up; end of input there is ^D.
                if let (true, Some(fd)) = (tty, &stdin) {
                    write_all(fd, b"\x04", exited);
                }
                stdin = None;
            }
        }
    }
}

/// Writes all of `bytes` to non-blocking `fd`; false if the reader went away or the process
/// exited while the pipe was full.
fn write_all(fd: &OwnedFd, mut bytes: &[u8], exited: &Flag) -> bool {
    while !bytes.is_empty() {
        match sys::write(fd, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let ready = sys::poll(
                    &[(fd.as_raw_fd(), libc::POLLOUT), (exited.fd(), libc::POLLIN)],
                    None,
                );
                match ready {
                    Ok(r) if r[0] != 0 => {}
                    _ => return false,
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}
