//! One API connection as a state machine over a non-blocking stream: it reads and parses requests,
//! holds at most one of them for the handler, buffers the answers the client has not read yet,
//! and says what it waits for (readable, writable, the handler) and until when.
//!
//! Nothing here blocks, owns a thread or looks at the clock: the loop passes `now` in, so the
//! deadlines are tested with made-up instants. The stream is any `Read + Write` (a socket in the
//! server, a scripted mock in the tests).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::Limits;
use crate::echo::clip;
use crate::http::{AnswerHeaders, CONTINUE, HttpError, Parsed, RequestReader, encode_response};
use crate::requests::deprecated_fields;
use crate::{ApiRequest, ApiResponse, parse_request};

/// Reads from one connection per readable event, at most: a client that sends fast does not
/// keep the loop from the others (the event comes again while bytes are left).
const READS_PER_EVENT: usize = 16;

/// Where a connection's request is on its way through the handler.
#[derive(Debug)]
enum Handler {
    /// No request: the connection reads.
    Free,
    /// A parsed request waits for its turn (requests reach the handler one at a time, in the
    /// order they were parsed), with the headers its answer will carry.
    Queued(ApiRequest, AnswerHeaders),
    /// The handler has the request; its answer will carry these headers.
    Busy(AnswerHeaders),
}

/// Why a connection's time ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// A request started arriving and did not complete within the read timeout.
    Read,
    /// Nothing was asked on a keep-alive connection for the idle timeout.
    Idle,
    /// The client did not read its answers for the write timeout.
    Write,
}

/// What the loop should watch a connection for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Interest {
    /// Bytes from the client are wanted.
    pub read: bool,
    /// Answers wait to be written.
    pub write: bool,
}

/// One client connection.
#[derive(Debug)]
pub(crate) struct Conn<S> {
    stream: S,
    reader: RequestReader,
    handler: Handler,
    /// Bytes of answers not yet written; `out_pos` of them are.
    out: Vec<u8>,
    out_pos: usize,
    /// Bytes ever queued and ever written, to tell when a counted answer is out.
    queued_total: u64,
    written_total: u64,
    /// Where each handler answer still in `out` ends (in `queued_total` terms).
    counted_ends: VecDeque<u64>,
    /// The client will send nothing more (end of stream), or the stream failed.
    read_closed: bool,
    /// Close once `out` is written: the last answer said `Connection: close`.
    close_after_write: bool,
    /// Writing failed: nothing more can reach the client.
    broken: bool,
    /// Since when a request has been arriving (bytes buffered, reading not paused).
    partial_since: Option<Instant>,
    /// Last time anything was read or written or answered.
    last_activity: Instant,
    /// Last time writing made progress, or `out` became non-empty.
    last_write: Instant,
}

/// What a connection that may give up its slot is doing with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holding {
    /// Nothing: idle after an answer, or silent since it connected.
    Idle,
    /// A request that has started arriving and is not complete.
    Partial,
}

impl<S: Read + Write> Conn<S> {
    /// A connection accepted at `now`, taking request bodies of at most `max_payload` bytes.
    pub(crate) fn new(stream: S, now: Instant, max_payload: usize) -> Self {
        Self {
            stream,
            reader: RequestReader::with_max_payload(max_payload),
            handler: Handler::Free,
            out: Vec::new(),
            out_pos: 0,
            queued_total: 0,
            written_total: 0,
            counted_ends: VecDeque::new(),
            read_closed: false,
            close_after_write: false,
            broken: false,
            partial_since: None,
            last_activity: now,
            last_write: now,
        }
    }

    /// The stream (for its descriptor).
    pub(crate) fn stream(&self) -> &S {
        &self.stream
    }

    /// The stream, to script it in tests.
    #[cfg(test)]
    pub(crate) fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    fn unsent(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// True while the connection wants bytes from its client.
    fn reading(&self, limits: &Limits) -> bool {
        matches!(self.handler, Handler::Free)
            && !self.read_closed
            && !self.close_after_write
            && !self.broken
            && self.unsent() < limits.max_unsent
    }

    /// Reads and parses what the client sent, until a request is ready for the handler, the
    /// stream has nothing more for now, or the connection must stop reading. Malformed requests
    /// and bodies are answered here (400) without reaching the handler. Returns true if a
    /// request was queued for the handler.
    pub(crate) fn pump(&mut self, now: Instant, limits: &Limits) -> bool {
        let mut reads = 0;
        while self.reading(limits) {
            match self.reader.parse() {
                Ok(Parsed::Request(request)) => {
                    if self.take(request) {
                        self.settle(now, limits);
                        return true;
                    }
                    continue;
                }
                Ok(Parsed::Incomplete { send_continue }) => {
                    if send_continue {
                        self.queue(CONTINUE, false);
                    }
                }
                Err(e) => {
                    self.refuse(e);
                    break;
                }
            }
            if reads == READS_PER_EVENT {
                break;
            }
            reads += 1;
            match self.reader.fill(&mut self.stream) {
                Ok(0) => {
                    self.read_closed = true;
                    if !self.reader.is_empty() {
                        self.refuse(HttpError::Truncated);
                    }
                }
                Ok(_) => {
                    self.last_activity = now;
                    self.partial_since.get_or_insert(now);
                }
                Err(HttpError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("API connection read failed: {e}");
                    self.read_closed = true;
                    self.broken = true;
                }
            }
        }
        self.settle(now, limits);
        false
    }

    /// Turns a complete HTTP request into a queued [`ApiRequest`] (true), or answers it 400.
    fn take(&mut self, request: crate::http::HttpRequest) -> bool {
        match parse_request(&request.method, &request.target, &request.body) {
            Ok(api_request) => {
                let deprecated = deprecated_fields(&request.target, &request.body);
                if !deprecated.is_empty() {
                    log::warn!(
                        "API request {} {} uses deprecated {}",
                        request.method,
                        clip(&request.target),
                        deprecated.join(", ")
                    );
                }
                let headers = AnswerHeaders {
                    keep_alive: request.keep_alive,
                    deprecated: !deprecated.is_empty(),
                };
                self.handler = Handler::Queued(api_request, headers);
                true
            }
            Err(e) => {
                log::debug!(
                    "API request {} {} refused: {}",
                    clip(&request.method),
                    clip(&request.target),
                    clip(&e.to_string())
                );
                let headers = AnswerHeaders::keep_alive(request.keep_alive);
                self.answer_bytes(&ApiResponse::from(e), headers, false);
                false
            }
        }
    }

    /// Answers a request that could not be read with 400 and closes after it: where the next
    /// request starts is no longer known.
    fn refuse(&mut self, e: HttpError) {
        log::debug!("API connection: {}", clip(&e.to_string()));
        self.answer_bytes(
            &ApiResponse::fault(e),
            AnswerHeaders::keep_alive(false),
            false,
        );
    }

    fn answer_bytes(&mut self, response: &ApiResponse, headers: AnswerHeaders, counted: bool) {
        self.queue(&encode_response(response, headers), counted);
        if !headers.keep_alive {
            self.close_after_write = true;
        }
    }

    fn queue(&mut self, bytes: &[u8], counted: bool) {
        if self.unsent() == 0 {
            self.out.clear();
            self.out_pos = 0;
        }
        self.out.extend_from_slice(bytes);
        self.queued_total += bytes.len() as u64;
        if counted {
            self.counted_ends.push_back(self.queued_total);
        }
    }

    /// The request waiting for the handler, if any; the connection then waits for its answer.
    pub(crate) fn take_request(&mut self) -> Option<ApiRequest> {
        match std::mem::replace(&mut self.handler, Handler::Free) {
            Handler::Queued(request, headers) => {
                self.handler = Handler::Busy(headers);
                Some(request)
            }
            other => {
                self.handler = other;
                None
            }
        }
    }

    /// Queues the handler's answer (counted: see [`Conn::flush`]) and goes back to reading.
    pub(crate) fn answer(&mut self, response: &ApiResponse, now: Instant) {
        let headers = match self.handler {
            Handler::Busy(headers) => headers,
            _ => AnswerHeaders::keep_alive(false),
        };
        self.handler = Handler::Free;
        self.answer_bytes(response, headers, true);
        self.last_activity = now;
    }

    /// Writes what the client will take; returns how many handler answers were completely
    /// written by this call. A failed write marks the connection broken.
    pub(crate) fn flush(&mut self, now: Instant) -> usize {
        while self.unsent() > 0 && !self.broken {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => self.broken = true,
                Ok(n) => {
                    self.out_pos += n;
                    self.written_total += n as u64;
                    self.last_write = now;
                    self.last_activity = now;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("API connection write failed: {e}");
                    self.broken = true;
                }
            }
        }
        if self.unsent() == 0 {
            // Drop the memory of a large answer once it is out.
            self.out = Vec::new();
            self.out_pos = 0;
        }
        let before = self.counted_ends.len();
        while self
            .counted_ends
            .front()
            .is_some_and(|&end| end <= self.written_total)
        {
            self.counted_ends.pop_front();
        }
        before - self.counted_ends.len()
    }

    /// Handler answers queued but never written (counted in `Unwritten`): when the connection is
    /// dropped, they never will be.
    pub(crate) fn unwritten_answers(&self) -> usize {
        self.counted_ends.len()
    }

    /// True while the handler has (or will get) this connection's request.
    pub(crate) fn waits_for_handler(&self) -> bool {
        !matches!(self.handler, Handler::Free)
    }

    /// Updates the read clock after a change: it runs while a request is partly buffered and
    /// the connection reads, and restarts when reading resumes (after an answer, or once the
    /// client read enough of its answers).
    pub(crate) fn settle(&mut self, now: Instant, limits: &Limits) {
        if self.reading(limits) && !self.reader.is_empty() {
            self.partial_since.get_or_insert(now);
        } else {
            self.partial_since = None;
        }
        if self.unsent() == 0 {
            self.last_write = now;
        }
    }

    /// What to watch the stream for.
    pub(crate) fn interest(&self, limits: &Limits) -> Interest {
        Interest {
            read: self.reading(limits),
            write: self.unsent() > 0 && !self.broken,
        }
    }

    /// True when the connection has nothing left to do: it can be closed now.
    pub(crate) fn finished(&self) -> bool {
        if self.waits_for_handler() {
            return false;
        }
        let written = self.unsent() == 0;
        self.broken || (written && (self.close_after_write || self.read_closed))
    }

    /// When this connection's time runs out, and why; `None` while the handler has its request
    /// (the VMM's work, a snapshot say, takes what it takes).
    pub(crate) fn deadline(&self, limits: &Limits) -> Option<(Instant, Expiry)> {
        if self.waits_for_handler() {
            return None;
        }
        if self.unsent() > 0 {
            return Some((self.last_write + limits.write_timeout, Expiry::Write));
        }
        if let Some(since) = self.partial_since {
            return Some((since + limits.read_timeout, Expiry::Read));
        }
        Some((self.last_activity + limits.idle_timeout, Expiry::Idle))
    }

    /// Says why the connection is being closed, to a client that may still read it: for a
    /// request that took too long to arrive, a 400 written once, without waiting.
    pub(crate) fn expire(&mut self, why: Expiry, limits: &Limits, now: Instant) -> usize {
        if why == Expiry::Read {
            let message = format!(
                "request not complete within {}; closing the connection",
                seconds(limits.read_timeout)
            );
            self.answer_bytes(
                &ApiResponse::fault(message),
                AnswerHeaders::keep_alive(false),
                false,
            );
            return self.flush(now);
        }
        0
    }

    /// Whether the connection may give up its slot to a new client, and since when it has held
    /// it that way: idle (since its last activity) or with a request still arriving (since that
    /// began); `None` while the handler has its request or answers are being written, or while
    /// reading is paused with bytes buffered (the write deadline applies then).
    pub(crate) fn holding(&self) -> Option<(Holding, Instant)> {
        if self.waits_for_handler() || self.unsent() > 0 {
            return None;
        }
        match self.partial_since {
            Some(since) => Some((Holding::Partial, since)),
            None if self.reader.is_empty() => Some((Holding::Idle, self.last_activity)),
            None => None,
        }
    }
}

/// `d` as the API's messages write durations.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}
