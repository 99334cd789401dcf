//! An agent flooding one-byte data frames while it reads nothing from the host: the client keeps
//! consuming (and crediting) them, and its memory stays flat, because credit waiting to be
//! written is coalesced instead of queued frame by frame. Alone in its binary: it measures the
//! process's resident memory.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::thread;

use kiln_agent::client::{self, ExecOutput};
use kiln_agent::protocol::{Event, ExecSpec, Hello, Message, PROTOCOL_VERSION, Stream, read_frame};

const FRAMES: usize = 1_000_000;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_flood_of_tiny_frames_keeps_the_client_bounded() {
    let dir = std::env::temp_dir().join(format!("kiln-flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        read_frame(&mut s).unwrap();
        let hello = Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            software: "flood".into(),
            revision: 0,
        });
        s.write_all(&hello.encode()).unwrap();
        let req = read_frame(&mut s).unwrap().unwrap();
        s.write_all(&Message::Event(req.id, Event::Started { pid: 1 }).encode())
            .unwrap();
        // Never read again: every credit frame the client makes stays on its side.
        let one = Message::Data(req.id, Stream::Stdout, vec![b'x']).encode();
        let mut batch = Vec::with_capacity(one.len() * 4096);
        for _ in 0..4096 {
            batch.extend_from_slice(&one);
        }
        for _ in 0..FRAMES / 4096 {
            if s.write_all(&batch).is_err() {
                return;
            }
        }
        let exit = Message::Event(
            req.id,
            Event::Exit {
                status: kiln_agent::protocol::ExitStatus::Exited(0),
            },
        );
        let _ = s.write_all(&exit.encode());
        let mut sink = [0u8; 1];
        let _ = s.read(&mut sink);
    });
    let c = client::connect_unix(&path).unwrap();
    let mut exec = c.exec(ExecSpec::new(["flood"])).unwrap();
    let before = rss_kib();
    let mut got = 0usize;
    let mut peak = before;
    loop {
        match exec.next_output().unwrap() {
            Some(ExecOutput::Stdout(b)) => got += b.len(),
            Some(ExecOutput::Exit(_)) | None => break,
            Some(other) => panic!("{other:?}"),
        }
        if got.is_multiple_of(65536) {
            peak = peak.max(rss_kib());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(got, FRAMES / 4096 * 4096);
    let grew = peak.saturating_sub(before);
    println!("client RSS {before} KiB before, peak {peak} KiB over {got} one-byte frames");
    assert!(
        grew < 32 * 1024,
        "the client grew by {grew} KiB while crediting {got} one-byte frames"
    );
}
