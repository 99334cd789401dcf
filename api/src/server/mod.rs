//! The API socket: [`ApiServer::bind`] creates it, [`ApiServer::serve`] (a handler on the serving
//! thread) or [`ApiServer::serve_deferred`] (a handler on another thread, answering through a
//! [`Reply`]) answers requests on it.
//!
//! One thread serves every connection with an epoll loop ([`event_loop`]), as Firecracker does:
//! non-blocking sockets, at most [`Limits::max_connections`] of them, a deadline for a request
//! that started arriving, one for an idle keep-alive connection and one for a client that does
//! not read its answers, and a bound on the answers buffered for it. Only parsed requests reach
//! the handler, strictly one after another in the order they were parsed. Everything the loop
//! waits on (the listener, the epoll descriptor, the handler's eventfd) is created by `bind`, so
//! the serving thread needs no system call to create descriptors. The socket file is the
//! caller's: it is never removed here, neither before binding nor after.

mod conn;
mod event_loop;
mod listen;
mod table;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::{ApiError, ApiRequest, ApiResponse};

/// What the server allows its clients; [`Limits::default`] is what `kiln-vmm` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once. When all are taken, a new client waits in the socket's backlog
    /// unless one can be dropped for it (see [`Limits::evict_after`]).
    pub max_connections: usize,
    /// A request whose first byte arrived must be complete within this (a half-sent request,
    /// a slowloris trickle); it is then answered 400 and the connection closed.
    pub read_timeout: Duration,
    /// A keep-alive connection with nothing asked for this long is closed.
    pub idle_timeout: Duration,
    /// A client that does not read its answers for this long is disconnected.
    pub write_timeout: Duration,
    /// Answers buffered for a client before its further requests are no longer read.
    pub max_unsent: usize,
    /// When every slot is taken, a connection idle this long (after an answer, or silent since it
    /// connected) is dropped for a new client; failing that, the one whose request has been
    /// arriving longest, at once.
    pub evict_after: Duration,
    /// New connections accepted per event, so a flood of them does not starve the rest.
    pub accepts_per_turn: usize,
    /// Largest request body taken (Firecracker's `--http-api-max-payload-size`); a larger one is
    /// refused from its head, before it is read.
    pub max_payload: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 128,
            read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(5),
            max_unsent: 64 * 1024,
            evict_after: Duration::from_millis(50),
            accepts_per_turn: 32,
            max_payload: crate::http::DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// A bound, listening API socket.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    unwritten: Unwritten,
    epoll: Epoll,
    wake: Arc<EventFd>,
    limits: Limits,
}

/// Counts answers the handler gave that are not yet written to their connections, so a VMM that
/// is about to exit can let the last ones (an action that ended the VM, say) reach their clients.
#[derive(Clone, Debug, Default)]
pub struct Unwritten(Arc<(Mutex<usize>, Condvar)>);

impl Unwritten {
    fn add(&self) {
        *self.0.0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    fn done(&self) {
        let mut n = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.0.1.notify_all();
        }
    }

    /// Waits until every answer was written or `timeout` passed; true if none is left.
    pub fn wait_written(&self, timeout: Duration) -> bool {
        let n = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        let (n, _) = self
            .0
            .1
            .wait_timeout_while(n, timeout, |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        *n == 0
    }
}

/// Where the answer to one request goes, from whichever thread handles it. Dropping it without
/// [`Reply::send`] answers the client with a fault saying so.
#[derive(Debug)]
pub struct Reply {
    answer: Option<SyncSender<ApiResponse>>,
    wake: Arc<EventFd>,
}

impl Reply {
    fn new(answer: SyncSender<ApiResponse>, wake: Arc<EventFd>) -> Self {
        Self {
            answer: Some(answer),
            wake,
        }
    }

    /// Sends the answer to the server's thread, which writes it to the client.
    pub fn send(mut self, response: ApiResponse) {
        if let Some(answer) = self.answer.take() {
            // The channel holds this one answer, so this never blocks; it fails only if the
            // server is gone, and then nobody is waiting.
            let _ = answer.try_send(response);
        }
    }
}

impl Drop for Reply {
    /// Wakes the server's loop, which finds the answer, or that none will come.
    fn drop(&mut self) {
        // The sender goes before the wake-up: fields drop only after this returns, and a loop
        // woken while the sender still lived would find neither an answer nor a disconnect, and
        // sleep on with the client waiting (CI saw a dropped request unanswered for 300 s).
        drop(self.answer.take());
        let _ = self.wake.write(1);
    }
}

impl ApiServer {
    /// Creates the socket at `path` and starts listening: clients can connect as soon as this
    /// returns, and as soon as the file exists (see `listen.rs`). Refuses a path where anything
    /// already exists rather than removing it.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, ApiError> {
        let path = path.as_ref().to_path_buf();
        if path.symlink_metadata().is_ok() {
            return Err(ApiError::SocketExists(path));
        }
        let listener = listen::listen_at(&path)?;
        let setup = |what| move |source| ApiError::Setup { what, source };
        listener
            .set_nonblocking(true)
            .map_err(setup("non-blocking listener"))?;
        let epoll = Epoll::new().map_err(setup("epoll"))?;
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(setup("the handler's eventfd"))?;
        let listening = EpollEvent::new(EventSet::IN, event_loop::LISTENER);
        epoll
            .ctl(ControlOperation::Add, listener.as_raw_fd(), listening)
            .map_err(setup("watching the listener"))?;
        let answered = EpollEvent::new(EventSet::IN, event_loop::WAKE);
        epoll
            .ctl(ControlOperation::Add, wake.as_raw_fd(), answered)
            .map_err(setup("watching the handler's eventfd"))?;
        Ok(Self {
            listener,
            path,
            unwritten: Unwritten::default(),
            epoll,
            wake: Arc::new(wake),
            limits: Limits::default(),
        })
    }

    /// The same server with other limits (tests use short timeouts and few connections).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle on the answers not yet written (see [`Unwritten`]).
    pub fn unwritten(&self) -> Unwritten {
        self.unwritten.clone()
    }

    /// Answers requests until the process ends, calling `handler` for each request that
    /// parsed, one at a time on this thread; malformed requests and bad bodies are answered
    /// 400 without reaching it. Returns only if waiting for events fails.
    pub fn serve(self, mut handler: impl FnMut(ApiRequest) -> ApiResponse) -> Result<(), ApiError> {
        self.serve_deferred(move |request, reply| reply.send(handler(request)))
    }

    /// Like [`ApiServer::serve`], but `dispatch` only hands each request on (to another
    /// thread, say) with the [`Reply`] that answers it; the loop goes on serving other
    /// connections meanwhile, and gives `dispatch` the next request once this one is answered.
    pub fn serve_deferred(self, dispatch: impl FnMut(ApiRequest, Reply)) -> Result<(), ApiError> {
        event_loop::EventLoop::new(self, dispatch).run()
    }
}

#[cfg(test)]
mod tests;
