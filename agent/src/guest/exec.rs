//! Serving exec and attach requests: spawn the process into the agent's table ([`procs`]), stream
//! its stdout/stderr as they come (only as fast as the host returns credit, so a slow host blocks
//! the child's writes instead of growing our memory), feed stdin, enforce the timeout on the whole
//! process group, report how it ended. An `attach` follows a process another request started.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::procs::{Follower, Next, Proc, Spawned, Started, procs};
use super::reaper::reaper;
use super::session::{Ctx, ExecHandle, Input, InputMsg};
use super::spawn::{ChildStdio, Plan, spawn};
use super::sys;
use crate::protocol::{ErrorInfo, ErrorKind, Event, ExecSpec, ExitStatus, MAX_CHUNK, Selector};

/// After the process exits, how long its output pipes may stay open with nothing to read before
/// the agent stops waiting: a background process that kept them open does not hold the result.
pub const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// [`OUTPUT_GRACE`], or `$KILN_OUTPUT_GRACE_MS` when set to a number (tests make it long, so
/// that an exec that waited it out cannot be mistaken for a slow one).
pub fn output_grace() -> Duration {
    static GRACE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *GRACE.get_or_init(|| {
        std::env::var("KILN_OUTPUT_GRACE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(OUTPUT_GRACE, Duration::from_millis)
    })
}

/// How often a follower with nothing to send checks whether the host stopped following.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

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
    if let Some(tag) = &spec.tag
        && procs().tag_in_use(tag)
    {
        return Err(ErrorInfo::new(
            ErrorKind::AlreadyExists,
            format!("a running process is already tagged {tag:?}"),
        ));
    }
    let plan = Plan::new(spec, &ctx.agent().default_env())?;
    let ends = stdio(spec).map_err(io_error("setting up the process's stdio"))?;
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
    let (proc, follower) = procs()
        .add(Spawned {
            pid,
            started: Started {
                tag: spec.tag.clone(),
                argv: spec.argv.clone(),
                env: spec.env.clone(),
                cwd: spec.cwd.clone(),
                tty: spec.tty.is_some(),
                keep: spec.keep,
            },
            stdin,
            stdout,
            stderr,
            pty: pty.clone(),
            deadline: spec.timeout_ms.map(|ms| start + Duration::from_millis(ms)),
        })
        .map_err(|e| {
            // Without its pumps and waiter nobody would collect it.
            let _ = reaper().signal(pid, libc::SIGKILL);
            io_error("starting the process's threads")(e)
        })?;
    ctx.set_exec(Some(ExecHandle {
        pid,
        pty,
        kill_on_cancel: !spec.keep,
    }));
    ctx.event(Event::Started { pid: pid as u32 });
    // The feeder is not joined: it ends when the request's input ends, which is when the request
    // is finished (after this function) or cancelled. Neither closes the process's stdin: only
    // the host's eof does, so a `keep` process keeps its stdin for later `write_stdin`s.
    let feeder = proc.clone();
    let _ = thread::Builder::new()
        .name("exec-stdin".into())
        .spawn(move || feed(input, &feeder));
    let result = follow(ctx, &follower, !spec.keep);
    if !spec.keep || result.is_ok() {
        procs().remove(pid);
    }
    result
}

/// Serves an `attach` request: follows the process `sel` names until it ends (or the host stops
/// following).
pub fn attach(ctx: Ctx, sel: &Selector) {
    let event = match procs().find(sel) {
        None => Event::Error(ErrorInfo::new(
            ErrorKind::NotFound,
            format!("no {sel} is running"),
        )),
        Some(proc) => {
            let follower = proc.attach();
            ctx.set_exec(Some(ExecHandle {
                pid: proc.pid,
                pty: proc.pty.clone(),
                kill_on_cancel: false,
            }));
            ctx.event(Event::Started {
                pid: proc.pid as u32,
            });
            match follow(&ctx, &follower, false) {
                Ok(status) => {
                    procs().remove(proc.pid);
                    Event::Exit { status }
                }
                Err(info) => Event::Error(info),
            }
        }
    };
    ctx.set_exec(None);
    ctx.finish(event);
}

/// Sends a process's output to the host, only as fast as the host credits it, then its exit.
/// Once the request is cancelled a process that dies with it (`killed`) is still waited for, its
/// output dropped, so its exit is reported; any other just stops being followed.
fn follow(ctx: &Ctx, follower: &Follower, killed: bool) -> Result<ExitStatus, ErrorInfo> {
    let pid = follower.proc().pid;
    let stopped = || {
        ErrorInfo::new(
            ErrorKind::Cancelled,
            format!("stopped following process {pid}"),
        )
    };
    loop {
        if ctx.cancelled() {
            if !killed {
                return Err(stopped());
            }
            match follower.next(MAX_CHUNK, FOLLOW_POLL) {
                Next::Data(_, data) => follower.advance(data.len()),
                Next::Exit(status) => return Ok(status),
                Next::Nothing => {}
            }
            continue;
        }
        match follower.next(MAX_CHUNK, FOLLOW_POLL) {
            Next::Data(stream, data) => {
                let window = ctx.window(stream);
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let Some(n) = window.wait(rest.len()) else {
                        // Closed: the request was cancelled; the loop's top decides.
                        break;
                    };
                    window.consume(n);
                    follower.advance(n);
                    ctx.data(stream, &rest[..n]);
                    rest = &rest[n..];
                }
            }
            Next::Exit(status) => return Ok(status),
            Next::Nothing => {}
        }
    }
}

/// Writes the host's stdin data to the process. Data is consumed even when the process has no
/// stdin (not requested, or it stopped reading), so the host is never left waiting for credit.
fn feed(input: Input, proc: &Proc) {
    while let Some(msg) = input.recv() {
        match msg {
            InputMsg::Data(bytes) => {
                let _ = proc.write_stdin(&bytes);
                input.consumed(bytes.len());
            }
            InputMsg::Eof => {
                let _ = proc.close_stdin();
            }
        }
    }
}
