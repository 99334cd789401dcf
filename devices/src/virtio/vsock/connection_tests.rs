//! The connection state machine over a real socket pair: REQUEST, RESPONSE, data both ways,
//! SHUTDOWN and RST; credit accounting in both directions; timeouts; a host that closes.

use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

use super::*;
use crate::virtio::vsock::test_utils::{Hdr, PktBuf};

const LOCAL: u32 = 1 << 30;
const PEER: u32 = 1234;

fn pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (a, b)
}

fn guest(op: u16) -> Hdr {
    Hdr::guest(op, PEER, LOCAL)
}

fn recv(c: &mut Connection, h: Hdr, data: &[u8], now: Instant) -> Verdict {
    c.recv(&PktBuf::tx(h, data).packet(), now)
}

/// Fills one rx buffer of `room` bytes; the header and payload if a packet came out.
fn fill(c: &mut Connection, room: usize, now: Instant) -> Option<(Header, Vec<u8>)> {
    let mut buf = PktBuf::rx(room);
    match c.fill_rx(&buf.packet(), room, now) {
        Fill::Packet(h) => Some((h, buf.payload(h.len))),
        Fill::Nothing => None,
        Fill::Reset => panic!("unexpected reset"),
    }
}

fn read_all(s: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return out,
            Err(e) => panic!("{e}"),
        }
    }
}

/// An established host-initiated connection and the host process's end of it.
fn established(now: Instant) -> (Connection, UnixStream) {
    let (dev, mut host) = pair();
    let mut c = Connection::local_init(dev, LOCAL, PEER, now);
    assert_eq!(fill(&mut c, 4096, now).unwrap().0.op, op::REQUEST);
    assert_eq!(recv(&mut c, guest(op::RESPONSE), &[], now), Verdict::Keep);
    assert_eq!(read_all(&mut host), format!("OK {LOCAL}\n").into_bytes());
    (c, host)
}

#[test]
fn host_initiated_request_response_data_shutdown() {
    let now = Instant::now();
    let (dev, mut host) = pair();
    let mut c = Connection::local_init(dev, LOCAL, PEER, now);
    assert_eq!(c.state(), State::LocalInit);
    assert!(c.wants_rx());
    let (h, _) = fill(&mut c, 4096, now).unwrap();
    let want = Header {
        src_port: LOCAL,
        dst_port: PEER,
        op: op::REQUEST,
        buf_alloc: CONN_BUF_SIZE,
        ..Default::default()
    };
    assert_eq!(h, want);
    // Sent once; nothing more until the guest answers, and no host bytes are read meanwhile.
    assert!(!c.wants_rx() && fill(&mut c, 4096, now).is_none());
    assert_eq!(c.interest(), Some(EventSet::empty()));

    assert_eq!(recv(&mut c, guest(op::RESPONSE), &[], now), Verdict::Keep);
    assert_eq!(c.state(), State::Established);
    assert_eq!(c.expiry(), None);
    assert_eq!(read_all(&mut host), format!("OK {LOCAL}\n").into_bytes());

    // Guest to host.
    assert_eq!(recv(&mut c, guest(op::RW), b"hello", now), Verdict::Keep);
    assert_eq!(read_all(&mut host), b"hello");
    assert_eq!(c.fwd_cnt(), 5);

    // Host to guest.
    assert_eq!(c.interest(), Some(EventSet::IN));
    host.write_all(b"world").unwrap();
    c.on_readable();
    let (h, data) = fill(&mut c, 4096, now).unwrap();
    assert_eq!(
        (h.op, h.len, h.fwd_cnt, data.as_slice()),
        (op::RW, 5, 5, &b"world"[..])
    );
    assert!(fill(&mut c, 4096, now).is_none(), "drained to WouldBlock");
    assert!(!c.wants_rx());

    // The guest stops sending: the host reads end-of-file, and may still write.
    assert_eq!(
        recv(
            &mut c,
            Hdr {
                flags: shutdown::SEND,
                ..guest(op::SHUTDOWN)
            },
            &[],
            now
        ),
        Verdict::Keep
    );
    assert_eq!(host.read(&mut [0u8; 8]).unwrap(), 0);
    host.write_all(b"late").unwrap();
    c.on_readable();
    assert_eq!(fill(&mut c, 4096, now).unwrap().1, b"late");
    // Data after SHUTDOWN(SEND) is a protocol violation.
    assert_eq!(
        recv(&mut c, guest(op::RW), b"x", now),
        Verdict::Violation(Misbehaviour::BadOp)
    );
    // Closing: SHUTDOWN with both flags gets the RST the guest waits for.
    assert_eq!(
        recv(
            &mut c,
            Hdr {
                flags: shutdown::BOTH,
                ..guest(op::SHUTDOWN)
            },
            &[],
            now
        ),
        Verdict::Reset
    );
}

#[test]
fn guest_initiated_gets_response_then_data() {
    let now = Instant::now();
    let (dev, mut host) = pair();
    let mut req = PktBuf::tx(
        Hdr {
            buf_alloc: 100,
            fwd_cnt: 0,
            ..guest(op::REQUEST)
        },
        &[],
    );
    let mut c = Connection::peer_init(dev, LOCAL, PEER, &req.packet());
    assert_eq!(
        c.interest(),
        Some(EventSet::empty()),
        "no host data before the RESPONSE"
    );
    host.write_all(b"early").unwrap();
    c.on_readable();
    let (h, data) = fill(&mut c, 4096, now).unwrap();
    assert_eq!((h.op, data.len()), (op::RESPONSE, 0));
    assert_eq!(c.state(), State::Established);
    assert_eq!(fill(&mut c, 4096, now).unwrap().1, b"early");
    assert_eq!(c.peer_credit(), 95);
}

#[test]
fn rst_closes_quietly_in_every_state() {
    let now = Instant::now();
    let (dev, _host) = pair();
    let mut c = Connection::local_init(dev, LOCAL, PEER, now);
    assert_eq!(recv(&mut c, guest(op::RST), &[], now), Verdict::Close);
    let (mut c, _host) = established(now);
    assert_eq!(recv(&mut c, guest(op::RST), &[], now), Verdict::Close);
}

#[test]
fn bad_ops_are_violations() {
    let now = Instant::now();
    let (dev, _host) = pair();
    let mut c = Connection::local_init(dev, LOCAL, PEER, now);
    assert_eq!(
        recv(&mut c, guest(op::RW), b"x", now),
        Verdict::Violation(Misbehaviour::BadOp)
    );
    let (mut c, _host) = established(now);
    for bad in [op::REQUEST, op::RESPONSE, 0, 99] {
        assert_eq!(
            recv(&mut c, guest(bad), &[], now),
            Verdict::Violation(Misbehaviour::BadOp),
            "op {bad}"
        );
    }
}

#[test]
fn never_sends_more_than_peer_credit() {
    let now = Instant::now();
    let (mut c, mut host) = established(now);
    // The guest has a 1000-byte buffer and consumed nothing yet.
    assert_eq!(
        recv(
            &mut c,
            Hdr {
                buf_alloc: 1000,
                ..guest(op::CREDIT_UPDATE)
            },
            &[],
            now
        ),
        Verdict::Keep
    );
    host.write_all(&[7u8; 5000]).unwrap();
    c.on_readable();
    let mut got = 0;
    while let Some((h, data)) = fill(&mut c, 300, now) {
        assert_eq!(h.op, op::RW);
        assert!(data.len() <= 300);
        got += data.len();
    }
    assert_eq!(got, 1000, "exactly the credit");
    assert_eq!(c.peer_credit(), 0);
    assert_eq!(
        c.interest(),
        Some(EventSet::empty()),
        "the host socket is left unread"
    );
    // The guest consumed 600 bytes: that much more may go.
    assert_eq!(
        recv(
            &mut c,
            Hdr {
                buf_alloc: 1000,
                fwd_cnt: 600,
                ..guest(op::CREDIT_UPDATE)
            },
            &[],
            now
        ),
        Verdict::Keep
    );
    assert!(c.wants_rx());
    let (_, data) = fill(&mut c, 4096, now).unwrap();
    assert_eq!(data.len(), 600);
    assert_eq!(c.sent_cnt(), 1600);
    // A guest claiming to have consumed more than it got gets no credit out of it.
    assert_eq!(
        recv(
            &mut c,
            Hdr {
                buf_alloc: 1000,
                fwd_cnt: 5000,
                ..guest(op::CREDIT_UPDATE)
            },
            &[],
            now
        ),
        Verdict::Keep
    );
    assert_eq!(c.peer_credit(), 0);
}

#[test]
fn credit_update_after_consumption_and_on_request() {
    let now = Instant::now();
    let (mut c, mut host) = established(now);
    let chunk = vec![1u8; 16 * 1024];
    for _ in 0..3 {
        recv(&mut c, guest(op::RW), &chunk, now);
    }
    assert!(
        !c.wants_rx(),
        "48 KiB consumed: below the threshold, no update yet"
    );
    recv(&mut c, guest(op::RW), &chunk, now);
    assert!(c.wants_rx());
    let (h, _) = fill(&mut c, 4096, now).unwrap();
    assert_eq!(
        (h.op, h.fwd_cnt, h.buf_alloc),
        (op::CREDIT_UPDATE, 64 * 1024, CONN_BUF_SIZE)
    );
    assert!(!c.wants_rx());
    assert_eq!(read_all(&mut host).len(), 64 * 1024);
    // Asked explicitly.
    recv(&mut c, guest(op::CREDIT_REQUEST), &[], now);
    let (h, _) = fill(&mut c, 4096, now).unwrap();
    assert_eq!((h.op, h.fwd_cnt), (op::CREDIT_UPDATE, 64 * 1024));
}

#[test]
fn slow_host_reader_bounds_the_buffer_and_overrun_resets() {
    let now = Instant::now();
    let (mut c, mut host) = established(now);
    let chunk = vec![9u8; 4096];
    let mut sent = 0u32;
    // A guest that respects credit: it may have CONN_BUF_SIZE bytes unacknowledged.
    let mut told_fwd = 0u32;
    loop {
        if sent - told_fwd + chunk.len() as u32 > CONN_BUF_SIZE {
            // Out of credit; take any update the device has.
            match fill(&mut c, 4096, now) {
                Some((h, _)) => told_fwd = h.fwd_cnt,
                None => break,
            }
            continue;
        }
        assert_eq!(recv(&mut c, guest(op::RW), &chunk, now), Verdict::Keep);
        sent += chunk.len() as u32;
        assert!(c.buffered() <= CONN_BUF_SIZE as usize);
    }
    // The kernel buffer is full and the device holds what the credit allows, no more.
    assert!(c.buffered() > 0 && c.buffered() <= CONN_BUF_SIZE as usize);
    assert!(c.interest().unwrap().contains(EventSet::OUT));
    // A guest ignoring credit is reset rather than buffered.
    let mut verdict = Verdict::Keep;
    for _ in 0..(CONN_BUF_SIZE as usize / chunk.len() + 1) {
        verdict = recv(&mut c, guest(op::RW), &chunk, now);
        assert!(c.buffered() <= CONN_BUF_SIZE as usize);
        if verdict != Verdict::Keep {
            break;
        }
    }
    assert_eq!(verdict, Verdict::Violation(Misbehaviour::CreditOverrun));
    // What the device accepted all reaches the host once it reads.
    let mut total = read_all(&mut host).len();
    while c.buffered() > 0 {
        assert_eq!(c.on_writable(now), Verdict::Keep);
        total += read_all(&mut host).len();
    }
    assert_eq!(total as u32, c.fwd_cnt());
}

#[test]
fn pending_request_times_out() {
    let now = Instant::now();
    let (dev, _host) = pair();
    let mut c = Connection::local_init(dev, LOCAL, PEER, now);
    assert_eq!(
        c.on_timer(now + CONNECT_TIMEOUT - Duration::from_millis(1)),
        Verdict::Keep
    );
    assert_eq!(c.on_timer(now + CONNECT_TIMEOUT), Verdict::Reset);
}

#[test]
fn host_close_drains_then_shuts_down_both_ways() {
    let now = Instant::now();
    let (mut c, mut host) = established(now);
    host.write_all(b"bye").unwrap();
    drop(host);
    assert_eq!(c.on_hup(), Verdict::Keep);
    assert_eq!(c.interest(), None, "no longer watched; read without epoll");
    assert!(c.wants_rx());
    assert_eq!(fill(&mut c, 4096, now).unwrap().1, b"bye");
    let (h, _) = fill(&mut c, 4096, now).unwrap();
    assert_eq!((h.op, h.flags), (op::SHUTDOWN, shutdown::BOTH));
    assert_eq!(
        c.expiry(),
        Some(now + SHUTDOWN_TIMEOUT),
        "the guest has a while to send its RST"
    );
    assert_eq!(c.on_timer(now + SHUTDOWN_TIMEOUT), Verdict::Reset);
}

#[test]
fn host_half_close_sends_shutdown_send() {
    let now = Instant::now();
    let (mut c, host) = established(now);
    host.shutdown(std::net::Shutdown::Write).unwrap();
    c.on_readable();
    let (h, _) = fill(&mut c, 4096, now).unwrap();
    assert_eq!((h.op, h.flags), (op::SHUTDOWN, shutdown::SEND));
    // The guest can still send to the host.
    assert_eq!(recv(&mut c, guest(op::RW), b"more", now), Verdict::Keep);
    assert_eq!(read_all(&mut { host }), b"more");
}

#[test]
fn guest_shutdown_rcv_stops_reading_the_host() {
    let now = Instant::now();
    let (mut c, mut host) = established(now);
    recv(
        &mut c,
        Hdr {
            flags: shutdown::RCV,
            ..guest(op::SHUTDOWN)
        },
        &[],
        now,
    );
    assert_eq!(c.interest(), Some(EventSet::empty()));
    c.on_readable();
    assert!(fill(&mut c, 4096, now).is_none());
    // The host's writes fail instead of piling up.
    assert!(host.write_all(b"x").is_err());
}

#[test]
fn guest_close_with_unflushed_data_waits_then_resets() {
    let now = Instant::now();
    let (mut c, mut host) = established(now);
    let chunk = vec![3u8; 64 * 1024];
    while c.buffered() == 0 {
        recv(&mut c, guest(op::RW), &chunk, now);
    }
    let close = Hdr {
        flags: shutdown::BOTH,
        ..guest(op::SHUTDOWN)
    };
    assert_eq!(recv(&mut c, close, &[], now), Verdict::Keep, "flush first");
    assert_eq!(c.expiry(), Some(now + SHUTDOWN_TIMEOUT));
    let mut verdict = Verdict::Keep;
    while verdict == Verdict::Keep {
        read_all(&mut host);
        verdict = c.on_writable(now);
    }
    assert_eq!(verdict, Verdict::Reset, "flushed: now the RST");
}

#[test]
fn host_gone_with_data_pending_resets() {
    let now = Instant::now();
    let (mut c, host) = established(now);
    let chunk = vec![3u8; 64 * 1024];
    while c.buffered() == 0 {
        recv(&mut c, guest(op::RW), &chunk, now);
    }
    drop(host);
    assert_eq!(c.on_hup(), Verdict::Reset);
}

#[test]
fn header_only_rx_buffer_carries_a_credit_update() {
    let now = Instant::now();
    let (mut c, mut host) = established(now);
    host.write_all(b"data").unwrap();
    c.on_readable();
    let (h, data) = fill(&mut c, 0, now).unwrap();
    assert_eq!((h.op, data.len()), (op::CREDIT_UPDATE, 0));
    assert_eq!(fill(&mut c, 16, now).unwrap().1, b"data");
}
