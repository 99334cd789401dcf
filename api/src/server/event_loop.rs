//! The API server's one thread: an epoll loop over the listening socket, every connection and
//! the eventfd that says the handler answered, as Firecracker's API server does. No thread is
//! started per connection (or at all), so the thread's seccomp filter and the allocator see one
//! thread whatever the clients do.
//!
//! Each turn: wait for events or the nearest deadline; accept new connections (dropping one to
//! make room when every slot is taken, see [`super::table`]); read, parse and answer on the
//! connections that are ready; close those whose time ran out; hand the next parsed request to
//! the handler if it has none. Requests reach the handler one at a time, in the order they
//! were parsed; while it works on one, the loop goes on reading, refusing and timing out others.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, TryRecvError, sync_channel};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::conn::{Conn, Expiry, Interest};
use super::table::{Table, Token};
use super::{ApiServer, Reply};
use crate::{ApiError, ApiRequest, ApiResponse};

/// epoll's user data for the listening socket.
pub(super) const LISTENER: u64 = u64::MAX;
/// epoll's user data for the eventfd written when the handler answers.
pub(super) const WAKE: u64 = u64::MAX - 1;
/// Events taken from one `epoll_wait`.
const EVENTS: usize = 64;
/// How long accepting waits after a failed accept (out of descriptors, say).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How often repeated warnings (connections dropped, accepts failing) are summed up.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A connection's socket: reads with `recv`, writes with `send(MSG_NOSIGNAL)`, so a client that
/// went away is an `EPIPE` error and never a SIGPIPE, whatever the process does with that signal.
#[derive(Debug)]
pub(crate) struct Socket(UnixStream);

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.0).read(buf)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes and the descriptor is open (owned by
        // `self.0`); send() only reads the buffer.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A warning that may repeat many times a second under load: said once, then counted, and the
/// count said at most every [`WARN_EVERY`].
struct Tally {
    since: Option<Instant>,
    more: u64,
}

impl Tally {
    fn new() -> Self {
        Self {
            since: None,
            more: 0,
        }
    }

    fn note(&mut self, now: Instant, what: &str, first: impl FnOnce() -> String) {
        match self.since {
            Some(since) if now.saturating_duration_since(since) < WARN_EVERY => self.more += 1,
            _ => {
                if self.more > 0 {
                    log::warn!("API: {} more {what} since the last warning", self.more);
                }
                log::warn!("API: {}", first());
                self.since = Some(now);
                self.more = 0;
            }
        }
    }
}

/// The handler's request in progress and where its answer comes back.
struct InFlight {
    token: Token,
    answer: Receiver<ApiResponse>,
}

/// The loop's state; see the module's doc.
pub(super) struct EventLoop<D> {
    server: ApiServer,
    table: Table<Socket>,
    queue: VecDeque<Token>,
    in_flight: Option<InFlight>,
    dispatch: D,
    /// Accepting is paused (the listener unwatched) until then.
    accept_paused: Option<Instant>,
    evictions: Tally,
    accept_failures: Tally,
}

impl<D: FnMut(ApiRequest, Reply)> EventLoop<D> {
    pub(super) fn new(server: ApiServer, dispatch: D) -> Self {
        Self {
            table: Table::new(server.limits.max_connections),
            server,
            queue: VecDeque::new(),
            in_flight: None,
            dispatch,
            accept_paused: None,
            evictions: Tally::new(),
            accept_failures: Tally::new(),
        }
    }

    /// Serves until waiting for events fails.
    pub(super) fn run(mut self) -> Result<(), ApiError> {
        let mut events = vec![EpollEvent::default(); EVENTS];
        loop {
            let timeout = self.timeout(Instant::now());
            let n = match self.server.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ApiError::Serve(e)),
            };
            let now = Instant::now();
            for event in &events[..n] {
                match event.data() {
                    LISTENER => self.accept(now),
                    WAKE => {
                        // Only clears the counter; the answer is in the channel.
                        let _ = self.server.wake.read();
                        self.collect_answer(now);
                    }
                    data => self.on_event(Token::from_u64(data), event.event_set(), now),
                }
            }
            let now = Instant::now();
            self.expire(now);
            self.resume_accepting(now);
            self.dispatch_next(now);
        }
    }

    /// Milliseconds until the nearest deadline (rounded up), or -1 for none.
    fn timeout(&self, now: Instant) -> i32 {
        let limits = &self.server.limits;
        let next = [self.table.next_deadline(limits), self.accept_paused]
            .into_iter()
            .flatten()
            .min();
        match next {
            None => -1,
            Some(at) => {
                let wait = at.saturating_duration_since(now);
                let ms = wait.as_micros().div_ceil(1000);
                ms.min(i32::MAX as u128) as i32
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        let limits = self.server.limits;
        // Readiness promises one waiting client; past the first, a full table accepts no more
        // this turn, so nobody is dropped for a client that is not there.
        for n in 0..limits.accepts_per_turn {
            if self.table.is_full() {
                if n > 0 {
                    return;
                }
                match self.table.eviction_candidate(now, &limits) {
                    Some(token) => {
                        self.evictions
                            .note(now, "connections dropped to make room", || {
                                format!(
                                    "{} connections open, the most served at once; dropped the one \
                                     idle longest, or else the one whose request has been \
                                     arriving longest, to make room",
                                    limits.max_connections
                                )
                            });
                        self.close(token);
                    }
                    None => {
                        // Clients wait in the socket's backlog until a slot frees.
                        let until = self
                            .table
                            .next_evictable(&limits)
                            .unwrap_or(now + ACCEPT_RETRY)
                            .min(now + Duration::from_secs(1));
                        self.pause_accepting(until);
                        return;
                    }
                }
            }
            match accept4(&self.server.listener) {
                Ok(stream) => self.add(stream, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    self.accept_failures.note(now, "failed accepts", || {
                        format!("cannot accept a connection, retrying shortly: {e}")
                    });
                    self.pause_accepting(now + ACCEPT_RETRY);
                    return;
                }
            }
        }
    }

    fn add(&mut self, stream: UnixStream, now: Instant) {
        let limits = self.server.limits;
        let conn = Conn::new(Socket(stream), now, self.server.limits.max_payload);
        let interest = conn.interest(&limits);
        let Some(token) = self.table.insert(conn, interest) else {
            return;
        };
        let fd = match self.table.get_mut(token) {
            Some(entry) => entry.conn.stream().0.as_raw_fd(),
            None => return,
        };
        let event = EpollEvent::new(event_set(interest), token.to_u64());
        if let Err(e) = self.server.epoll.ctl(ControlOperation::Add, fd, event) {
            log::warn!("API: cannot watch a new connection, closing it: {e}");
            self.close(token);
            return;
        }
        // The request may be there already.
        self.drive(token, now);
    }

    fn on_event(&mut self, token: Token, events: EventSet, now: Instant) {
        if events.contains(EventSet::ERROR) {
            self.close(token);
            return;
        }
        self.drive(token, now);
        if events.contains(EventSet::HANG_UP)
            && let Some(entry) = self.table.get_mut(token)
            && entry.watched.is_some()
        {
            // The client is gone both ways but the handler has its request: stop watching, or
            // the hang-up (which epoll always reports) would wake the loop until it answers.
            let fd = entry.conn.stream().0.as_raw_fd();
            let _ = self
                .server
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            entry.watched = None;
        }
    }

    /// Moves a connection on as far as it goes without waiting: writes what the client takes,
    /// reads and parses what it sent, then closes it if done or updates what epoll watches.
    fn drive(&mut self, token: Token, now: Instant) {
        let limits = self.server.limits;
        let Some(entry) = self.table.get_mut(token) else {
            return;
        };
        let mut written = entry.conn.flush(now);
        let queued = entry.conn.pump(now, &limits);
        written += entry.conn.flush(now);
        entry.conn.settle(now, &limits);
        for _ in 0..written {
            self.server.unwritten.done();
        }
        if queued {
            self.queue.push_back(token);
        }
        let Some(entry) = self.table.get_mut(token) else {
            return;
        };
        if entry.conn.finished() {
            self.close(token);
            return;
        }
        let want = entry.conn.interest(&limits);
        if let Some(watched) = entry.watched
            && watched != want
        {
            let fd = entry.conn.stream().0.as_raw_fd();
            let event = EpollEvent::new(event_set(want), token.to_u64());
            match self.server.epoll.ctl(ControlOperation::Modify, fd, event) {
                Ok(()) => entry.watched = Some(want),
                Err(e) => {
                    log::warn!("API: cannot change what a connection is watched for: {e}");
                    self.close(token);
                }
            }
        }
    }

    /// Closes a connection; its answers not yet written never will be.
    fn close(&mut self, token: Token) {
        if let Some(entry) = self.table.remove(token) {
            for _ in 0..entry.conn.unwritten_answers() {
                self.server.unwritten.done();
            }
            // Dropping the socket closes it, which also takes it out of epoll.
        }
    }

    fn expire(&mut self, now: Instant) {
        let limits = self.server.limits;
        for (token, why) in self.table.expired(now, &limits) {
            let Some(entry) = self.table.get_mut(token) else {
                continue;
            };
            log::debug!("API connection closed: {}", describe(why, &limits));
            let written = entry.conn.expire(why, &limits, now);
            for _ in 0..written {
                self.server.unwritten.done();
            }
            self.close(token);
        }
    }

    fn pause_accepting(&mut self, until: Instant) {
        if self.accept_paused.is_none() {
            let fd = self.server.listener.as_raw_fd();
            let event = EpollEvent::new(EventSet::empty(), LISTENER);
            let _ = self.server.epoll.ctl(ControlOperation::Modify, fd, event);
        }
        self.accept_paused = Some(until);
    }

    fn resume_accepting(&mut self, now: Instant) {
        if let Some(until) = self.accept_paused
            && (now >= until || !self.table.is_full())
        {
            let fd = self.server.listener.as_raw_fd();
            let event = EpollEvent::new(EventSet::IN, LISTENER);
            match self.server.epoll.ctl(ControlOperation::Modify, fd, event) {
                Ok(()) => self.accept_paused = None,
                Err(e) => {
                    log::warn!("API: cannot watch the socket for new connections: {e}");
                    self.accept_paused = Some(now + ACCEPT_RETRY);
                }
            }
        }
    }

    /// Hands parsed requests to the handler, one at a time, in the order they were parsed.
    fn dispatch_next(&mut self, now: Instant) {
        while self.in_flight.is_none() {
            let Some(token) = self.queue.pop_front() else {
                return;
            };
            let Some(request) = self
                .table
                .get_mut(token)
                .and_then(|e| e.conn.take_request())
            else {
                continue;
            };
            self.server.unwritten.add();
            let (tx, answer) = sync_channel(1);
            (self.dispatch)(request, Reply::new(tx, self.server.wake.clone()));
            self.in_flight = Some(InFlight { token, answer });
            // A handler on this thread has answered already.
            self.collect_answer(now);
        }
    }

    /// Takes the handler's answer, if it came, to its connection.
    fn collect_answer(&mut self, now: Instant) {
        let Some(in_flight) = &self.in_flight else {
            return;
        };
        let response = match in_flight.answer.try_recv() {
            Ok(response) => response,
            Err(TryRecvError::Empty) => return,
            Err(TryRecvError::Disconnected) => {
                ApiResponse::fault("the VMM dropped the request without answering it")
            }
        };
        let token = in_flight.token;
        self.in_flight = None;
        match self.table.get_mut(token) {
            Some(entry) => {
                entry.conn.answer(&response, now);
                self.drive(token, now);
            }
            // The client left before its answer: nothing will write it.
            None => self.server.unwritten.done(),
        }
    }
}

/// epoll's events for `interest` (level-triggered; hang-ups and errors are always reported).
fn event_set(interest: Interest) -> EventSet {
    let mut set = EventSet::empty();
    if interest.read {
        set |= EventSet::IN | EventSet::READ_HANG_UP;
    }
    if interest.write {
        set |= EventSet::OUT;
    }
    set
}

fn describe(why: Expiry, limits: &super::Limits) -> String {
    match why {
        Expiry::Read => format!("request incomplete after {:?}", limits.read_timeout),
        Expiry::Idle => format!("idle for {:?}", limits.idle_timeout),
        Expiry::Write => format!("answers unread for {:?}", limits.write_timeout),
    }
}

/// Accepts one connection, non-blocking and close-on-exec from the start (one system call, no
/// `fcntl` or `ioctl` after it).
fn accept4(listener: &std::os::unix::net::UnixListener) -> io::Result<UnixStream> {
    // SAFETY: the listener's descriptor is open; null address pointers ask for no address.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}
