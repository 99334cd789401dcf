//! The sending side of a connection: one writer thread drains a queue of encoded frames into the
//! socket. Everyone else only enqueues.
//!
//! The queue is bounded in bytes, whatever the peer does:
//! - Credit frames are coalesced: a credit waiting to be written absorbs later ones for the same
//!   stream, so a peer sending a million one-byte data frames while not reading queues one credit
//!   frame per stream, not a million.
//! - Other frames wait while more than [`OUTBOX_LIMIT`] bytes are queued (backpressure on whoever
//!   produces them). A peer that reads nothing for [`STALL_LIMIT`] while senders wait has its
//!   connection closed.
//! - [`Outbox::send_control`] never waits (for a reader thread, which must keep reading so the two
//!   ends cannot block each other); what it queues is bounded by its callers (one cancel per
//!   request at most).

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufWriter, Write};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::Socket;
use crate::protocol::{Message, Stream};

/// Bytes of frames that may wait to be written before senders wait for the peer to read.
pub const OUTBOX_LIMIT: usize = 1 << 20;

/// How long senders wait while the peer reads nothing before the connection is closed.
pub const STALL_LIMIT: Duration = Duration::from_secs(30);

enum Item {
    Frame(Vec<u8>),
    /// Write the coalesced credits now.
    Credits,
    Barrier(Sender<()>),
}

struct Queue {
    items: VecDeque<Item>,
    /// Bytes of the frames in `items`.
    bytes: usize,
    /// Credit not yet written, per (request, stream); an `Item::Credits` is queued while non-empty.
    credits: BTreeMap<(u64, u8), u64>,
    /// Every handle is gone: write what is queued, then stop.
    finishing: bool,
    /// The connection is gone (a write failed, or it stalled): nothing more is queued.
    closed: bool,
    /// When the writer last got bytes into the socket (or the queue was last empty).
    progress: Instant,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer.
    work: Condvar,
    /// Wakes senders waiting for room.
    room: Condvar,
    socket: Socket,
    limit: usize,
    stall: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close(&self, q: &mut Queue) {
        q.closed = true;
        q.items.clear();
        q.bytes = 0;
        q.credits.clear();
        self.work.notify_all();
        self.room.notify_all();
        self.socket.shutdown();
    }
}

/// Ends the writer (after it wrote what was queued) when the last [`Outbox`] handle goes.
struct Token(Arc<Shared>);

impl Drop for Token {
    fn drop(&mut self) {
        self.0.lock().finishing = true;
        self.0.work.notify_all();
    }
}

/// A handle for queueing frames on a connection. Cloning it is cheap; the writer thread ends
/// when every handle is gone (after writing what was queued) or when a write fails.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
    _token: Arc<Token>,
}

impl Outbox {
    /// Starts the writer thread on `socket`. When a write fails, the socket is shut down so the
    /// connection's reader notices too.
    pub fn start(socket: Socket, name: &str) -> std::io::Result<Outbox> {
        Self::start_with(socket, name, OUTBOX_LIMIT, STALL_LIMIT)
    }

    /// [`Outbox::start`] with another byte limit and stall limit (tests use small ones).
    pub fn start_with(
        socket: Socket,
        name: &str,
        limit: usize,
        stall: Duration,
    ) -> std::io::Result<Outbox> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                credits: BTreeMap::new(),
                finishing: false,
                closed: false,
                progress: Instant::now(),
            }),
            work: Condvar::new(),
            room: Condvar::new(),
            socket,
            limit,
            stall,
        });
        let writer = shared.clone();
        thread::Builder::new()
            .name(format!("{name}-writer"))
            .spawn(move || write_loop(&writer))?;
        Ok(Outbox {
            _token: Arc::new(Token(shared.clone())),
            shared,
        })
    }

    /// Queues an encoded frame, waiting while the queue is full. False when the connection is
    /// gone (or was closed because the peer read nothing for [`STALL_LIMIT`]).
    pub fn send_bytes(&self, frame: Vec<u8>) -> bool {
        let s = &self.shared;
        let mut q = s.lock();
        loop {
            if q.closed {
                return false;
            }
            if q.bytes == 0 || q.bytes + frame.len() <= s.limit {
                break;
            }
            let (g, _) = s
                .room
                .wait_timeout(q, s.stall)
                .unwrap_or_else(|p| p.into_inner());
            q = g;
            if !q.closed && q.bytes > 0 && q.progress.elapsed() >= s.stall {
                s.close(&mut q);
                return false;
            }
        }
        q.bytes += frame.len();
        q.items.push_back(Item::Frame(frame));
        s.work.notify_one();
        true
    }

    /// Queues a message, waiting while the queue is full. False when the connection is gone.
    pub fn send(&self, message: &Message) -> bool {
        self.send_bytes(message.encode())
    }

    /// Queues a message without waiting, whatever is queued; for reader threads. Callers bound
    /// how many such frames they make.
    pub fn send_control(&self, message: &Message) -> bool {
        let frame = message.encode();
        let mut q = self.shared.lock();
        if q.closed {
            return false;
        }
        q.bytes += frame.len();
        q.items.push_back(Item::Frame(frame));
        self.shared.work.notify_one();
        true
    }

    /// Returns `n` bytes of credit on `stream` of request `id` to the peer. Never waits: credit
    /// waiting to be written absorbs this one.
    pub fn credit(&self, id: u64, stream: Stream, n: usize) {
        let mut q = self.shared.lock();
        if q.closed || n == 0 {
            return;
        }
        let first = q.credits.is_empty();
        let slot = q.credits.entry((id, stream as u8)).or_insert(0);
        *slot = slot.saturating_add(n as u64);
        if first {
            q.items.push_back(Item::Credits);
            self.shared.work.notify_one();
        }
    }

    /// Frames (and credit frames) queued and not yet handed to the socket; for tests.
    pub fn queued(&self) -> (usize, usize) {
        let q = self.shared.lock();
        (q.bytes, q.credits.len())
    }

    /// Waits (up to `timeout`) until everything queued before this call was written to the
    /// socket. False if that did not happen.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        {
            let mut q = self.shared.lock();
            if q.closed {
                return false;
            }
            q.items.push_back(Item::Barrier(tx));
            self.shared.work.notify_one();
        }
        rx.recv_timeout(timeout).is_ok()
    }
}

/// The credit frames for what `credits` holds; amounts over `u32::MAX` take several frames.
fn credit_frames(credits: BTreeMap<(u64, u8), u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for ((id, stream), mut n) in credits {
        let stream = Stream::ALL[usize::from(stream) % Stream::ALL.len()];
        while n > 0 {
            let part = u32::try_from(n).unwrap_or(u32::MAX);
            out.extend_from_slice(&Message::Credit(id, stream, part).encode());
            n -= u64::from(part);
        }
    }
    out
}

fn write_loop(shared: &Shared) {
    let mut w = BufWriter::with_capacity(128 * 1024, &shared.socket);
    loop {
        // Take everything queued in one go, so it is written in one flush.
        let batch: Vec<Item> = {
            let mut q = shared.lock();
            while q.items.is_empty() && !q.finishing && !q.closed {
                q.progress = Instant::now();
                q = shared.work.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.closed || (q.items.is_empty() && q.finishing) {
                return;
            }
            q.items.drain(..).collect()
        };
        let mut written = 0;
        let mut result = Ok(());
        for item in batch {
            result = match item {
                Item::Frame(bytes) => {
                    written += bytes.len();
                    w.write_all(&bytes)
                }
                Item::Credits => {
                    let credits = std::mem::take(&mut shared.lock().credits);
                    w.write_all(&credit_frames(credits))
                }
                Item::Barrier(done) => w.flush().map(|()| {
                    let _ = done.send(());
                }),
            };
            if result.is_err() {
                break;
            }
        }
        let result = result.and_then(|()| w.flush());
        let mut q = shared.lock();
        if result.is_err() {
            shared.close(&mut q);
            return;
        }
        q.bytes = q.bytes.saturating_sub(written);
        q.progress = Instant::now();
        shared.room.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::read_frame;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Socket, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Socket::from_fd(a.into()), b)
    }

    #[test]
    fn credits_for_one_stream_coalesce_while_the_peer_does_not_read() {
        let (a, mut b) = pair();
        let out = Outbox::start(a, "t").unwrap();
        // Fill the socket so the writer is stuck and everything after stays queued.
        let big = vec![0u8; 64 * 1024];
        for _ in 0..15 {
            assert!(out.send(&Message::Data(1, Stream::Stdin, big.clone())));
        }
        for _ in 0..100_000 {
            out.credit(7, Stream::Stdout, 1);
        }
        out.credit(7, Stream::Stderr, 5);
        let (_, pending_credits) = out.queued();
        assert_eq!(pending_credits, 2, "one pending credit per stream");
        // Now read everything: the credits arrive summed.
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = BTreeMap::new();
        while got.len() < 2 {
            let f = read_frame(&mut b).unwrap().unwrap();
            if let Ok(Message::Credit(id, s, n)) = Message::decode(f) {
                *got.entry((id, s as u8)).or_insert(0u64) += u64::from(n);
            }
        }
        assert_eq!(got[&(7, Stream::Stdout as u8)], 100_000);
        assert_eq!(got[&(7, Stream::Stderr as u8)], 5);
    }

    #[test]
    fn senders_wait_for_room_and_a_stalled_peer_closes_the_connection() {
        let (a, _b) = pair();
        let out = Outbox::start_with(a, "t", 256 * 1024, Duration::from_millis(300)).unwrap();
        let chunk = Message::Data(1, Stream::Stdin, vec![1; 60 * 1024]).encode();
        let start = Instant::now();
        let mut sent = 0usize;
        while out.send_bytes(chunk.clone()) {
            sent += chunk.len();
            assert!(sent < 64 << 20, "the queue grew without bound");
        }
        assert!(start.elapsed() >= Duration::from_millis(300));
        let (queued, _) = out.queued();
        assert_eq!(queued, 0, "a closed outbox holds nothing");
        assert!(!out.send_control(&Message::Eof(1, Stream::Stdin)));
    }

    #[test]
    fn large_credits_are_split_into_u32_frames() {
        let mut c = BTreeMap::new();
        c.insert((3, Stream::File as u8), u64::from(u32::MAX) + 10);
        let bytes = credit_frames(c);
        let mut r = &bytes[..];
        let mut total = 0u64;
        while let Some(f) = read_frame(&mut r).unwrap() {
            match Message::decode(f).unwrap() {
                Message::Credit(3, Stream::File, n) => total += u64::from(n),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(total, u64::from(u32::MAX) + 10);
    }
}
