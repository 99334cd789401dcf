//! The server's limits on real sockets, with short timeouts and few slots so each one shows in
//! well under a second: a trickled request is refused and closed, an idle keep-alive connection
//! is closed, a full server makes room, a client that does not read is dropped, and a handler on
//! another thread does not stop the loop from serving others. Times are asserted only as upper
//! bounds generous enough for a loaded machine.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kiln_api::client;
use kiln_api::{ApiRequest, ApiResponse, ApiServer, Limits, Reply};

/// Long enough for anything that should happen on a loaded 2-core machine.
const GENEROUS: Duration = Duration::from_secs(10);

/// A directory of its own for each test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-limits-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn short() -> Limits {
    Limits {
        max_connections: 4,
        read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(300),
        write_timeout: Duration::from_millis(300),
        max_unsent: 4096,
        evict_after: Duration::from_millis(200),
        accepts_per_turn: 32,
        max_payload: kiln_api::http::DEFAULT_MAX_PAYLOAD,
    }
}

/// Serves `limits` on a thread, answering every request 200 `{}`.
fn serve(dir: &TempDir, limits: Limits) -> PathBuf {
    let path = dir.0.join("api.sock");
    let server = ApiServer::bind(&path).unwrap().with_limits(limits);
    thread::spawn(move || server.serve(|_| ApiResponse::Json("{}".into())));
    path
}

fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(GENEROUS)).unwrap();
    s
}

/// Reads until the server closes the connection (or resets it); what came before.
fn read_to_close(s: &mut UnixStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("no close within {GENEROUS:?}: {e}; got {got:?}"),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn a_trickled_request_is_refused_once_its_time_is_up() {
    let dir = TempDir::new("trickle");
    let path = serve(&dir, short());
    let mut s = connect(&path);
    let start = Instant::now();
    let writer = s.try_clone().unwrap();
    let trickle = thread::spawn(move || {
        let mut w = writer;
        for b in b"GET / HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain(std::iter::repeat(&b'a'))
        {
            if w.write_all(&[*b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    });
    let answer = read_to_close(&mut s);
    let took = start.elapsed();
    trickle.join().unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(
        answer.contains("request not complete within 300 ms; closing the connection"),
        "{answer}"
    );
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    println!("trickled request closed after {took:?} (read timeout 300 ms)");
}

#[test]
fn a_body_over_the_payload_limit_is_refused_from_its_head() {
    let dir = TempDir::new("payload");
    let path = serve(
        &dir,
        Limits {
            max_payload: 100,
            ..short()
        },
    );
    let mut c = client::Client::connect(&path).unwrap();
    let big = format!("{{\"state\": \"{}\"}}", "x".repeat(200));
    let (code, body) = c.request("PATCH", "/vm", Some(&big)).unwrap();
    assert_eq!(code, 400);
    assert!(
        body.contains("Request payload with size 213 is larger than the limit of 100"),
        "{body}"
    );
    let mut c = client::Client::connect(&path).unwrap();
    let (code, _) = c
        .request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#))
        .unwrap();
    assert_eq!(code, 200, "a body within the limit is served");
}

#[test]
fn an_idle_keep_alive_connection_is_closed() {
    let dir = TempDir::new("idle");
    let path = serve(&dir, short());
    let mut c = client::Client::connect(&path).unwrap();
    assert_eq!(c.request("GET", "/", None).unwrap().0, 200);
    let start = Instant::now();
    // The client's next request finds the connection closed.
    thread::sleep(Duration::from_millis(600));
    assert!(c.request("GET", "/", None).is_err());
    println!("idle connection closed within {:?}", start.elapsed());
}

#[test]
fn a_full_server_drops_an_idle_connection_for_a_new_client() {
    let dir = TempDir::new("full-idle");
    let limits = Limits {
        idle_timeout: GENEROUS * 6,
        ..short()
    };
    let path = serve(&dir, limits);
    let mut idle: Vec<client::Client> = (0..4)
        .map(|_| client::Client::connect(&path).unwrap())
        .collect();
    for c in &mut idle {
        assert_eq!(c.request("GET", "/", None).unwrap().0, 200);
    }
    let start = Instant::now();
    let (status, _) = client::request(&path, "GET", "/", None).unwrap();
    let took = start.elapsed();
    assert_eq!(status, 200);
    // The idle ones were answered just now: their clients may be about to ask again, so the
    // new client waits in the backlog until one has been idle for evict_after.
    assert!(
        took >= Duration::from_millis(150),
        "answered after {took:?}"
    );
    println!("fifth client answered after {took:?} (evict_after 200 ms)");
    let dropped = idle
        .iter_mut()
        .map(|c| c.request("GET", "/", None))
        .filter(Result::is_err)
        .count();
    assert!(dropped >= 1, "one idle connection made room");
}

#[test]
fn a_full_server_of_silent_clients_makes_room_once_one_was_silent_long_enough() {
    let dir = TempDir::new("full-silent");
    let limits = Limits {
        idle_timeout: GENEROUS * 6,
        ..short()
    };
    let path = serve(&dir, limits);
    let _silent: Vec<UnixStream> = (0..4).map(|_| connect(&path)).collect();
    let start = Instant::now();
    let (status, _) = client::request(&path, "GET", "/", None).unwrap();
    let took = start.elapsed();
    assert_eq!(status, 200);
    assert!(
        took >= Duration::from_millis(150),
        "answered after {took:?}"
    );
    println!("client behind four silent ones answered after {took:?} (evict_after 200 ms)");
}

#[test]
fn a_full_server_of_trickling_clients_makes_room_at_once() {
    let dir = TempDir::new("full-trickle");
    let limits = Limits {
        read_timeout: GENEROUS * 6,
        ..short()
    };
    let path = serve(&dir, limits);
    let mut trickles: Vec<UnixStream> = (0..4)
        .map(|_| {
            let mut s = connect(&path);
            s.write_all(b"GET / HT").unwrap();
            s
        })
        .collect();
    // Let the server read them all before the new client comes.
    thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let (status, _) = client::request(&path, "GET", "/", None).unwrap();
    let took = start.elapsed();
    assert_eq!(status, 200);
    println!("client behind four trickling ones answered after {took:?}");
    // The oldest trickle gave way: its connection ends without an answer.
    assert_eq!(read_to_close(&mut trickles[0]), "");
}

#[test]
fn a_client_that_never_reads_is_dropped_and_others_are_served_meanwhile() {
    let dir = TempDir::new("no-read");
    let path = serve(&dir, short());
    let mut greedy = connect(&path);
    greedy
        .set_write_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    // Pipelined requests whose answers the client never reads; the server stops reading them
    // once its buffer for this client is full, and the socket's buffers fill up.
    let start = Instant::now();
    let request = b"GET / HTTP/1.1\r\n\r\n".repeat(1000);
    let mut writes = 0;
    while start.elapsed() < GENEROUS {
        match greedy.write(&request) {
            Ok(_) => writes += 1,
            Err(_) => break,
        }
        assert_eq!(client::request(&path, "GET", "/", None).unwrap().0, 200);
    }
    // Still not reading for longer than the write timeout, then reading: the answers the
    // sockets held, then the end, well before the answers of all those requests.
    thread::sleep(Duration::from_millis(1000));
    let answered = read_to_close(&mut greedy).matches("HTTP/1.1 200").count();
    assert!(
        answered < writes * 1000,
        "{answered} answers of {}",
        writes * 1000
    );
    println!(
        "non-reading client dropped after {answered} answers of {} requests",
        writes * 1000
    );
}

#[test]
fn the_loop_serves_others_while_the_handler_works_and_keeps_the_order() {
    let dir = TempDir::new("deferred");
    let path = dir.0.join("api.sock");
    // No deadline is under test here: generous ones, so a loaded machine cannot make a waiting
    // request look idle.
    let limits = Limits {
        read_timeout: GENEROUS,
        idle_timeout: GENEROUS,
        write_timeout: GENEROUS,
        ..short()
    };
    let server = ApiServer::bind(&path).unwrap().with_limits(limits);
    let (handed, replies) = mpsc::channel::<(ApiRequest, Reply)>();
    thread::spawn(move || server.serve_deferred(move |r, reply| handed.send((r, reply)).unwrap()));

    let first = thread::spawn({
        let path = path.clone();
        move || client::request(&path, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).unwrap()
    });
    let (request, held) = replies.recv_timeout(GENEROUS).unwrap();
    assert!(matches!(request, ApiRequest::PatchVm(_)));
    // While the handler holds that request, a bad request is refused by the loop itself...
    let (status, body) = client::request(&path, "GET", "/nowhere", None).unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("unknown path /nowhere"), "{body}");
    // ...and a good one waits its turn.
    let second = thread::spawn({
        let path = path.clone();
        move || client::request(&path, "GET", "/", None).unwrap()
    });
    thread::sleep(Duration::from_millis(100));
    assert!(
        replies.try_recv().is_err(),
        "one request at a time reaches the handler"
    );
    held.send(ApiResponse::NoContent);
    assert_eq!(first.join().unwrap().0, 204);
    let (request, reply) = replies.recv_timeout(GENEROUS).unwrap();
    assert_eq!(request, ApiRequest::GetInstanceInfo);
    // A handler that drops the request still gets the client an answer.
    drop(reply);
    let (status, body) = second.join().unwrap();
    assert_eq!(status, 400);
    assert!(
        body.contains("dropped the request without answering"),
        "{body}"
    );
}

#[test]
fn a_request_whose_reply_is_dropped_on_another_thread_is_always_answered() {
    let dir = TempDir::new("dropped");
    let path = dir.0.join("api.sock");
    let server = ApiServer::bind(&path).unwrap();
    // The handler drops each reply on a thread of its own, racing the loop it wakes.
    thread::spawn(move || {
        server.serve_deferred(|_, reply| {
            thread::spawn(move || drop(reply));
        })
    });
    for i in 0..300 {
        let mut c = client::Client::connect(&path).unwrap();
        c.set_timeout(Some(GENEROUS)).unwrap();
        let (status, body) = c
            .request("GET", "/", None)
            .unwrap_or_else(|e| panic!("request {i} got no answer within {GENEROUS:?}: {e}"));
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("dropped the request"), "{body}");
    }
}

#[test]
fn answers_are_counted_until_written() {
    let dir = TempDir::new("unwritten");
    let path = dir.0.join("api.sock");
    let server = ApiServer::bind(&path).unwrap().with_limits(short());
    let unwritten = server.unwritten();
    let (handed, replies) = mpsc::channel::<Reply>();
    thread::spawn(move || server.serve_deferred(move |_, reply| handed.send(reply).unwrap()));
    let asking = thread::spawn({
        let path = path.clone();
        move || client::request(&path, "GET", "/", None).unwrap()
    });
    let reply = replies.recv_timeout(GENEROUS).unwrap();
    assert!(
        !unwritten.wait_written(Duration::from_millis(50)),
        "the handler has not answered"
    );
    reply.send(ApiResponse::NoContent);
    assert!(unwritten.wait_written(GENEROUS));
    assert_eq!(asking.join().unwrap().0, 204);
}
