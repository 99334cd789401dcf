//! Agents replaced by hostile ones, in front of the real client: silent after the hello, answering
//! with the wrong ids, sending giant or endless events, frames longer than the protocol allows.
//! Every call ends within its deadline with an error that says what happened, and the client's
//! memory stays bounded (the flood of tiny frames is in `flood.rs`, alone in its binary, since it
//! measures the process).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use kiln_agent::client::{self, Error, MAX_LIST_ENTRIES, WriteOptions};
use kiln_agent::protocol::{
    DirEntry, Event, ExecSpec, FileKind, FileStat, Hello, Message, PROTOCOL_VERSION, read_frame,
};

/// A fake agent on a Unix socket: answers the hello, then runs `behave` on the stream.
fn fake_agent(name: &str, behave: impl FnOnce(UnixStream) + Send + 'static) -> PathBuf {
    let dir = common::scratch(name);
    let path = dir.join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        read_frame(&mut s).unwrap();
        let hello = Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            software: "hostile agent".into(),
            revision: 0,
        });
        s.write_all(&hello.encode()).unwrap();
        behave(s);
    });
    path
}

/// Reads (and ignores) everything until the client goes away.
fn swallow(mut s: UnixStream) {
    let mut buf = vec![0u8; 65536];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

/// Runs `call`, checks it failed with a timeout within `limit`.
fn times_out<T: std::fmt::Debug>(
    what: &str,
    limit: Duration,
    call: impl FnOnce() -> Result<T, Error>,
) {
    let start = Instant::now();
    let result = call();
    let took = start.elapsed();
    assert!(
        matches!(result, Err(Error::Timeout(_))),
        "{what}: expected a timeout, got {result:?}"
    );
    assert!(took < limit, "{what} took {took:?}, past {limit:?}");
}

#[test]
fn an_agent_silent_after_its_hello_cannot_hold_any_call() {
    let path = fake_agent("silent", swallow);
    let c = client::connect_unix(&path)
        .unwrap()
        .with_reply_timeout(Duration::from_millis(300));
    let limit = Duration::from_secs(3);
    times_out("ping", limit, || c.ping());
    times_out("exec", limit, || {
        c.exec(ExecSpec::new(["true"])).map(|e| e.pid())
    });
    times_out("stat", limit, || c.stat("/etc"));
    times_out("list_dir", limit, || c.list_dir("/etc"));
    times_out("read_file", limit, || {
        c.read_file("/etc/passwd", std::io::sink())
    });
    // More than the initial window: the write needs credit the agent never returns.
    let data = vec![7u8; 1 << 20];
    times_out("write_file", limit, || {
        c.write_file("/tmp/x", &data[..], WriteOptions::default())
    });
    let deadline = Instant::now() + Duration::from_millis(300);
    times_out("exec_until", limit, || {
        c.exec_until(ExecSpec::new(["true"]), deadline)
            .map(|e| e.pid())
    });
    // The error says how long the call waited (about 300 ms), not how late it woke.
    let deadline = Instant::now() + Duration::from_millis(300);
    match c.exec_until(ExecSpec::new(["true"]), deadline) {
        Err(Error::Timeout(waited)) => assert!(
            waited >= Duration::from_millis(250),
            "a 300 ms wait was reported as {waited:?}"
        ),
        other => panic!("expected a timeout, got {:?}", other.map(|e| e.pid())),
    }
}

#[test]
fn a_started_process_that_never_reports_is_bounded_by_the_callers_deadline() {
    let path = fake_agent("started-silent", |mut s| {
        let req = read_frame(&mut s).unwrap().unwrap();
        let started = Message::Event(req.id, Event::Started { pid: 9 }).encode();
        s.write_all(&started).unwrap();
        swallow(s);
    });
    let c = client::connect_unix(&path).unwrap();
    let exec = c.exec(ExecSpec::new(["sleep", "inf"])).unwrap();
    assert_eq!(exec.pid(), 9);
    let deadline = Instant::now() + Duration::from_millis(300);
    times_out("output_until", Duration::from_secs(3), || {
        exec.output_until(deadline)
    });
}

#[test]
fn answers_for_the_wrong_request_ids_are_ignored() {
    let path = fake_agent("wrong-ids", |mut s| {
        while let Ok(Some(req)) = read_frame(&mut s) {
            for id in [req.id + 1000, u64::MAX, 0x7777] {
                let pong = Message::Event(id, Event::Pong { agent: "x".into() });
                let started = Message::Event(id, Event::Started { pid: 1 });
                if s.write_all(&pong.encode()).is_err() || s.write_all(&started.encode()).is_err() {
                    return;
                }
            }
        }
    });
    let c = client::connect_unix(&path)
        .unwrap()
        .with_reply_timeout(Duration::from_millis(300));
    times_out("ping", Duration::from_secs(3), || c.ping());
    times_out("exec", Duration::from_secs(3), || {
        c.exec(ExecSpec::new(["true"])).map(|e| e.pid())
    });
}

/// An `entries` event of about `bytes` bytes on the wire.
fn entry(name: String) -> DirEntry {
    DirEntry {
        name,
        stat: FileStat {
            kind: FileKind::File,
            size: 1,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            owner: None,
            group: None,
            symlink_target: None,
        },
    }
}

fn big_entries(id: u64, bytes: usize) -> Vec<u8> {
    let entry = entry("n".repeat(bytes - 200));
    Message::Event(
        id,
        Event::Entries {
            entries: vec![entry],
        },
    )
    .encode()
}

#[test]
fn giant_events_nobody_reads_close_the_connection_by_their_size() {
    let (wrote, written) = std::sync::mpsc::channel();
    let path = fake_agent("giant-events-unread", move |mut s| {
        let req = read_frame(&mut s).unwrap().unwrap();
        let started = Message::Event(req.id, Event::Started { pid: 1 }).encode();
        s.write_all(&started).unwrap();
        for _ in 0..5 {
            if s.write_all(&big_entries(req.id, 900_000)).is_err() {
                break;
            }
        }
        let _ = wrote.send(());
        swallow(s);
    });
    let c = client::connect_unix(&path).unwrap();
    let mut exec = c.exec(ExecSpec::new(["x"])).unwrap();
    // Let the events pile up unread.
    written.recv_timeout(Duration::from_secs(30)).unwrap();
    thread::sleep(Duration::from_millis(200));
    let deadline = Instant::now() + Duration::from_secs(10);
    // Each event is out of place for an exec (an error of its own); the connection's end
    // follows them, with the reason.
    let mut closed = None;
    for _ in 0..10 {
        if let Err(Error::Closed(why)) = exec.next_output_until(deadline) {
            closed = Some(why);
            break;
        }
    }
    let why = closed.expect("the connection was closed");
    assert!(
        why.contains("bytes of events that were not read yet"),
        "{why}"
    );
    assert!(matches!(c.ping(), Err(Error::Closed(_))));
}

#[test]
fn an_endless_listing_is_refused_by_name_not_collected() {
    let path = fake_agent("endless-listing", |mut s| {
        let req = read_frame(&mut s).unwrap().unwrap();
        let batch: Vec<DirEntry> = (0..256).map(|i| entry(format!("f{i}"))).collect();
        let frame = Message::Event(req.id, Event::Entries { entries: batch }).encode();
        // Keep the client's socket drained so the cancel it sends never blocks it.
        let reader = s.try_clone().unwrap();
        thread::spawn(move || swallow(reader));
        while s.write_all(&frame).is_ok() {}
    });
    let c = client::connect_unix(&path).unwrap();
    let start = Instant::now();
    match c.list_dir("/endless") {
        Err(Error::TooLarge { what, limit }) => {
            assert!(what.contains("/endless"), "{what}");
            assert_eq!(limit, format!("{MAX_LIST_ENTRIES} entries"));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn frames_longer_than_the_protocol_allows_close_the_connection() {
    let path = fake_agent("giant-frame", |mut s| {
        let _ = s.write_all(&u32::MAX.to_le_bytes());
        let _ = s.write_all(&[3; 64]);
        swallow(s);
    });
    let c = client::connect_unix(&path).unwrap();
    match c.ping() {
        Err(Error::Closed(why)) => assert!(why.contains("4294967295"), "{why}"),
        other => panic!("expected the connection closed, got {other:?}"),
    }
}
