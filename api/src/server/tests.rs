//! The server's connection state machine and connection table, driven by scripted streams and
//! made-up instants: deadlines, the cap and who gives up a slot, half-closed and non-reading
//! clients, all without sockets or sleeping.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::Limits;
use super::conn::{Conn, Expiry, Interest};
use super::table::Table;
use crate::{ApiRequest, ApiResponse};

/// A client as a script: chunks it sends (`None` is "nothing more for now"), whether it closes
/// after them, and how many bytes of answers it will read.
#[derive(Debug, Default)]
struct Script {
    input: VecDeque<Option<Vec<u8>>>,
    eof: bool,
    room: usize,
    out: Vec<u8>,
}

impl Script {
    fn new() -> Self {
        Self {
            room: usize::MAX,
            ..Self::default()
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.input.push_back(Some(bytes.to_vec()));
        self.input.push_back(None);
    }

    fn out(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.input.pop_front() {
            Some(Some(mut chunk)) => {
                let n = chunk.len().min(buf.len());
                buf[..n].copy_from_slice(&chunk[..n]);
                if n < chunk.len() {
                    self.input.push_front(Some(chunk.split_off(n)));
                }
                Ok(n)
            }
            Some(None) => Err(io::ErrorKind::WouldBlock.into()),
            None if self.eof => Ok(0),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.room);
        self.room -= n;
        self.out.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn limits() -> Limits {
    Limits::default()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A connection at `t0` whose client sends `chunks`, each followed by a pause.
fn conn(t0: Instant, chunks: &[&[u8]]) -> Conn<Script> {
    let mut s = Script::new();
    for c in chunks {
        s.send(c);
    }
    Conn::new(s, t0, crate::http::DEFAULT_MAX_PAYLOAD)
}

/// Pumps until a request is queued or `tries` pumps found none.
fn pump_until_request(c: &mut Conn<Script>, now: Instant, tries: usize) -> bool {
    (0..tries).any(|_| c.pump(now, &limits()))
}

#[test]
fn a_request_in_pieces_is_parsed_once_whole_and_answered() {
    let t0 = Instant::now();
    let mut c = conn(t0, &[b"GET / HT", b"TP/1.1\r\nHost: x\r\n\r\n"]);
    assert!(!c.pump(t0, &limits()), "half a request is not a request");
    assert_eq!(
        c.deadline(&limits()),
        Some((t0 + secs(10), Expiry::Read)),
        "the read clock starts at the first byte"
    );
    let t1 = t0 + secs(3);
    assert!(c.pump(t1, &limits()));
    assert_eq!(c.take_request(), Some(ApiRequest::GetInstanceInfo));
    assert_eq!(c.take_request(), None);
    assert!(c.waits_for_handler());
    assert_eq!(
        c.deadline(&limits()),
        None,
        "no deadline while the VMM works"
    );
    assert_eq!(c.interest(&limits()), Interest::default());

    let t2 = t0 + secs(40);
    c.answer(&ApiResponse::NoContent, t2);
    assert_eq!(c.flush(t2), 1, "one counted answer written");
    c.settle(t2, &limits());
    assert!(c.stream().out().starts_with("HTTP/1.1 204 No Content\r\n"));
    assert!(!c.finished(), "keep-alive");
    assert_eq!(
        c.deadline(&limits()),
        Some((t2 + secs(60), Expiry::Idle)),
        "idle from the answer on, not from the request"
    );
    assert_eq!(
        c.interest(&limits()),
        Interest {
            read: true,
            write: false
        }
    );
}

#[test]
fn a_trickled_request_expires_from_its_first_byte_and_is_told_why() {
    let t0 = Instant::now();
    let mut c = conn(t0, &[b"P", b"U", b"T", b" /"]);
    for i in 0..4 {
        c.pump(t0 + secs(i * 3), &limits());
    }
    assert_eq!(c.deadline(&limits()), Some((t0 + secs(10), Expiry::Read)));
    let written = c.expire(Expiry::Read, &limits(), t0 + secs(10));
    assert_eq!(written, 0, "a refusal is not a handler answer");
    let out = c.stream().out();
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    assert!(out.contains("Connection: close"), "{out}");
    assert!(
        out.contains("request not complete within 10 s; closing the connection"),
        "{out}"
    );
}

#[test]
fn a_client_that_does_not_read_stops_being_read_and_gets_a_write_deadline() {
    let t0 = Instant::now();
    let small = Limits {
        max_unsent: 100,
        ..limits()
    };
    let mut script = Script::new();
    // Ten pipelined requests, and no room at all for answers.
    script.send(&b"GET /nope HTTP/1.1\r\n\r\n".repeat(10));
    script.room = 0;
    let mut c = Conn::new(script, t0, crate::http::DEFAULT_MAX_PAYLOAD);
    assert!(!c.pump(t0, &small), "unknown paths never reach the handler");
    assert!(!c.interest(&small).read, "over max_unsent: reading paused");
    assert!(c.interest(&small).write);
    assert_eq!(c.deadline(&small), Some((t0 + secs(5), Expiry::Write)));
    assert_eq!(
        c.holding(),
        None,
        "being written to: not dropped for others"
    );
    // The client reads a little: the clock restarts from the progress.
    let t1 = t0 + secs(4);
    c.stream_mut().room = 10;
    c.flush(t1);
    assert_eq!(c.deadline(&small), Some((t1 + secs(5), Expiry::Write)));
}

#[test]
fn a_malformed_request_is_refused_and_the_connection_ends_after_the_answer() {
    let t0 = Instant::now();
    let mut c = conn(t0, &[b"GARBAGE\r\n\r\nGET / HTTP/1.1\r\n\r\n"]);
    assert!(!c.pump(t0, &limits()));
    assert!(!c.interest(&limits()).read);
    c.flush(t0);
    assert!(c.finished());
    let out = c.stream().out();
    assert_eq!(out.matches("HTTP/1.1").count(), 1, "{out}");
    assert!(out.contains("malformed request"), "{out}");
}

#[test]
fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    let t0 = Instant::now();
    let mut script = Script::new();
    script
        .input
        .push_back(Some(b"GET / HTTP/1.1\r\n\r\n".to_vec()));
    script.eof = true;
    let mut c = Conn::new(script, t0, crate::http::DEFAULT_MAX_PAYLOAD);
    assert!(c.pump(t0, &limits()));
    assert!(c.take_request().is_some());
    assert!(!c.finished(), "the handler has its request");
    c.answer(&ApiResponse::json(&1), t0);
    assert_eq!(c.flush(t0), 1);
    assert!(!c.finished(), "end of stream not read yet");
    c.pump(t0, &limits());
    assert!(c.finished(), "answered, and the client sends nothing more");
    assert!(c.stream().out().starts_with("HTTP/1.1 200 OK"));
}

#[test]
fn a_request_cut_by_the_end_of_stream_is_refused() {
    let t0 = Instant::now();
    let mut script = Script::new();
    script
        .input
        .push_back(Some(b"PUT /vm HTTP/1.1\r\nContent-Le".to_vec()));
    script.eof = true;
    let mut c = Conn::new(script, t0, crate::http::DEFAULT_MAX_PAYLOAD);
    assert!(!c.pump(t0, &limits()));
    c.flush(t0);
    assert!(c.finished());
    assert!(
        c.stream()
            .out()
            .contains("connection closed in the middle of a request")
    );
}

#[test]
fn pipelined_requests_wait_their_turn_and_expect_continue_is_answered_once() {
    let t0 = Instant::now();
    let patch = b"PATCH /vm HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 19\r\n\r\n";
    let mut c = conn(
        t0,
        &[patch, b"{\"state\": \"Paused\"}GET / HTTP/1.1\r\n\r\n"],
    );
    assert!(!c.pump(t0, &limits()));
    c.flush(t0);
    assert_eq!(c.stream().out(), "HTTP/1.1 100 Continue\r\n\r\n");
    assert!(c.pump(t0, &limits()));
    assert!(matches!(c.take_request(), Some(ApiRequest::PatchVm(_))));
    assert!(
        !c.pump(t0, &limits()),
        "the next request waits for this answer"
    );
    c.answer(&ApiResponse::NoContent, t0);
    assert!(c.pump(t0, &limits()));
    assert_eq!(c.take_request(), Some(ApiRequest::GetInstanceInfo));
    assert_eq!(c.stream().out().matches("100 Continue").count(), 1);
}

#[test]
fn answers_dropped_with_the_connection_are_counted() {
    let t0 = Instant::now();
    let mut c = conn(t0, &[b"GET / HTTP/1.1\r\n\r\n"]);
    assert!(pump_until_request(&mut c, t0, 2));
    c.take_request();
    c.stream_mut().room = 0;
    c.answer(&ApiResponse::NoContent, t0);
    assert_eq!(c.flush(t0), 0);
    assert_eq!(c.unwritten_answers(), 1);
}

/// A table of `n` connections accepted at `t0` whose clients send `chunks[i]`.
fn table(t0: Instant, cap: usize, chunks: &[&[u8]]) -> Table<Script> {
    let mut t = Table::new(cap);
    for c in chunks {
        // An empty chunk would read as the end of the stream: the client says nothing instead.
        let mut conn = if c.is_empty() {
            conn(t0, &[])
        } else {
            conn(t0, &[c])
        };
        conn.pump(t0, &limits());
        t.insert(conn, Interest::default()).unwrap();
    }
    t
}

#[test]
fn the_table_holds_at_most_its_capacity_and_tokens_are_not_reused() {
    let t0 = Instant::now();
    let mut t = table(t0, 2, &[b"", b""]);
    assert!(t.is_full());
    assert!(t.insert(conn(t0, &[]), Interest::default()).is_none());
    let [a, b] = t.tokens()[..] else {
        panic!("two tokens")
    };
    assert_ne!(a, b);
    assert!(t.remove(a).is_some());
    assert_eq!(t.len(), 1);
    let c = t.insert(conn(t0, &[]), Interest::default()).unwrap();
    assert!(t.get_mut(a).is_none(), "the old token names nothing");
    assert!(t.get_mut(c).is_some());
    assert!(t.remove(a).is_none());
    assert_eq!(super::table::Token::from_u64(c.to_u64()), c);
}

#[test]
fn a_full_table_drops_the_longest_idle_connection_once_idle_long_enough_then_a_trickle() {
    let t0 = Instant::now();
    let mut t = table(t0, 3, &[b"GET / HT", b"", b"GET / HTTP/1.1\r\n\r\n"]);
    let [trickle, silent, answered] = t.tokens()[..] else {
        panic!("three tokens")
    };
    let t2 = t0 + secs(2);
    let entry = t.get_mut(answered).unwrap();
    assert!(entry.conn.take_request().is_some());
    entry.conn.answer(&ApiResponse::NoContent, t2);
    entry.conn.flush(t2);
    let now = t2 + Duration::from_millis(10);
    // Silent for 2 s: idle long enough, and idle goes before a trickle.
    assert_eq!(t.eviction_candidate(now, &limits()), Some(silent));
    t.remove(silent);
    // Answered 10 ms ago: its client may be about to ask again. The trickle goes at once.
    assert_eq!(t.eviction_candidate(now, &limits()), Some(trickle));
    t.remove(trickle);
    assert_eq!(t.eviction_candidate(now, &limits()), None);
    assert_eq!(t.next_evictable(&limits()), Some(t2 + limits().evict_after));
    assert_eq!(
        t.eviction_candidate(t2 + limits().evict_after, &limits()),
        Some(answered)
    );
}

#[test]
fn the_oldest_trickle_goes_before_younger_ones_and_busy_connections_never() {
    let t0 = Instant::now();
    let mut t = Table::new(3);
    let mut old = conn(t0, &[b"G"]);
    old.pump(t0, &limits());
    let old = t.insert(old, Interest::default()).unwrap();
    let t1 = t0 + Duration::from_millis(10);
    let mut young = conn(t1, &[b"G"]);
    young.pump(t1, &limits());
    let young = t.insert(young, Interest::default()).unwrap();
    let mut busy = conn(t0, &[b"GET / HTTP/1.1\r\n\r\n"]);
    assert!(busy.pump(t0, &limits()));
    t.insert(busy, Interest::default()).unwrap();
    assert_eq!(t.eviction_candidate(t1, &limits()), Some(old));
    t.remove(old);
    assert_eq!(t.eviction_candidate(t1, &limits()), Some(young));
    t.remove(young);
    assert_eq!(t.eviction_candidate(t0 + secs(100), &limits()), None);
    assert_eq!(t.next_evictable(&limits()), None);
}

#[test]
fn deadlines_come_out_nearest_first_and_expire_on_time() {
    let t0 = Instant::now();
    let t = table(t0, 4, &[b"GET / HT", b"", b"GET / HTTP/1.1\r\n\r\n"]);
    assert_eq!(t.next_deadline(&limits()), Some(t0 + secs(10)));
    assert!(t.expired(t0 + secs(9), &limits()).is_empty());
    let at_10: Vec<Expiry> = t
        .expired(t0 + secs(10), &limits())
        .into_iter()
        .map(|(_, why)| why)
        .collect();
    assert_eq!(at_10, [Expiry::Read]);
    let at_60: Vec<Expiry> = t
        .expired(t0 + secs(60), &limits())
        .into_iter()
        .map(|(_, why)| why)
        .collect();
    assert_eq!(at_60, [Expiry::Read, Expiry::Idle], "the busy one never");
}
