//! One connection to an agent, shared by every request on it: a reader thread that routes each
//! frame to its request's channel, and the writer thread ([`Outbox`]). The agent is inside an
//! untrusted guest, so the reader enforces the flow-control credit it gave and bounds how many
//! events may queue, and how many bytes they take; a misbehaving agent gets its connection
//! closed, never our memory. The reader never waits on the writer (credit is coalesced, cancels
//! are one per request), so a peer that stops reading cannot stop us reading.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::Error;
use crate::link::{Budget, Credit, Outbox, Socket, Window};
use crate::protocol::{
    Event, INITIAL_WINDOW, MAX_CHUNK, Message, Request, Stream, message::encode_data, read_frame,
};

/// Events (and end-of-stream marks) that may wait unread for one request before the agent is
/// judged to be flooding us.
pub const MAX_QUEUED_EVENTS: usize = 1024;

/// Bytes of events (as framed on the wire) that may wait unread for one request before the agent
/// is judged to be flooding us: 1024 events of a megabyte each would otherwise be a gigabyte.
pub const MAX_QUEUED_EVENT_BYTES: usize = 4 << 20;

/// What the reader hands a request.
pub(crate) enum Inbound {
    Event(Event),
    Data(Stream, Vec<u8>),
    Eof(Stream),
    Closed(String),
}

/// Per-request state that both the reader and the request's owner touch.
struct Flow {
    windows: [Window; 4],
    budgets: [Budget; 4],
    queued: AtomicUsize,
    /// Wire bytes of the events counted in `queued`.
    queued_bytes: AtomicUsize,
}

struct Slot {
    /// Each item with the event bytes it was charged (0 for data, which credit bounds).
    tx: Sender<(Inbound, usize)>,
    flow: Arc<Flow>,
    /// The owner went away: credit data at once and drop everything.
    discard: bool,
}

#[derive(Default)]
struct Slots {
    map: HashMap<u64, Slot>,
    closed: Option<String>,
}

/// The connection. Dropping the last handle shuts the socket, which ends both threads.
pub(crate) struct Conn {
    /// The agent's protocol revision, from its hello.
    pub revision: std::sync::atomic::AtomicU32,
    outbox: Outbox,
    slots: Mutex<Slots>,
    next_id: AtomicU64,
    socket: Socket,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.socket.shutdown();
    }
}

impl Conn {
    /// Starts the reader and writer threads on a socket that finished its handshake.
    pub fn start(socket: Socket) -> Result<Arc<Conn>, Error> {
        Ok(Self::start_with_sent(socket, 0)?.0)
    }

    /// [`Conn::start`] on a socket where the first `sent` requests (ids 1 to `sent`) were
    /// already written, behind the hello: their handles are returned, in order, registered
    /// before the reader can see their answers.
    pub fn start_with_sent(socket: Socket, sent: u64) -> Result<(Arc<Conn>, Vec<Req>), Error> {
        let io = |e| Error::Local {
            what: "starting the connection threads".into(),
            source: e,
        };
        let outbox = Outbox::start(socket.try_clone().map_err(io)?, "kiln-client").map_err(io)?;
        let reader = socket.try_clone().map_err(io)?;
        let conn = Arc::new(Conn {
            revision: std::sync::atomic::AtomicU32::new(0),
            outbox,
            slots: Mutex::new(Slots::default()),
            next_id: AtomicU64::new(sent + 1),
            socket,
        });
        let reqs = (1..=sent)
            .map(|id| conn.register(id))
            .collect::<Result<Vec<_>, _>>()?;
        let weak = Arc::downgrade(&conn);
        thread::Builder::new()
            .name("kiln-client-reader".into())
            .spawn(move || read_loop(weak, reader))
            .map_err(io)?;
        Ok((conn, reqs))
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the connection ended (the agent closed it, or it was judged misbehaving).
    pub fn is_closed(&self) -> bool {
        self.slots().closed.is_some()
    }

    /// Sends `request` under a fresh id and returns its handle.
    pub fn start_request(self: &Arc<Self>, request: Request) -> Result<Req, Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let req = self.register(id)?;
        if !self.outbox.send(&Message::Request(id, request)) {
            return Err(Error::Closed("the connection's writer stopped".into()));
        }
        Ok(req)
    }

    /// Makes the slot that receives request `id`'s answers.
    fn register(self: &Arc<Self>, id: u64) -> Result<Req, Error> {
        let (tx, rx) = mpsc::channel();
        let flow = Arc::new(Flow {
            windows: std::array::from_fn(|_| Window::new(INITIAL_WINDOW)),
            budgets: Default::default(),
            queued: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
        });
        let mut slots = self.slots();
        if let Some(reason) = &slots.closed {
            return Err(Error::Closed(reason.clone()));
        }
        slots.map.insert(
            id,
            Slot {
                tx,
                flow: flow.clone(),
                discard: false,
            },
        );
        Ok(Req {
            id,
            conn: self.clone(),
            rx,
            flow,
            finished: false,
        })
    }

    /// Asks the agent to abandon request `target`, ignoring the answer. Never waits (the reader
    /// calls it); at most one per request.
    fn cancel(&self, target: u64) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.outbox
            .send_control(&Message::Request(id, Request::Cancel { target }));
    }

    fn credit(&self, id: u64, stream: Stream, flow: &Flow, n: usize) {
        flow.budgets[stream as usize].release(n);
        self.outbox.credit(id, stream, n);
    }

    /// Ends every request with `reason` and refuses new ones.
    fn fail_all(&self, reason: String) {
        let mut slots = self.slots();
        for (_, slot) in slots.map.drain() {
            let _ = slot.tx.send((Inbound::Closed(reason.clone()), 0));
            for w in &slot.flow.windows {
                w.close();
            }
        }
        slots.closed.get_or_insert(reason);
        drop(slots);
        self.socket.shutdown();
    }

    /// Routes one decoded message that took `wire_len` bytes; an error is a reason to close the
    /// connection.
    fn route(&self, message: Message, wire_len: usize) -> Result<(), String> {
        let mut slots = self.slots();
        let (id, item) = match message {
            Message::Event(0, Event::Error(info)) => {
                return Err(format!("agent: {}", info.message));
            }
            Message::Event(id, event) => (id, Inbound::Event(event)),
            Message::Data(id, stream, bytes) => (id, Inbound::Data(stream, bytes)),
            Message::Eof(id, stream) => (id, Inbound::Eof(stream)),
            Message::Credit(id, stream, n) => {
                if let Some(slot) = slots.map.get(&id) {
                    slot.flow.windows[stream as usize].grant(n);
                }
                return Ok(());
            }
            Message::Hello(_) | Message::Request(..) => {
                return Err("the agent sent a hello or request mid-connection".into());
            }
        };
        let Some(slot) = slots.map.get(&id) else {
            // In flight when its request ended (or never ours): nothing to do.
            return Ok(());
        };
        let flow = slot.flow.clone();
        if slot.discard && !matches!(item, Inbound::Data(..)) {
            // Nobody reads this request any more: only its end matters.
            if matches!(&item, Inbound::Event(e) if e.is_final()) {
                slots.map.remove(&id);
            }
            return Ok(());
        }
        match &item {
            Inbound::Data(stream, bytes) => {
                if !flow.budgets[*stream as usize].charge(bytes.len(), INITIAL_WINDOW) {
                    return Err(format!(
                        "request {id}: the agent sent more data than credited"
                    ));
                }
                if slot.discard {
                    let n = bytes.len();
                    drop(slots);
                    self.credit(id, *stream, &flow, n);
                    return Ok(());
                }
            }
            _ => {
                if flow.queued.fetch_add(1, Ordering::AcqRel) >= MAX_QUEUED_EVENTS {
                    return Err(format!(
                        "request {id}: the agent sent more than {MAX_QUEUED_EVENTS} events that \
                         were not read yet"
                    ));
                }
                let bytes = flow.queued_bytes.fetch_add(wire_len, Ordering::AcqRel) + wire_len;
                if bytes > MAX_QUEUED_EVENT_BYTES {
                    return Err(format!(
                        "request {id}: the agent sent {bytes} bytes of events that were not \
                         read yet (the limit is {MAX_QUEUED_EVENT_BYTES})"
                    ));
                }
            }
        }
        let is_final = matches!(&item, Inbound::Event(e) if e.is_final());
        let charged = if matches!(item, Inbound::Data(..)) {
            0
        } else {
            wire_len
        };
        let _ = slot.tx.send((item, charged));
        if is_final {
            slots.map.remove(&id);
            for w in &flow.windows {
                w.close();
            }
        }
        Ok(())
    }

    /// Fails one request whose frame could not be decoded, and asks the agent to drop it.
    fn fail_request(&self, id: u64, reason: String) {
        let Some(slot) = self.slots().map.remove(&id) else {
            return;
        };
        let _ = slot.tx.send((Inbound::Closed(reason), 0));
        for w in &slot.flow.windows {
            w.close();
        }
        self.cancel(id);
    }
}

fn read_loop(conn: std::sync::Weak<Conn>, socket: Socket) {
    let reason = loop {
        let raw = match read_frame(&mut &socket) {
            Ok(Some(raw)) => raw,
            Ok(None) => break "the agent closed the connection".to_string(),
            Err(e) => break e.to_string(),
        };
        let Some(conn) = conn.upgrade() else { return };
        let wire_len = raw.payload.len() + 13;
        let result = match Message::decode(raw) {
            Ok(m) => conn.route(m, wire_len),
            Err(e) if e.id() == 0 => Err(format!("protocol error: {e}")),
            Err(e) => {
                conn.fail_request(e.id(), format!("protocol error: {e}"));
                Ok(())
            }
        };
        if let Err(reason) = result {
            break reason;
        }
    };
    if let Some(conn) = conn.upgrade() {
        conn.fail_all(reason);
    }
}

/// One request's handle: its incoming channel and its outgoing streams.
pub(crate) struct Req {
    pub id: u64,
    conn: Arc<Conn>,
    rx: Receiver<(Inbound, usize)>,
    flow: Arc<Flow>,
    finished: bool,
}

impl Req {
    /// The next thing the agent sent for this request, waiting until `deadline` if given. Data
    /// is credited back as it is handed out.
    pub fn recv(&mut self, deadline: Option<Instant>) -> Result<Inbound, Error> {
        if self.finished {
            return Err(Error::Protocol(format!(
                "request {} already ended",
                self.id
            )));
        }
        let waiting_since = Instant::now();
        let item = match deadline {
            None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => self
                .rx
                .recv_timeout(d.saturating_duration_since(Instant::now())),
        };
        let (item, charged) = match item {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) => {
                // How long this call waited, not how far past the deadline it woke.
                return Err(Error::Timeout(deadline.map_or(Duration::ZERO, |d| {
                    d.saturating_duration_since(waiting_since)
                })));
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.finished = true;
                return Err(Error::Closed("the connection's reader stopped".into()));
            }
        };
        match &item {
            Inbound::Data(stream, bytes) => {
                self.conn.credit(self.id, *stream, &self.flow, bytes.len())
            }
            Inbound::Event(e) => {
                self.flow.queued.fetch_sub(1, Ordering::AcqRel);
                self.flow.queued_bytes.fetch_sub(charged, Ordering::AcqRel);
                self.finished = e.is_final();
            }
            Inbound::Eof(_) => {
                self.flow.queued.fetch_sub(1, Ordering::AcqRel);
                self.flow.queued_bytes.fetch_sub(charged, Ordering::AcqRel);
            }
            Inbound::Closed(reason) => {
                self.finished = true;
                return Err(Error::Closed(reason.clone()));
            }
        }
        Ok(item)
    }

    /// A handle for sending this request's input from another thread.
    pub fn sender(&self) -> ReqSender {
        ReqSender {
            id: self.id,
            conn: self.conn.clone(),
            flow: self.flow.clone(),
        }
    }

    /// The connection.
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    /// Asks the agent to abandon the request; what it still sends is discarded.
    pub fn abandon(&mut self) {
        if !self.finished {
            self.conn.cancel(self.id);
        }
    }
}

impl Drop for Req {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Whatever arrives from now on is credited and dropped, so the agent is never left
        // waiting on a reader that is gone; what already queued is credited here.
        if let Some(slot) = self.conn.slots().map.get_mut(&self.id) {
            slot.discard = true;
        }
        while let Ok((item, _)) = self.rx.try_recv() {
            if let Inbound::Data(stream, bytes) = item {
                self.conn.credit(self.id, stream, &self.flow, bytes.len());
            }
        }
    }
}

/// Sends a request's input stream (stdin or file data), respecting the agent's credit.
#[derive(Clone)]
pub(crate) struct ReqSender {
    id: u64,
    conn: Arc<Conn>,
    flow: Arc<Flow>,
}

impl ReqSender {
    /// Sends up to one chunk of `bytes`, waiting for credit; returns how much was sent, or
    /// `None` once the request has ended.
    pub fn send(&self, stream: Stream, bytes: &[u8]) -> Option<usize> {
        let window = &self.flow.windows[stream as usize];
        let n = window.wait(bytes.len().min(MAX_CHUNK))?;
        self.send_granted(stream, &bytes[..n])
    }

    /// Sends `bytes` (at most what the window holds), which the caller waited credit for.
    fn send_granted(&self, stream: Stream, bytes: &[u8]) -> Option<usize> {
        let n = bytes.len();
        self.flow.windows[stream as usize].consume(n);
        self.conn
            .outbox
            .send_bytes(encode_data(self.id, stream, bytes))
            .then_some(n)
    }

    /// Ends the stream.
    pub fn eof(&self, stream: Stream) {
        self.conn.outbox.send(&Message::Eof(self.id, stream));
    }

    /// Waits for credit until `deadline`: how much one `send` may take.
    pub fn wait_credit_until(&self, stream: Stream, deadline: Instant) -> Credit {
        self.flow.windows[stream as usize].wait_until(MAX_CHUNK, deadline)
    }
}
