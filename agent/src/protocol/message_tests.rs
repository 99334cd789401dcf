//! Decoding tests: every well-formed message round-trips, every malformed one is an error that
//! names its request, and random payloads never panic.

use super::*;
use crate::protocol::frame::read_frame;

fn raw(kind: u8, id: u64, payload: &[u8]) -> RawFrame {
    RawFrame {
        kind,
        id,
        payload: payload.to_vec(),
    }
}

fn round_trip(m: Message) {
    let bytes = m.encode();
    let frame = read_frame(&mut &bytes[..]).unwrap().unwrap();
    assert_eq!(Message::decode(frame).unwrap(), m);
}

#[test]
fn messages_round_trip() {
    let mut spec = ExecSpec::new(["sh", "-c", "echo hi"]);
    spec.env.insert("A".into(), "b".into());
    spec.tty = Some(TtySize { rows: 24, cols: 80 });
    spec.timeout_ms = Some(1500);
    round_trip(Message::Hello(Hello {
        version: 1,
        software: "t".into(),
        revision: 2,
    }));
    round_trip(Message::Request(1, Request::Exec(spec)));
    round_trip(Message::Request(2, Request::Ping));
    round_trip(Message::Request(
        3,
        Request::WriteFile {
            path: "/a".into(),
            mode: Some(0o755),
            parents: true,
            append: false,
            owner: Some("1000:1000".into()),
        },
    ));
    round_trip(Message::Request(
        4,
        Request::Attach {
            process: crate::protocol::Selector::Tag("web".into()),
        },
    ));
    round_trip(Message::Event(
        4,
        Event::Exit {
            status: ExitStatus::Signaled(9),
        },
    ));
    round_trip(Message::Event(
        4,
        Event::Exit {
            status: ExitStatus::TimedOut,
        },
    ));
    round_trip(Message::Event(
        5,
        Event::Error(ErrorInfo {
            kind: ErrorKind::NotFound,
            message: "x".into(),
            errno: Some(2),
        }),
    ));
    round_trip(Message::Data(6, Stream::Stderr, b"bytes\0\xff".to_vec()));
    round_trip(Message::Data(6, Stream::Stdout, Vec::new()));
    round_trip(Message::Eof(7, Stream::Stdin));
    round_trip(Message::Credit(8, Stream::File, 65536));
    round_trip(Message::Request(
        9,
        Request::Restored(crate::protocol::RestoreSpec {
            entropy: "00ff".repeat(16),
            time_ns: 1_718_000_000_123_456_789,
            env: [("K".to_string(), "V".to_string())].into(),
        }),
    ));
    round_trip(Message::Event(
        9,
        Event::Restored {
            clock_step_ns: -5,
            entropy_bytes: 64,
        },
    ));
}

#[test]
fn json_shapes_are_as_documented() {
    let bytes = serde_json::to_string(&Request::Remove {
        path: "/x".into(),
        recursive: true,
    })
    .unwrap();
    assert_eq!(bytes, r#"{"op":"remove","path":"/x","recursive":true}"#);
    let exit = serde_json::to_string(&Event::Exit {
        status: ExitStatus::Exited(3),
    })
    .unwrap();
    assert_eq!(exit, r#"{"event":"exit","status":{"exited":3}}"#);
    let r: Request = serde_json::from_str(r#"{"op":"exec","argv":["true"]}"#).unwrap();
    assert_eq!(r, Request::Exec(ExecSpec::new(["true"])));
    let r: Request =
        serde_json::from_str(r#"{"op":"restored","entropy":"ab","time_ns":7}"#).unwrap();
    let Request::Restored(spec) = r else {
        panic!("{r:?}")
    };
    assert_eq!((spec.entropy.as_str(), spec.time_ns), ("ab", 7));
    assert!(spec.env.is_empty());
    let done = serde_json::to_string(&Event::Restored {
        clock_step_ns: 12,
        entropy_bytes: 64,
    })
    .unwrap();
    assert_eq!(
        done,
        r#"{"event":"restored","clock_step_ns":12,"entropy_bytes":64}"#
    );
    assert!(
        Event::Restored {
            clock_step_ns: 0,
            entropy_bytes: 32
        }
        .is_final()
    );
}

#[test]
fn malformed_frames_name_their_request() {
    let cases: Vec<(RawFrame, ErrorKind)> = vec![
        (raw(99, 5, b""), ErrorKind::Protocol),
        (raw(KIND_DATA, 5, b""), ErrorKind::Protocol),
        (raw(KIND_DATA, 5, b"\x09abc"), ErrorKind::Protocol),
        (raw(KIND_EOF, 5, b""), ErrorKind::Protocol),
        (raw(KIND_EOF, 5, b"\x00\x00"), ErrorKind::Protocol),
        (raw(KIND_CREDIT, 5, b"\x01\x00"), ErrorKind::Protocol),
        (raw(KIND_REQUEST, 5, b"{"), ErrorKind::BadRequest),
        (raw(KIND_REQUEST, 5, b"[1,2]"), ErrorKind::BadRequest),
        (
            raw(KIND_REQUEST, 5, b"{\"op\":\"stat\"}"),
            ErrorKind::BadRequest,
        ),
        (
            raw(KIND_REQUEST, 5, b"{\"op\":\"stat\",\"path\":\"/\",\"x\":1}"),
            ErrorKind::BadRequest,
        ),
        (
            raw(KIND_REQUEST, 5, b"{\"op\":\"stat\",\"path\":\"\xff\xfe\"}"),
            ErrorKind::BadRequest,
        ),
        (
            raw(KIND_REQUEST, 5, b"{\"op\":\"post_restore\"}"),
            ErrorKind::UnknownRequest,
        ),
        (
            raw(KIND_EVENT, 5, b"{\"event\":\"party\"}"),
            ErrorKind::BadRequest,
        ),
        (raw(KIND_HELLO, 5, b"null"), ErrorKind::BadRequest),
    ];
    for (frame, kind) in cases {
        let shown = format!("{frame:?}");
        let err = Message::decode(frame).unwrap_err();
        assert_eq!(err.id(), 5, "{shown}: {err}");
        assert_eq!(err.kind(), kind, "{shown}: {err}");
    }
}

#[test]
fn unknown_request_is_named() {
    let err = Message::decode(raw(KIND_REQUEST, 9, br#"{"op":"post_restore"}"#)).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"request 9: unknown request type "post_restore""#
    );
}

#[test]
fn random_payloads_never_panic() {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let seeds: [&[u8]; 4] = [
        br#"{"op":"exec","argv":["a"],"env":{"K":"V"},"tty":{"rows":1,"cols":2}}"#,
        br#"{"event":"entries","entries":[{"name":"a","stat":{"kind":"file","size":1,"mode":420,"uid":0,"gid":0,"mtime":0}}]}"#,
        br#"{"version":1,"software":"x"}"#,
        b"\x01\x02\x03\x04\x05",
    ];
    for i in 0..5000 {
        let mut payload = seeds[i % seeds.len()].to_vec();
        for _ in 0..(next() % 4) {
            if payload.is_empty() {
                break;
            }
            let at = (next() as usize) % payload.len();
            payload[at] = next() as u8;
        }
        payload.truncate((next() as usize) % (payload.len() + 1));
        let kind = (next() % 8) as u8;
        let _ = Message::decode(raw(kind, next(), &payload));
    }
}
