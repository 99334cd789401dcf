//! One host connection: the handshake, then a reader loop that turns frames into request threads
//! and routes stdin/file data, credits and cancellations to them. Host mistakes that make the
//! stream untrustworthy (bad framing, request id 0 or reused, data beyond its credit) close the
//! connection; a request that is merely unknown or malformed gets an error reply.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use super::procs::procs;
use super::reaper::reaper;
use super::{Agent, exec, files, log, restore, sys, user};
use crate::link::{Budget, Outbox, Socket, Window};
use crate::protocol::{
    ErrorInfo, ErrorKind, Event, FrameError, Hello, INITIAL_WINDOW, Message, PROTOCOL_REVISION,
    PROTOCOL_VERSION, RawFrame, Request, Selector, Stream, read_frame,
};

/// Requests one connection may have running at once.
pub const MAX_REQUESTS: usize = 256;

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// What arrives for a request's input stream.
pub enum InputMsg {
    /// Bytes.
    Data(Vec<u8>),
    /// The host closed the stream.
    Eof,
}

/// The receiving end of a request's input stream (stdin or file data).
pub struct Input {
    rx: Receiver<InputMsg>,
    budget: Arc<Budget>,
    stream: Stream,
    id: u64,
    outbox: Outbox,
}

impl Input {
    /// The next message; `None` once the request is cancelled or the connection is gone.
    pub fn recv(&self) -> Option<InputMsg> {
        self.rx.recv().ok()
    }

    /// Returns `n` consumed bytes to the host as credit.
    pub fn consumed(&self, n: usize) {
        self.budget.release(n);
        self.outbox.credit(self.id, self.stream, n);
    }
}

/// A running exec, for signal, resize and cancel requests.
pub struct ExecHandle {
    /// Its pid (and process group).
    pub pid: libc::pid_t,
    /// Its terminal's master, for a tty exec.
    pub pty: Option<Arc<OwnedFd>>,
    /// Cancelling the request (or losing its connection) kills the process group; false for
    /// `keep` processes and attaches, which only stop following.
    pub kill_on_cancel: bool,
}

/// What the session and a request's thread share.
pub struct Control {
    windows: [Window; 4],
    cancelled: AtomicBool,
    exec: Mutex<Option<ExecHandle>>,
}

impl Control {
    fn exec(&self) -> MutexGuard<'_, Option<ExecHandle>> {
        self.exec.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the request: kills its process group, wakes its senders.
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        if let Some(h) = self.exec().as_ref()
            && h.kill_on_cancel
        {
            let _ = reaper().signal(h.pid, libc::SIGKILL);
        }
        for w in &self.windows {
            w.close();
        }
    }
}

struct Entry {
    input: Option<(Sender<InputMsg>, Arc<Budget>, Stream)>,
    control: Arc<Control>,
}

/// A request's handle on its connection, owned by the thread serving it.
pub struct Ctx {
    id: u64,
    session: Arc<Session>,
    control: Arc<Control>,
}

impl Ctx {
    /// Sends a non-final event.
    pub fn event(&self, event: Event) {
        self.session.outbox.send(&Message::Event(self.id, event));
    }

    /// The send credit of one of this request's outgoing streams.
    pub fn window(&self, stream: Stream) -> &Window {
        &self.control.windows[stream as usize]
    }

    /// Queues data the caller already took credit for.
    pub fn data(&self, stream: Stream, bytes: &[u8]) {
        self.session
            .outbox
            .send_bytes(crate::protocol::message::encode_data(
                self.id, stream, bytes,
            ));
    }

    /// The agent-wide state.
    pub fn agent(&self) -> &Agent {
        &self.session.agent
    }

    /// Whether the host cancelled this request (or went away).
    pub fn cancelled(&self) -> bool {
        self.control.cancelled.load(Ordering::Acquire)
    }

    /// Records the running exec (or clears it with `None`).
    pub fn set_exec(&self, handle: Option<ExecHandle>) {
        *self.control.exec() = handle;
    }

    /// Ends the request with its final event.
    pub fn finish(self, event: Event) {
        // Forget the id first, so the host may reuse it as soon as it sees the event.
        self.session.entries().remove(&self.id);
        self.session.outbox.send(&Message::Event(self.id, event));
    }
}

/// One connection's state.
pub struct Session {
    outbox: Outbox,
    agent: Arc<Agent>,
    requests: Mutex<HashMap<u64, Entry>>,
}

/// Why the reader loop stopped.
enum Stop {
    /// The host closed the connection or the transport failed.
    Closed,
    /// The host broke the protocol; tell it why before closing.
    Violation(ErrorInfo),
}

impl Session {
    fn entries(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reply(&self, id: u64, event: Event) {
        self.outbox.send(&Message::Event(id, event));
    }

    fn error(&self, id: u64, kind: ErrorKind, message: impl Into<String>) {
        self.reply(id, Event::Error(ErrorInfo::new(kind, message)));
    }
}

/// Serves one connection until the host closes it or breaks the protocol. Running execs of the
/// connection are killed when it ends.
pub fn serve(agent: Arc<Agent>, socket: Socket) -> io::Result<()> {
    let outbox = Outbox::start(socket.try_clone()?, "agent-conn")?;
    let session = Arc::new(Session {
        outbox,
        agent,
        requests: Mutex::new(HashMap::new()),
    });
    let stop = match handshake(&session, &socket) {
        Ok(()) => read_loop(&session, &socket),
        Err(stop) => stop,
    };
    if let Stop::Violation(info) = stop {
        log(format_args!("closing a connection: {}", info.message));
        session.reply(0, Event::Error(info));
    }
    let entries: Vec<Entry> = session.entries().drain().map(|(_, e)| e).collect();
    for e in entries {
        e.control.cancel();
    }
    session.outbox.flush(Duration::from_secs(1));
    socket.shutdown();
    Ok(())
}

fn violation(message: impl Into<String>) -> Stop {
    Stop::Violation(ErrorInfo::new(ErrorKind::Protocol, message))
}

fn read_raw(socket: &Socket) -> Result<RawFrame, Stop> {
    match read_frame(&mut &*socket) {
        Ok(Some(raw)) => Ok(raw),
        Ok(None) | Err(FrameError::Io(_)) | Err(FrameError::Truncated { .. }) => Err(Stop::Closed),
        Err(e @ FrameError::BadLength { .. }) => Err(violation(e.to_string())),
    }
}

fn handshake(session: &Session, socket: &Socket) -> Result<(), Stop> {
    let _ = socket.set_read_timeout(Some(HELLO_TIMEOUT));
    let first = read_raw(socket)?;
    let _ = socket.set_read_timeout(None);
    let Ok(Message::Hello(hello)) = Message::decode(first) else {
        return Err(violation("the first frame must be a hello"));
    };
    session.outbox.send(&Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        software: format!("kiln-agent {}", env!("CARGO_PKG_VERSION")),
        revision: PROTOCOL_REVISION,
    }));
    if hello.version != PROTOCOL_VERSION {
        return Err(Stop::Violation(ErrorInfo::new(
            ErrorKind::VersionMismatch,
            format!(
                "the host speaks protocol version {}, this agent speaks {PROTOCOL_VERSION}",
                hello.version
            ),
        )));
    }
    Ok(())
}

fn read_loop(session: &Arc<Session>, socket: &Socket) -> Stop {
    loop {
        let raw = match read_raw(socket) {
            Ok(raw) => raw,
            Err(stop) => return stop,
        };
        let message = match Message::decode(raw) {
            Ok(m) => m,
            Err(e) => {
                session.error(e.id(), e.kind(), e.to_string());
                continue;
            }
        };
        let result = match message {
            Message::Request(id, request) => start(session, id, request),
            Message::Data(id, stream, bytes) => route(session, id, stream, Some(bytes)),
            Message::Eof(id, stream) => route(session, id, stream, None),
            Message::Credit(id, stream, n) => {
                if let Some(e) = session.entries().get(&id) {
                    e.control.windows[stream as usize].grant(n);
                }
                Ok(())
            }
            Message::Hello(_) => Err(violation("a second hello")),
            Message::Event(id, _) => Err(violation(format!("request {id}: hosts send no events"))),
        };
        if let Err(stop) = result {
            return stop;
        }
    }
}

/// Hands input data (or its end) to the request reading it. Data for a request that already
/// finished is dropped: it was in flight when the request ended.
fn route(session: &Session, id: u64, stream: Stream, bytes: Option<Vec<u8>>) -> Result<(), Stop> {
    let mut entries = session.entries();
    let Some(entry) = entries.get_mut(&id) else {
        return Ok(());
    };
    let Some((tx, budget, expected)) = &entry.input else {
        return Ok(());
    };
    if *expected != stream {
        return Err(violation(format!(
            "request {id}: input on stream {stream:?}, expected {expected:?}"
        )));
    }
    let msg = match bytes {
        Some(b) => {
            if !budget.charge(b.len(), INITIAL_WINDOW) {
                return Err(violation(format!(
                    "request {id}: more {stream:?} data than the credit given"
                )));
            }
            InputMsg::Data(b)
        }
        None => InputMsg::Eof,
    };
    let _ = tx.send(msg);
    Ok(())
}

/// Starts request `id`: answers the quick ones inline, runs the others on their own thread.
fn start(session: &Arc<Session>, id: u64, request: Request) -> Result<(), Stop> {
    if id == 0 {
        return Err(violation("request id 0 is reserved for the connection"));
    }
    if session.entries().contains_key(&id) {
        return Err(violation(format!("request id {id} is already in use")));
    }
    match request {
        Request::Ping => session.reply(
            id,
            Event::Pong {
                agent: env!("CARGO_PKG_VERSION").to_string(),
            },
        ),
        Request::Signal { target, signal } => {
            let result = with_exec(session, target, |h| reaper().signal(h.pid, signal));
            answer(session, id, target, result);
        }
        Request::Resize { target, size } => {
            let result = with_exec(session, target, |h| match &h.pty {
                Some(pty) => sys::set_winsize(pty.as_ref(), size),
                None => Err(io::Error::from_raw_os_error(libc::ENOTTY)),
            });
            answer(session, id, target, result);
        }
        Request::Cancel { target } => {
            let entry = session.entries().get_mut(&target).map(|e| {
                e.input = None;
                e.control.clone()
            });
            match entry {
                Some(control) => {
                    control.cancel();
                    session.reply(id, Event::Done { bytes: None });
                }
                None => no_such(session, id, target),
            }
        }
        Request::Shutdown => {
            let s = session.clone();
            let spawned = thread::Builder::new()
                .name("shutdown".into())
                .spawn(move || s.agent.shutdown(&s.outbox, id));
            if let Err(e) = spawned {
                session.error(id, ErrorKind::Busy, format!("cannot start a thread: {e}"));
            }
        }
        // A few system calls: answered inline, before any later request on this connection, so
        // an exec sent right behind it (in the same write) starts in the reseeded guest.
        Request::Restored(spec) => {
            let event = restore::restored(&session.agent, &spec);
            let failure = match &event {
                Event::Error(info) => Some(info.message.clone()),
                _ => None,
            };
            session.agent.set_restore_outcome(failure);
            session.reply(id, event);
        }
        Request::Processes => session.reply(
            id,
            Event::Processes {
                processes: procs().list(),
            },
        ),
        Request::SignalProcess { process, signal } => {
            let event = match running(&process) {
                Ok(p) => match reaper().signal(p.pid, signal) {
                    Ok(()) => Event::Done { bytes: None },
                    Err(e) => Event::Error(ErrorInfo {
                        kind: ErrorKind::Io,
                        message: format!("signalling {process}: {e}"),
                        errno: e.raw_os_error(),
                    }),
                },
                Err(info) => Event::Error(info),
            };
            session.reply(id, event);
        }
        Request::CloseStdin { process } => {
            let event = match running(&process) {
                Ok(p) => match p.close_stdin() {
                    Ok(()) => Event::Done { bytes: None },
                    Err(e) => Event::Error(ErrorInfo::new(ErrorKind::BadRequest, e.to_string())),
                },
                Err(info) => Event::Error(info),
            };
            session.reply(id, event);
        }
        Request::ResolveUser { user: spec } => {
            let event = match user::resolve(&spec, std::path::Path::new("/")) {
                Ok(id) => Event::User {
                    user: crate::protocol::UserInfo {
                        home: id
                            .home
                            .clone()
                            .unwrap_or_else(|| if id.uid == 0 { "/root" } else { "/" }.to_string()),
                        name: id.name,
                        uid: id.uid,
                        gid: id.gid,
                    },
                },
                Err(e) => Event::Error(ErrorInfo::new(ErrorKind::NotFound, e.to_string())),
            };
            session.reply(id, event);
        }
        Request::Exec(_) if session.agent.exec_refusal().is_some() => {
            let why = session.agent.exec_refusal().unwrap_or_default();
            session.error(id, ErrorKind::CouldNotStart, why);
        }
        other => spawn_request(session, id, other),
    }
    Ok(())
}

/// The running process `sel` names, or a `not_found` error naming it.
fn running(sel: &Selector) -> Result<std::sync::Arc<super::procs::Proc>, ErrorInfo> {
    procs()
        .find(sel)
        .filter(|p| p.running())
        .ok_or_else(|| ErrorInfo::new(ErrorKind::NotFound, format!("no {sel} is running")))
}

fn no_such(session: &Session, id: u64, target: u64) {
    session.error(
        id,
        ErrorKind::NoSuchRequest,
        format!("request {target} is not running"),
    );
}

fn with_exec(
    session: &Session,
    target: u64,
    f: impl FnOnce(&ExecHandle) -> io::Result<()>,
) -> Option<io::Result<()>> {
    let control = session.entries().get(&target)?.control.clone();
    let exec = control.exec();
    exec.as_ref().map(f)
}

fn answer(session: &Session, id: u64, target: u64, result: Option<io::Result<()>>) {
    match result {
        None => no_such(session, id, target),
        Some(Ok(())) => session.reply(id, Event::Done { bytes: None }),
        Some(Err(e)) => session.reply(
            id,
            Event::Error(ErrorInfo {
                kind: ErrorKind::Io,
                message: format!("request {target}: {e}"),
                errno: e.raw_os_error(),
            }),
        ),
    }
}

fn spawn_request(session: &Arc<Session>, id: u64, request: Request) {
    let input_stream = match &request {
        Request::Exec(_) | Request::WriteStdin { .. } => Some(Stream::Stdin),
        Request::WriteFile { .. } => Some(Stream::File),
        _ => None,
    };
    let control = Arc::new(Control {
        windows: std::array::from_fn(|_| Window::new(INITIAL_WINDOW)),
        cancelled: AtomicBool::new(false),
        exec: Mutex::new(None),
    });
    let (tx, rx) = mpsc::channel();
    let budget = Arc::new(Budget::default());
    {
        let mut entries = session.entries();
        if entries.len() >= MAX_REQUESTS {
            drop(entries);
            session.error(
                id,
                ErrorKind::Busy,
                format!("{MAX_REQUESTS} requests are already running on this connection"),
            );
            return;
        }
        entries.insert(
            id,
            Entry {
                input: input_stream.map(|s| (tx, budget.clone(), s)),
                control: control.clone(),
            },
        );
    }
    let ctx = Ctx {
        id,
        session: session.clone(),
        control,
    };
    let input = Input {
        rx,
        budget,
        stream: input_stream.unwrap_or(Stream::Stdin),
        id,
        outbox: session.outbox.clone(),
    };
    let spawned =
        thread::Builder::new()
            .name(format!("request-{id}"))
            .spawn(move || match request {
                Request::Exec(spec) => exec::run(ctx, input, spec),
                Request::Attach { process } => exec::attach(ctx, &process),
                Request::WriteStdin { process } => write_stdin(ctx, &input, &process),
                other => files::run(ctx, input, other),
            });
    if let Err(e) = spawned {
        session.entries().remove(&id);
        session.error(id, ErrorKind::Busy, format!("cannot start a thread: {e}"));
    }
}

/// Serves a `write_stdin` request: the host's data on stream 0 goes to the process's stdin until
/// the host's eof.
fn write_stdin(ctx: Ctx, input: &Input, sel: &Selector) {
    let event = (|| {
        let proc = running(sel)?;
        let mut bytes = 0u64;
        loop {
            match input.recv() {
                Some(InputMsg::Data(chunk)) => {
                    let written = proc.write_stdin(&chunk);
                    input.consumed(chunk.len());
                    written.map_err(|e| ErrorInfo::new(ErrorKind::BadRequest, e.to_string()))?;
                    bytes += chunk.len() as u64;
                }
                Some(InputMsg::Eof) => return Ok(Event::Done { bytes: Some(bytes) }),
                None => {
                    return Err(ErrorInfo::new(
                        ErrorKind::Cancelled,
                        format!("writing to the stdin of {sel} was cancelled"),
                    ));
                }
            }
        }
    })();
    ctx.finish(event.unwrap_or_else(Event::Error));
}
