//! The whole device through its queues (`MockSplitQueue`) and a real event manager: creation
//! rules, configuration space, connections both ways end to end, flow control with a slow reader
//! on either side, the transport reset, device reset, and a guest that corrupts its queues.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use virtio_queue::desc::RawDescriptor;
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::device::VirtioDevice;
use crate::virtio::vsock::muxer::ConnKey;
use crate::virtio::vsock::test_utils::{GUEST_CID, Hdr, TempDir, TestGuest};
use crate::virtio::vsock::{
    CONN_BUF_SIZE, GUEST_CONN_BUF_SIZE, TXQ, Vsock, VsockError, op, shutdown,
};
use crate::virtio::{TYPE_VSOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, interrupt_status};

fn irq() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

fn read_some(s: &mut UnixStream) -> Vec<u8> {
    s.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return out,
            Err(e) => panic!("{e}"),
        }
    }
}

fn ops(pkts: &[(Hdr, Vec<u8>)]) -> Vec<u16> {
    pkts.iter().map(|(h, _)| h.op).collect()
}

#[test]
fn new_refuses_reserved_cids_and_names_the_socket_path() {
    let dir = TempDir::new();
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let err = Vsock::new(cid, dir.0.join("a.sock"), irq()).err().unwrap();
        assert!(matches!(err, VsockError::ReservedCid(c) if c == cid));
    }
    let missing = dir.0.join("no-such-dir/v.sock");
    let err = Vsock::new(3, missing.clone(), irq()).err().unwrap();
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
    let path = dir.0.join("v.sock");
    let dev = Vsock::new(3, path.clone(), irq()).unwrap();
    assert!(
        Vsock::new(4, path.clone(), irq()).is_err(),
        "the path is taken"
    );
    drop(dev);
    assert!(!path.exists(), "the device removes its socket");
}

#[test]
fn features_and_config_space() {
    let dir = TempDir::new();
    let dev = Vsock::new(0x8765_4321, dir.0.join("v.sock"), irq()).unwrap();
    assert_eq!(dev.device_type(), TYPE_VSOCK);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(
        dev.avail_features(),
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    );
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 0x8765_4321);
    let mut high = [0xffu8; 4];
    dev.read_config(4, &mut high);
    assert_eq!(u32::from_le_bytes(high), 0);
    let mut byte = [0u8; 1];
    dev.read_config(1, &mut byte);
    assert_eq!(byte, [0x43]);
    let mut past = [0xffu8; 4];
    dev.read_config(8, &mut past);
    assert_eq!(past, [0; 4]);
    dev.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn host_initiated_connection_end_to_end() {
    host_initiated_connection(false);
}

#[test]
fn host_initiated_connection_end_to_end_with_event_idx() {
    host_initiated_connection(true);
}

fn host_initiated_connection(event_idx: bool) {
    let mut g = TestGuest::with_event_idx(event_idx);
    let mut host = g.host_connect();
    host.write_all(b"CONNECT 52\nhello").unwrap();
    g.poll();
    g.give_rx(8);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), [op::REQUEST]);
    let req = pkts[0].0;
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port, req.buf_alloc),
        (2, GUEST_CID, 52, CONN_BUF_SIZE)
    );
    assert_ne!(
        g.dev().interrupt().status() & interrupt_status::USED_RING,
        0
    );

    g.send(Hdr::guest(op::RESPONSE, 52, req.src_port), &[]);
    assert_eq!(
        read_some(&mut host),
        format!("OK {}\n", req.src_port).into_bytes()
    );
    let pkts = g.recv();
    assert_eq!(ops(&pkts), [op::RW]);
    assert_eq!(pkts[0].1, b"hello");

    g.send(Hdr::guest(op::RW, 52, req.src_port), b"pong");
    assert_eq!(read_some(&mut host), b"pong");

    // The host closes: the guest hears SHUTDOWN both ways, answers RST, and it is over.
    drop(host);
    g.poll();
    let pkts = g.recv();
    assert_eq!(ops(&pkts), [op::SHUTDOWN]);
    assert_eq!(pkts[0].0.flags, shutdown::BOTH);
    g.send(Hdr::guest(op::RST, 52, req.src_port), &[]);
    assert_eq!(g.dev().muxer().connection_count(), 0);
    assert!(g.healthy());
}

#[test]
fn guest_initiated_connection_end_to_end() {
    let mut g = TestGuest::new();
    let listener =
        UnixListener::bind(PathBuf::from(format!("{}_8000", g.uds().display()))).unwrap();
    g.give_rx(8);
    g.send(Hdr::guest(op::REQUEST, 3000, 8000), &[]);
    assert_eq!(ops(&g.recv()), [op::RESPONSE]);
    let (mut host, _) = listener.accept().unwrap();
    g.send(Hdr::guest(op::RW, 3000, 8000), b"ping");
    assert_eq!(read_some(&mut host), b"ping");
    host.write_all(b"pong").unwrap();
    g.poll();
    assert_eq!(g.recv()[0].1, b"pong");
    // Nothing listens on another port.
    g.send(Hdr::guest(op::REQUEST, 3001, 8001), &[]);
    let pkts = g.recv();
    assert_eq!(
        (pkts[0].0.op, pkts[0].0.src_port, pkts[0].0.dst_port),
        (op::RST, 8001, 3001)
    );
}

/// The guest writes faster than the host reads: the device holds at most CONN_BUF_SIZE, the
/// guest runs out of credit, and everything arrives in order once the host reads.
#[test]
fn slow_host_reader_bounds_device_buffering() {
    let mut g = TestGuest::new();
    let listener = UnixListener::bind(PathBuf::from(format!("{}_7", g.uds().display()))).unwrap();
    g.give_rx(16);
    g.send(Hdr::guest(op::REQUEST, 500, 7), &[]);
    assert_eq!(ops(&g.recv()), [op::RESPONSE]);
    let (mut host, _) = listener.accept().unwrap();
    let key = ConnKey {
        local_port: 7,
        peer_port: 500,
    };

    let byte = |i: u32| (i % 251) as u8;
    let mut sent = 0u32;
    let mut fwd_told = 0u32;
    let chunk = 4096u32;
    loop {
        // Take any credit update the device sent.
        for (h, _) in g.recv() {
            assert_eq!(h.op, op::CREDIT_UPDATE);
            fwd_told = h.fwd_cnt;
        }
        if sent - fwd_told + chunk > GUEST_CONN_BUF_SIZE {
            break;
        }
        let data: Vec<u8> = (sent..sent + chunk).map(byte).collect();
        g.send(Hdr::guest(op::RW, 500, 7), &data);
        sent += chunk;
        g.give_rx(1);
        let buffered = g.dev().muxer().connection(key).unwrap().buffered();
        assert!(buffered <= GUEST_CONN_BUF_SIZE as usize, "{buffered}");
    }
    let buffered = g.dev().muxer().connection(key).unwrap().buffered();
    assert!(
        buffered > GUEST_CONN_BUF_SIZE as usize / 2 && buffered <= GUEST_CONN_BUF_SIZE as usize,
        "{buffered}"
    );

    // The host catches up: credit updates arrive and the guest may send the rest.
    let mut got = Vec::new();
    for _ in 0..200 {
        got.extend(read_some(&mut host));
        g.poll();
        for (h, _) in g.recv() {
            fwd_told = h.fwd_cnt;
        }
        g.give_rx(1);
        if got.len() as u32 == sent {
            break;
        }
    }
    assert_eq!(got.len() as u32, sent);
    assert!(
        got.iter().enumerate().all(|(i, b)| *b == byte(i as u32)),
        "bytes arrive in order"
    );
    assert!(
        sent - fwd_told < GUEST_CONN_BUF_SIZE,
        "the guest was given credit back"
    );
    assert_eq!(g.dev().muxer().connection(key).unwrap().buffered(), 0);
}

/// The host writes faster than the guest reads: the device reads no more than the guest's
/// credit, so the host's writes block instead of the device draining the socket into memory.
#[test]
fn slow_guest_leaves_the_host_socket_unread() {
    let mut g = TestGuest::new();
    let listener = UnixListener::bind(PathBuf::from(format!("{}_7", g.uds().display()))).unwrap();
    g.give_rx(32);
    let guest_buf = 16 * 1024;
    g.send(
        Hdr {
            buf_alloc: guest_buf,
            ..Hdr::guest(op::REQUEST, 600, 7)
        },
        &[],
    );
    assert_eq!(ops(&g.recv()), [op::RESPONSE]);
    let (mut host, _) = listener.accept().unwrap();
    host.set_nonblocking(true).unwrap();

    let mut written = 0usize;
    let block = vec![5u8; 65536];
    let mut fill_host = |host: &mut UnixStream, g: &mut TestGuest| loop {
        match host.write(&block) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                g.poll();
                match host.write(&block) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return written,
                    Err(e) => panic!("{e}"),
                }
            }
            Err(e) => panic!("{e}"),
        }
    };
    let total_written = fill_host(&mut host, &mut g);
    let got: usize = g
        .recv()
        .iter()
        .map(|(h, d)| {
            assert_eq!(h.op, op::RW);
            d.len()
        })
        .sum();
    assert_eq!(got, guest_buf as usize, "exactly the guest's credit");
    let key = ConnKey {
        local_port: 7,
        peer_port: 600,
    };
    assert_eq!(
        g.dev().muxer().connection(key).unwrap().sent_cnt() as usize,
        got
    );
    assert!(
        total_written > got,
        "the rest stays in the host socket ({total_written} written)"
    );

    // The guest consumed it all: the next 16 KiB flows.
    g.send(
        Hdr {
            buf_alloc: guest_buf,
            fwd_cnt: guest_buf,
            ..Hdr::guest(op::CREDIT_UPDATE, 600, 7)
        },
        &[],
    );
    let got: usize = g.recv().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(got, guest_buf as usize);
}

#[test]
fn transport_reset_drops_connections_and_tells_the_guest() {
    let mut g = TestGuest::new();
    let mut host = g.host_connect();
    host.write_all(b"CONNECT 52\n").unwrap();
    g.poll();
    g.give_rx(4);
    let req = g.recv()[0].0;
    g.send(Hdr::guest(op::RESPONSE, 52, req.src_port), &[]);
    read_some(&mut host);

    assert!(!g.dev().send_transport_reset(), "no event buffer yet");
    g.poll();
    assert_eq!(read_some(&mut host), b"", "host socket closed");
    g.give_event_buffer(8);
    assert!(g.dev().send_transport_reset());
    assert_eq!(g.last_event(), Some((4, 0)));
    assert_eq!(g.dev().muxer().connection_count(), 0);
    // New connections work afterwards.
    let mut host = g.host_connect();
    host.write_all(b"CONNECT 53\n").unwrap();
    g.poll();
    assert_eq!(ops(&g.recv()), [op::REQUEST]);
}

#[test]
fn device_reset_closes_host_sockets() {
    let mut g = TestGuest::new();
    let listener = UnixListener::bind(PathBuf::from(format!("{}_7", g.uds().display()))).unwrap();
    g.give_rx(4);
    g.send(Hdr::guest(op::REQUEST, 600, 7), &[]);
    let (mut host, _) = listener.accept().unwrap();
    g.dev().reset();
    g.poll();
    assert_eq!(read_some(&mut host), b"");
    assert!(!g.dev().is_activated());
}

#[test]
fn corrupted_queue_needs_reset_without_panic() {
    let mut g = TestGuest::new();
    // The driver claims 500 new chains on a 256-entry queue.
    g.txq.avail().idx().store(500);
    g.send_raw(&[0u8; 44], &[]);
    assert!(!g.healthy());
}

#[test]
fn malformed_tx_chains_are_used_and_skipped() {
    let mut g = TestGuest::new();
    g.give_rx(4);
    g.send_raw(&[0u8; 10], &[]);
    g.send_raw(
        &Hdr {
            len: 100,
            ..Hdr::guest(op::RW, 1, 2)
        }
        .bytes(),
        &[],
    );
    assert_eq!(g.used[TXQ].idx(g.mem), 2);
    assert!(g.healthy());
    assert!(g.recv().is_empty());
    // Still routing.
    g.send(Hdr::guest(op::RW, 1, 2), b"x");
    assert_eq!(ops(&g.recv()), [op::RST]);
}

#[test]
fn timer_fires_without_spinning() {
    let mut g = TestGuest::new();
    let mut host = g.host_connect();
    host.write_all(b"CONNECT").unwrap();
    g.poll();
    assert_eq!(g.dev().muxer().handshake_count(), 1);
    assert!(
        g.dev().timer_armed.is_some(),
        "armed for the handshake deadline"
    );
    // Fire the timer early: nothing has expired, and the loop settles instead of spinning.
    g.dev()
        .timer
        .reset(std::time::Duration::from_millis(1), None)
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(10));
    assert_eq!(g.em.run_with_timeout(0).unwrap(), 1);
    assert_eq!(g.em.run_with_timeout(0).unwrap(), 0);
    assert_eq!(g.dev().muxer().handshake_count(), 1);
    assert!(g.dev().timer.is_armed().unwrap());
}

#[test]
fn a_full_tx_queue_is_served_a_budget_at_a_time() {
    let mut g = TestGuest::new();
    // 100 RSTs for connections that do not exist: each is used and dropped.
    for i in 0..100 {
        g.queue_tx(&Hdr::guest(op::RST, 1000 + i, 5).bytes(), &[]);
    }
    g.dev().process_tx(std::time::Instant::now());
    assert_eq!(usize::from(g.used[TXQ].idx(g.mem)), super::CHAINS_PER_PASS);
    assert_eq!(
        g.dev().queue_events()[super::TXQ].read().unwrap(),
        1,
        "the handler asked to come back"
    );
    g.dev().queue_events()[super::TXQ].write(1).unwrap();
    g.poll();
    assert_eq!(g.used[TXQ].idx(g.mem), 100);
    assert!(g.healthy());
}

#[test]
fn an_indirect_tx_chain_needs_reset() {
    let mut g = TestGuest::new();
    let i = 0;
    let table = g.txq.desc_table();
    table
        .store(
            i,
            RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
                0x1000,
                32,
                virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
                0,
            )),
        )
        .unwrap();
    g.txq.avail().ring().ref_at(0).unwrap().store(i);
    g.txq.avail().idx().store(1);
    g.dev().queue_events()[super::TXQ].write(1).unwrap();
    g.poll();
    assert!(!g.healthy());
    assert_eq!(g.used[TXQ].idx(g.mem), 1);
}
