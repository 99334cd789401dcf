//! Hostile and broken peers, both ways. Raw frames sent to a real agent: version mismatch,
//! garbage, oversized and truncated frames, unknown kinds and ops, bad UTF-8, id abuse, data
//! beyond credit; the agent answers or closes, and keeps serving others. Fake agents and fake
//! vsock sockets in front of the client: it reports what went wrong and never hangs or panics.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{Agent, vsock_proxy};
use kiln_agent::client::{self, Error};
use kiln_agent::protocol::frame::encode_frame;
use kiln_agent::protocol::message::{KIND_DATA, KIND_REQUEST};
use kiln_agent::protocol::{
    ErrorKind, Event, Hello, MAX_FRAME_LEN, Message, PROTOCOL_VERSION, Request, Stream, read_frame,
};

fn hello(version: u32) -> Vec<u8> {
    Message::Hello(Hello {
        version,
        software: "hostile test".into(),
        revision: 0,
    })
    .encode()
}

/// A raw connection that already exchanged hellos.
fn raw(agent: &Agent) -> UnixStream {
    let mut s = UnixStream::connect(&agent.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello(PROTOCOL_VERSION)).unwrap();
    assert!(matches!(recv(&mut s), Some(Message::Hello(_))));
    s
}

fn recv(s: &mut UnixStream) -> Option<Message> {
    read_frame(s).unwrap().map(|f| Message::decode(f).unwrap())
}

fn expect_error(s: &mut UnixStream, id: u64, kind: ErrorKind) -> String {
    let mut next = recv(s);
    // Credit for data the agent consumed may come first.
    while let Some(Message::Credit(..)) = next {
        next = recv(s);
    }
    match next {
        Some(Message::Event(got, Event::Error(info))) if got == id && info.kind == kind => {
            info.message
        }
        other => panic!("expected a {kind:?} error on {id}, got {other:?}"),
    }
}

fn expect_closed(s: &mut UnixStream) {
    let mut buf = [0u8; 64];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "connection still open");
}

fn ping(s: &mut UnixStream, id: u64) {
    s.write_all(&Message::Request(id, Request::Ping).encode())
        .unwrap();
    assert!(matches!(recv(s), Some(Message::Event(i, Event::Pong { .. })) if i == id));
}

#[test]
fn version_mismatch_and_missing_hello() {
    let agent = Agent::start("version");
    let mut s = UnixStream::connect(&agent.sock).unwrap();
    s.write_all(&hello(PROTOCOL_VERSION + 1)).unwrap();
    assert!(matches!(recv(&mut s), Some(Message::Hello(h)) if h.version == PROTOCOL_VERSION));
    let msg = expect_error(&mut s, 0, ErrorKind::VersionMismatch);
    assert_eq!(
        msg,
        format!(
            "the host speaks protocol version {}, this agent speaks {PROTOCOL_VERSION}",
            PROTOCOL_VERSION + 1
        )
    );
    expect_closed(&mut s);

    let mut s = UnixStream::connect(&agent.sock).unwrap();
    s.write_all(&Message::Request(1, Request::Ping).encode())
        .unwrap();
    expect_error(&mut s, 0, ErrorKind::Protocol);
    expect_closed(&mut s);
}

#[test]
fn malformed_requests_get_answers_and_the_connection_lives() {
    let agent = Agent::start("malformed");
    let mut s = raw(&agent);
    s.write_all(&encode_frame(77, 5, &[b"whatever"])).unwrap();
    expect_error(&mut s, 5, ErrorKind::Protocol);
    s.write_all(&encode_frame(
        KIND_REQUEST,
        6,
        &[br#"{"op":"post_restore"}"#],
    ))
    .unwrap();
    let msg = expect_error(&mut s, 6, ErrorKind::UnknownRequest);
    assert!(msg.contains("post_restore"), "{msg}");
    s.write_all(&encode_frame(
        KIND_REQUEST,
        7,
        &[b"{\"op\":\"stat\",\"path\":\"/\xff\"}"],
    ))
    .unwrap();
    expect_error(&mut s, 7, ErrorKind::BadRequest);
    s.write_all(&encode_frame(
        KIND_REQUEST,
        8,
        &[b"{\"op\":\"exec\",\"argv\":[\"a\"],\"colour\":1}"],
    ))
    .unwrap();
    let msg = expect_error(&mut s, 8, ErrorKind::BadRequest);
    assert!(msg.contains("colour"), "{msg}");
    s.write_all(&encode_frame(KIND_DATA, 9, &[&[42]])).unwrap();
    expect_error(&mut s, 9, ErrorKind::Protocol);
    // Data for a request that does not exist is dropped silently.
    s.write_all(&Message::Data(1234, Stream::Stdin, b"x".to_vec()).encode())
        .unwrap();
    ping(&mut s, 10);
}

#[test]
fn framing_violations_close_only_that_connection() {
    let agent = Agent::start("framing");
    // An absurd length: refused without allocating, connection closed.
    let mut s = raw(&agent);
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let msg = expect_error(&mut s, 0, ErrorKind::Protocol);
    assert!(msg.contains("4294967295"), "{msg}");
    expect_closed(&mut s);
    let mut s = raw(&agent);
    s.write_all(&(MAX_FRAME_LEN + 1).to_le_bytes()).unwrap();
    expect_error(&mut s, 0, ErrorKind::Protocol);

    // A truncated frame, then the host goes away.
    let mut s = raw(&agent);
    s.write_all(&1000u32.to_le_bytes()).unwrap();
    s.write_all(&[2, 1, 0, 0]).unwrap();
    drop(s);

    // Request id 0, a reused id, data beyond credit: the stream is not trusted any more.
    let mut s = raw(&agent);
    s.write_all(&Message::Request(0, Request::Ping).encode())
        .unwrap();
    expect_error(&mut s, 0, ErrorKind::Protocol);
    expect_closed(&mut s);

    let mut s = raw(&agent);
    let sleep = Request::Exec(kiln_agent::protocol::ExecSpec::new(["sleep", "100"]));
    s.write_all(&Message::Request(3, sleep.clone()).encode())
        .unwrap();
    assert!(matches!(
        recv(&mut s),
        Some(Message::Event(3, Event::Started { .. }))
    ));
    s.write_all(&Message::Request(3, sleep).encode()).unwrap();
    let msg = expect_error(&mut s, 0, ErrorKind::Protocol);
    assert!(msg.contains("already in use"), "{msg}");

    let mut s = raw(&agent);
    let cat = Request::Exec(kiln_agent::protocol::ExecSpec {
        stdin: true,
        ..kiln_agent::protocol::ExecSpec::new(["sleep", "100"])
    });
    s.write_all(&Message::Request(4, cat).encode()).unwrap();
    assert!(matches!(
        recv(&mut s),
        Some(Message::Event(4, Event::Started { .. }))
    ));
    let chunk = Message::Data(4, Stream::Stdin, vec![0; 60_000]).encode();
    // `sleep` never reads: the agent can take one pipe's worth (64 KiB) off the window, so
    // 360 000 bytes overrun the 256 KiB credit.
    for _ in 0..6 {
        s.write_all(&chunk).unwrap();
    }
    let msg = expect_error(&mut s, 0, ErrorKind::Protocol);
    assert!(
        msg.contains("more Stdin data than the credit given"),
        "{msg}"
    );

    // Through all of that the agent kept serving.
    ping(&mut raw(&agent), 1);
}

/// Waits up to 5 s for process `pid` to be gone (reaped, so no /proc entry).
fn process_gone(pid: u32) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > end {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn connections_reset_underneath_end_only_their_sessions() {
    // What a snapshot does to the guest's vsock connections: they die under the agent with
    // requests running. A Unix socket closed with unread data in its receive queue is reset:
    // the agent's reads fail with ECONNRESET and its writes with EPIPE, as on a reset vsock.
    let mut agent = Agent::start("reset");
    let mut pids = Vec::new();
    let mut doomed = Vec::new();
    for id in 1..=4u64 {
        let mut s = raw(&agent);
        let flood = Request::Exec(kiln_agent::protocol::ExecSpec::new(["yes"]));
        let sleep = Request::Exec(kiln_agent::protocol::ExecSpec::new(["sleep", "100"]));
        s.write_all(&Message::Request(id, flood).encode()).unwrap();
        s.write_all(&Message::Request(id + 100, sleep).encode())
            .unwrap();
        let mut started = 0;
        while started < 2 {
            match recv(&mut s) {
                Some(Message::Event(i, Event::Started { pid })) => {
                    if i == id + 100 {
                        pids.push(pid);
                    }
                    started += 1;
                }
                Some(_) => {}
                None => panic!("connection {id} closed early"),
            }
        }
        doomed.push(s);
    }
    // One more dies halfway through its hello.
    let mut half = UnixStream::connect(&agent.sock).unwrap();
    half.write_all(&hello(PROTOCOL_VERSION)[..7]).unwrap();
    doomed.push(half);
    // Let `yes` fill the receive queues we will never read.
    thread::sleep(Duration::from_millis(200));
    drop(doomed);

    for pid in pids {
        assert!(
            process_gone(pid),
            "exec {pid} outlived its reset connection"
        );
    }
    assert!(agent.child.try_wait().unwrap().is_none(), "the agent died");
    // The listener kept accepting, and new sessions work in full.
    let c = agent.client();
    let out = c
        .run(kiln_agent::protocol::ExecSpec::new(["echo", "still here"]))
        .unwrap();
    assert_eq!(out.stdout, b"still here\n");
    ping(&mut raw(&agent), 1);
}

#[test]
fn random_garbage_never_kills_the_agent() {
    let agent = Agent::start("garbage");
    let mut x: u64 = 0x1234_5678_9abc_def1;
    for round in 0..200 {
        let mut s = UnixStream::connect(&agent.sock).unwrap();
        let mut bytes = if round % 2 == 0 {
            hello(PROTOCOL_VERSION)
        } else {
            Vec::new()
        };
        for _ in 0..(x % 300) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.push(x as u8);
        }
        // Plausible lengths reach the message decoder instead of the length check.
        if bytes.len() > 40 && round % 4 == 0 {
            let len = (bytes.len() - 29) as u32;
            bytes[25..29].copy_from_slice(&len.to_le_bytes());
        }
        let _ = s.write_all(&bytes);
        drop(s);
    }
    let c = agent.client();
    assert!(c.ping().is_ok());
}

#[test]
fn vsock_connect_handshake() {
    let agent = Agent::start("vsock");
    let good = agent.dir.join("good.vsock");
    vsock_proxy(&good, agent.sock.clone(), |line| {
        (line == "CONNECT 1024").then(|| "OK 1073741824\n".to_string())
    });
    let c = client::connect_vsock(&good, 1024).unwrap();
    assert!(c.ping().is_ok());

    let refuse = agent.dir.join("refuse.vsock");
    vsock_proxy(&refuse, agent.sock.clone(), |_| {
        Some("NOPE go away\n".into())
    });
    match client::connect_vsock(&refuse, 1024) {
        Err(Error::ConnectRefused { reply, port, .. }) => {
            assert_eq!((reply.as_str(), port), ("NOPE go away", 1024))
        }
        other => panic!("{:?}", other.err()),
    }
    let silent = agent.dir.join("silent.vsock");
    vsock_proxy(&silent, agent.sock.clone(), |_| None);
    let err = client::connect_vsock(&silent, 1024).err().unwrap();
    assert!(
        err.to_string()
            .contains("answered \"\" to \"CONNECT 1024\""),
        "{err}"
    );
    let err = client::connect_vsock(agent.dir.join("absent.vsock"), 1024)
        .err()
        .unwrap();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
}

#[test]
fn wait_ready_waits_for_a_booting_guest() {
    let agent = Agent::start("ready");
    let uds = agent.dir.join("late.vsock");
    let (uds2, sock) = (uds.clone(), agent.sock.clone());
    let late = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        vsock_proxy(&uds2, sock, |_| Some("OK 1\n".into()));
    });
    let start = Instant::now();
    let c = client::wait_ready(&uds, start + Duration::from_secs(10)).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(c.ping().is_ok());
    late.join().unwrap();

    let never = agent.dir.join("never.vsock");
    let err = client::wait_ready(&never, Instant::now() + Duration::from_millis(200))
        .err()
        .unwrap();
    assert!(matches!(err, Error::NotReady { .. }), "{err}");
    assert!(err.to_string().contains("never.vsock"), "{err}");
}

/// A fake agent on a Unix socket: says `hello_version`, then runs `behave` on the stream. The
/// socket's scratch directory is removed once a client connected.
fn fake_agent(
    name: &str,
    hello_version: u32,
    behave: impl FnOnce(UnixStream) + Send + 'static,
) -> std::path::PathBuf {
    let dir = common::scratch(name);
    let path = dir.join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        read_frame(&mut s).unwrap();
        s.write_all(&hello(hello_version)).unwrap();
        behave(s);
    });
    path
}

#[test]
fn a_hostile_agent_cannot_hurt_the_client() {
    let path = fake_agent("old-agent", PROTOCOL_VERSION + 7, |_| {});
    match client::connect_unix(&path) {
        Err(Error::VersionMismatch { host, agent }) => {
            assert_eq!((host, agent), (PROTOCOL_VERSION, PROTOCOL_VERSION + 7))
        }
        other => panic!("{:?}", other.err()),
    }

    // Floods data without credit: the connection is closed, the request fails.
    let path = fake_agent("flood", PROTOCOL_VERSION, |mut s| {
        let req = read_frame(&mut s).unwrap().unwrap();
        let started = Message::Event(req.id, Event::Started { pid: 1 }).encode();
        s.write_all(&started).unwrap();
        let chunk = Message::Data(req.id, Stream::Stdout, vec![7; 65536]).encode();
        for _ in 0..64 {
            if s.write_all(&chunk).is_err() {
                return;
            }
        }
        thread::sleep(Duration::from_secs(5));
    });
    let c = client::connect_unix(&path).unwrap();
    let exec = c.exec(kiln_agent::protocol::ExecSpec::new(["x"])).unwrap();
    thread::sleep(Duration::from_millis(200)); // let it overrun before we read
    let err = exec.output().err().unwrap();
    assert!(err.to_string().contains("more data than credited"), "{err}");
    assert!(matches!(c.ping(), Err(Error::Closed(_))));

    // Garbage after the hello.
    let path = fake_agent("garbage-agent", PROTOCOL_VERSION, |mut s| {
        read_frame(&mut s).unwrap();
        let _ = s.write_all(&[0xff; 64]);
        thread::sleep(Duration::from_secs(5));
    });
    let c = client::connect_unix(&path).unwrap();
    let err = c.ping().err().unwrap();
    assert!(matches!(err, Error::Closed(_)), "{err}");
}
