//! The muxer with real Unix sockets in a temporary directory: the host CONNECT handshake (good,
//! malformed, too long, too slow), routing by (local port, peer port), RSTs for unknown
//! connections and refused packets, guest connections to `<uds>_<port>` with and without a
//! listener, connection limits, and the event-loop bookkeeping (sockets leave epoll before they
//! close).

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use super::*;
use crate::virtio::vsock::test_utils::{GUEST_CID, Hdr, PktBuf, TempDir};
use crate::virtio::vsock::{CONN_BUF_SIZE, CONNECT_TIMEOUT, GUEST_CONN_BUF_SIZE, shutdown};

/// The event loop's registrations, checked for consistency.
#[derive(Default)]
struct Recorder {
    watched: HashMap<RawFd, EventSet>,
}

impl Poller for Recorder {
    fn add(&mut self, fd: RawFd, set: EventSet) -> bool {
        assert!(
            self.watched.insert(fd, set).is_none(),
            "fd {fd} added twice"
        );
        true
    }

    fn modify(&mut self, fd: RawFd, set: EventSet) -> bool {
        assert!(
            self.watched.insert(fd, set).is_some(),
            "fd {fd} modified but not watched"
        );
        true
    }

    fn remove(&mut self, fd: RawFd, _set: EventSet) {
        assert!(
            self.watched.remove(&fd).is_some(),
            "fd {fd} removed but not watched"
        );
        assert!(
            std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok(),
            "fd {fd} closed before removal"
        );
    }
}

struct Harness {
    dir: TempDir,
    mux: Muxer,
    poll: Recorder,
    now: Instant,
}

impl Harness {
    fn new() -> Self {
        let dir = TempDir::new();
        let path = dir.0.join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mux = Muxer::new(GUEST_CID, path, listener);
        Self {
            dir,
            mux,
            poll: Recorder::default(),
            now: Instant::now(),
        }
    }

    fn sync(&mut self) {
        self.mux.sync_epoll(&mut self.poll);
    }

    /// A host process connects and writes `line`; returns its end and the device's fd.
    fn host(&mut self, line: &[u8]) -> (UnixStream, RawFd) {
        let before: Vec<RawFd> = self.poll.watched.keys().copied().collect();
        let mut s = UnixStream::connect(self.dir.0.join("v.sock")).unwrap();
        self.mux.accept(self.now);
        self.sync();
        let fd = *self
            .poll
            .watched
            .keys()
            .find(|fd| !before.contains(fd))
            .expect("accepted and watched");
        s.write_all(line).unwrap();
        self.event(fd, EventSet::IN);
        s.set_nonblocking(true).unwrap();
        (s, fd)
    }

    fn event(&mut self, fd: RawFd, set: EventSet) {
        self.mux.on_host_event(fd, set, self.now);
        self.sync();
    }

    fn send(&mut self, h: Hdr, data: &[u8]) {
        self.mux.recv_tx(&PktBuf::tx(h, data).packet(), self.now);
        self.sync();
    }

    fn rx(&mut self) -> Option<(Hdr, Vec<u8>)> {
        let mut buf = PktBuf::rx(4096);
        let len = self.mux.fill_rx(&mut buf.packet(), self.now)?;
        self.sync();
        Some((buf.header(), buf.payload(len)))
    }

    /// A host-initiated connection to guest port `port`, accepted by the guest.
    fn connected(&mut self, port: u32) -> (UnixStream, RawFd, u32) {
        let (mut s, fd) = self.host(format!("CONNECT {port}\n").as_bytes());
        let (req, _) = self.rx().expect("REQUEST");
        assert_eq!(
            (req.op, req.dst_port, req.src_cid, req.dst_cid),
            (op::REQUEST, port, HOST_CID, GUEST_CID)
        );
        self.send(Hdr::guest(op::RESPONSE, port, req.src_port), &[]);
        assert_eq!(
            read_now(&mut s),
            format!("OK {}\n", req.src_port).into_bytes()
        );
        (s, fd, req.src_port)
    }
}

fn read_now(s: &mut UnixStream) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    match s.read(&mut buf) {
        Ok(n) => buf[..n].to_vec(),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Vec::new(),
        Err(e) => panic!("{e}"),
    }
}

fn closed(s: &mut UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    // Closing with unread bytes makes the peer's first read fail with ECONNRESET.
    match s.read(&mut [0u8; 64]) {
        Ok(0) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn connect_line_parsing() {
    assert_eq!(parse_connect(b"CONNECT 52\n"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 0\n"), Some(0));
    assert_eq!(parse_connect(b"CONNECT 4294967295\n"), Some(u32::MAX));
    for bad in [
        &b"CONNECT 4294967296\n"[..],
        b"CONNECT 52",
        b"CONNECT \n",
        b"CONNECT -1\n",
        b"CONNECT +1\n",
        b"CONNECT 5 2\n",
        b"CONNECT 52 \n",
        b"CONNECT 0x10\n",
        b"connect 52\n",
        b"CONNECT\t52\n",
        b"CONNECT 52\r\n",
        b"\xffCONNECT 52\n",
        b"",
    ] {
        assert_eq!(
            parse_connect(bad),
            None,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn host_connect_handshake_then_data_both_ways() {
    let mut h = Harness::new();
    let (mut s, fd, local) = h.connected(52);
    assert_eq!(local, FIRST_HOST_PORT);
    s.write_all(b"from host").unwrap();
    h.event(fd, EventSet::IN);
    let (pkt, data) = h.rx().unwrap();
    assert_eq!(
        (pkt.op, pkt.src_port, pkt.dst_port, data.as_slice()),
        (op::RW, local, 52, &b"from host"[..])
    );
    h.send(Hdr::guest(op::RW, 52, local), b"from guest");
    assert_eq!(read_now(&mut s), b"from guest");
}

#[test]
fn payload_after_the_connect_line_waits_for_the_guest() {
    let mut h = Harness::new();
    let (mut s, fd) = h.host(b"CONNECT 52\nearly bytes");
    let (req, _) = h.rx().unwrap();
    assert!(
        h.rx().is_none(),
        "nothing but the REQUEST before the guest answers"
    );
    h.send(Hdr::guest(op::RESPONSE, 52, req.src_port), &[]);
    assert_eq!(
        read_now(&mut s),
        format!("OK {}\n", req.src_port).into_bytes()
    );
    h.event(fd, EventSet::IN);
    assert_eq!(h.rx().unwrap().1, b"early bytes");
}

#[test]
fn malformed_connect_lines_close_the_socket() {
    let mut h = Harness::new();
    for line in [
        &b"CONNECT abc\n"[..],
        b"CONNECT -1\n",
        b"CONNECT 4294967296\n",
        b"connect 52\n",
        b"HELLO\n",
    ] {
        let (mut s, fd) = h.host(line);
        assert!(closed(&mut s), "{:?}", String::from_utf8_lossy(line));
        assert!(!h.poll.watched.contains_key(&fd));
    }
    assert!(h.rx().is_none());
    assert_eq!((h.mux.handshake_count(), h.mux.connection_count()), (0, 0));
}

#[test]
fn overlong_connect_line_closes_the_socket() {
    let mut h = Harness::new();
    let (mut s, _) = h.host(&[b'7'; CONNECT_LINE_MAX + 8]);
    assert!(closed(&mut s));
    let (mut s, _) = h.host(format!("CONNECT {}\n", "0".repeat(CONNECT_LINE_MAX)).as_bytes());
    assert!(closed(&mut s));
}

#[test]
fn slow_connect_line_times_out() {
    let mut h = Harness::new();
    let (mut s, _) = h.host(b"CONNECT 5");
    assert!(!closed(&mut s), "a partial line waits");
    assert_eq!(h.mux.handshake_count(), 1);
    assert_eq!(h.mux.next_deadline(), Some(h.now + HANDSHAKE_TIMEOUT));
    h.mux.on_timer(h.now + HANDSHAKE_TIMEOUT);
    h.sync();
    assert!(closed(&mut s));
    assert_eq!(h.mux.next_deadline(), None);
}

#[test]
fn host_closing_during_handshake_is_dropped() {
    let mut h = Harness::new();
    let (s, fd) = h.host(b"CONN");
    drop(s);
    h.event(fd, EventSet::IN | EventSet::HANG_UP);
    assert_eq!(h.mux.handshake_count(), 0);
    assert!(h.poll.watched.is_empty() || !h.poll.watched.contains_key(&fd));
}

#[test]
fn guest_rst_answer_closes_the_host_socket() {
    let mut h = Harness::new();
    let (mut s, _) = h.host(b"CONNECT 99\n");
    let (req, _) = h.rx().unwrap();
    h.send(Hdr::guest(op::RST, 99, req.src_port), &[]);
    assert!(closed(&mut s));
    assert!(h.rx().is_none(), "no RST answers an RST");
    assert_eq!(h.mux.connection_count(), 0);
}

#[test]
fn unanswered_request_times_out_with_rst() {
    let mut h = Harness::new();
    let (mut s, _) = h.host(b"CONNECT 99\n");
    let (req, _) = h.rx().unwrap();
    h.mux.on_timer(h.now + CONNECT_TIMEOUT);
    h.sync();
    assert!(closed(&mut s));
    let (rst, _) = h.rx().unwrap();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (op::RST, req.src_port, 99)
    );
}

#[test]
fn routing_by_local_and_peer_port() {
    let mut h = Harness::new();
    let (mut a, _, pa) = h.connected(52);
    let (mut b, _, pb) = h.connected(52);
    assert_ne!(pa, pb, "each host connection gets its own port");
    h.send(Hdr::guest(op::RW, 52, pb), b"to b");
    h.send(Hdr::guest(op::RW, 52, pa), b"to a");
    assert_eq!(read_now(&mut a), b"to a");
    assert_eq!(read_now(&mut b), b"to b");
    // The guest resets one; the other lives on.
    h.send(Hdr::guest(op::RST, 52, pa), &[]);
    assert!(closed(&mut a));
    h.send(Hdr::guest(op::RW, 52, pb), b"still");
    assert_eq!(read_now(&mut b), b"still");
}

#[test]
fn packets_for_unknown_connections_get_rst() {
    let mut h = Harness::new();
    for o in [
        op::RW,
        op::CREDIT_UPDATE,
        op::CREDIT_REQUEST,
        op::SHUTDOWN,
        op::RESPONSE,
    ] {
        h.send(Hdr::guest(o, 4000, 77), b"");
        let (rst, _) = h.rx().unwrap();
        let want = (op::RST, HOST_CID, GUEST_CID, 77, 4000);
        assert_eq!(
            (rst.op, rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port),
            want,
            "op {o}"
        );
    }
    h.send(Hdr::guest(op::RST, 4000, 77), &[]);
    assert!(h.rx().is_none());
}

#[test]
fn refused_addresses() {
    let mut h = Harness::new();
    h.send(
        Hdr {
            src_cid: 5,
            ..Hdr::guest(op::REQUEST, 1, 2)
        },
        &[],
    );
    assert!(h.rx().is_none(), "a spoofed source is not answered");
    h.send(
        Hdr {
            dst_cid: 9,
            ..Hdr::guest(op::REQUEST, 1, 2)
        },
        &[],
    );
    let (rst, _) = h.rx().unwrap();
    assert_eq!(
        (rst.op, rst.src_cid, rst.src_port, rst.dst_port),
        (op::RST, 9, 2, 1),
        "RST from the CID it tried"
    );
    h.send(
        Hdr {
            type_: 2,
            ..Hdr::guest(op::REQUEST, 1, 2)
        },
        &[],
    );
    assert!(h.rx().is_none());
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let mut h = Harness::new();
    h.send(Hdr::guest(op::REQUEST, 3000, 8000), &[]);
    let (rst, _) = h.rx().unwrap();
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (op::RST, 8000, 3000));
    assert_eq!(h.mux.connection_count(), 0);
}

#[test]
fn guest_connect_reaches_the_port_socket() {
    let mut h = Harness::new();
    let path = h.dir.0.join("v.sock_8000");
    assert_eq!(h.mux.host_path(8000), path);
    let listener = UnixListener::bind(&path).unwrap();
    h.send(Hdr::guest(op::REQUEST, 3000, 8000), &[]);
    let (resp, _) = h.rx().unwrap();
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port, resp.buf_alloc),
        (op::RESPONSE, 8000, 3000, GUEST_CONN_BUF_SIZE)
    );
    let (mut s, _) = listener.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    h.send(Hdr::guest(op::RW, 3000, 8000), b"ping");
    assert_eq!(read_now(&mut s), b"ping");
    s.write_all(b"pong").unwrap();
    let fd = h
        .mux
        .connection(ConnKey {
            local_port: 8000,
            peer_port: 3000,
        })
        .unwrap()
        .stream()
        .as_raw_fd();
    assert_eq!(h.poll.watched.get(&fd), Some(&EventSet::IN));
    h.event(fd, EventSet::IN);
    assert_eq!(h.rx().unwrap().1, b"pong");
    // The guest closes: SHUTDOWN both ways gets the RST it waits for, and the host sees EOF.
    h.send(
        Hdr {
            flags: shutdown::BOTH,
            ..Hdr::guest(op::SHUTDOWN, 3000, 8000)
        },
        &[],
    );
    assert_eq!(h.rx().unwrap().0.op, op::RST);
    assert!(closed(&mut s));
    assert!(!h.poll.watched.contains_key(&fd));
}

#[test]
fn listener_that_never_accepts_does_not_block() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.dir.0.join("v.sock_9")).unwrap();
    // SAFETY: listen(2) on a socket this test owns; it only shrinks the backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 1) }, 0);
    // The backlog fills up; further REQUESTs are refused instead of blocking the loop.
    let mut ops = Vec::new();
    for port in 0..8 {
        h.send(Hdr::guest(op::REQUEST, 10_000 + port, 9), &[]);
        ops.push(h.rx().unwrap().0.op);
    }
    assert_eq!(ops[0], op::RESPONSE);
    assert_eq!(ops.last(), Some(&op::RST), "{ops:?}");
    assert!(h.mux.connection_count() < 8);
}

#[test]
fn connection_limit() {
    let mut h = Harness::new();
    h.mux.set_limit(1);
    h.mux.set_guest_limit(1);
    let _l = UnixListener::bind(h.dir.0.join("v.sock_1")).unwrap();
    h.send(Hdr::guest(op::REQUEST, 100, 1), &[]);
    let (_a, _) = h.host(b"CONNECT 5\n");
    assert_eq!(h.mux.connection_count(), 2);
    assert_eq!(h.mux.guest_connection_count(), 1);
    // Full both ways: a guest REQUEST is refused, a host connection is closed at once.
    h.send(Hdr::guest(op::REQUEST, 101, 1), &[]);
    let mut s = UnixStream::connect(h.dir.0.join("v.sock")).unwrap();
    h.mux.accept(h.now);
    h.sync();
    assert!(closed(&mut s));
    let ops: Vec<(u16, u32)> = std::iter::from_fn(|| h.rx())
        .map(|(p, _)| (p.op, p.dst_port))
        .collect();
    assert!(ops.contains(&(op::RST, 101)), "{ops:?}");
    assert_eq!(h.mux.connection_count(), 2);
}

#[test]
fn guest_connections_have_their_own_cap_and_a_smaller_buffer() {
    let mut h = Harness::new();
    h.mux.set_guest_limit(3);
    let _l = UnixListener::bind(h.dir.0.join("v.sock_1")).unwrap();
    for port in 100..110 {
        h.send(Hdr::guest(op::REQUEST, port, 1), &[]);
    }
    let answers: Vec<(u16, u32, u32)> = std::iter::from_fn(|| h.rx())
        .map(|(p, _)| (p.op, p.dst_port, p.buf_alloc))
        .collect();
    let accepted: Vec<_> = answers.iter().filter(|a| a.0 == op::RESPONSE).collect();
    assert_eq!(accepted.len(), 3, "{answers:?}");
    assert!(accepted.iter().all(|a| a.2 == GUEST_CONN_BUF_SIZE));
    assert_eq!(answers.iter().filter(|a| a.0 == op::RST).count(), 7);
    // The guest's connections leave the host's room alone.
    let (_a, _) = h.host(b"CONNECT 5\n");
    assert_eq!(h.mux.connection_count(), 4);
    assert_eq!(h.mux.guest_connection_count(), 3);
    // A guest connection may not hold more than its smaller buffer for a host that never reads.
    let key = ConnKey {
        local_port: 1,
        peer_port: 100,
    };
    assert_eq!(
        h.mux.connection(key).unwrap().buf_size(),
        GUEST_CONN_BUF_SIZE
    );
}

#[test]
fn request_on_a_live_connection_resets_it() {
    let mut h = Harness::new();
    let (mut s, _, local) = h.connected(52);
    h.send(Hdr::guest(op::REQUEST, 52, local), &[]);
    assert_eq!(h.rx().unwrap().0.op, op::RST);
    assert!(closed(&mut s));
}

#[test]
fn credit_overrun_resets_and_logs() {
    let mut h = Harness::new();
    let (_s, _, local) = h.connected(52);
    let chunk = vec![0u8; 64 * 1024];
    // The host never reads: the kernel buffer, then the device's CONN_BUF_SIZE, then RST.
    for _ in 0..16 {
        h.send(Hdr::guest(op::RW, 52, local), &chunk);
        if h.mux.connection_count() == 0 {
            break;
        }
        let c = h
            .mux
            .connection(ConnKey {
                local_port: local,
                peer_port: 52,
            })
            .unwrap();
        assert!(c.buffered() <= CONN_BUF_SIZE as usize);
    }
    assert_eq!(h.mux.connection_count(), 0);
    let ops: Vec<u16> = std::iter::from_fn(|| h.rx()).map(|(p, _)| p.op).collect();
    assert_eq!(ops.last(), Some(&op::RST));
}

#[test]
fn drop_all_closes_everything_after_leaving_epoll() {
    let mut h = Harness::new();
    let (mut a, _, _) = h.connected(52);
    let (mut b, _) = h.host(b"CONN");
    h.mux.drop_all();
    h.sync();
    assert!(closed(&mut a) && closed(&mut b));
    assert!(h.poll.watched.is_empty());
    assert!(!h.mux.has_rx());
}

#[test]
fn deadlines_are_reported() {
    let mut h = Harness::new();
    assert_eq!(h.mux.next_deadline(), None);
    let (_s, _) = h.host(b"CONNECT 1\n");
    assert_eq!(h.mux.next_deadline(), Some(h.now + CONNECT_TIMEOUT));
    h.mux.on_timer(h.now + Duration::from_millis(1));
    assert_eq!(h.mux.connection_count(), 1);
}
