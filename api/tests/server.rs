//! The API socket end to end: a real `ApiServer` on a Unix socket in a temporary directory,
//! served on a thread with a handler that records what reaches it, driven by the client.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::Duration;

use kiln_api::client::{self, Client};
use kiln_api::requests::instance::{InstanceInfo, InstanceState};
use kiln_api::requests::machine_config::MachineConfig;
use kiln_api::requests::vm::VmState;
use kiln_api::{ApiError, ApiRequest, ApiResponse, ApiServer};

/// A directory of its own for each test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-api-{}-{name}", std::process::id()));
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

/// Binds a server in `dir` and serves it on a thread; every request that reaches the handler
/// comes out of the returned receiver.
fn start(dir: &TempDir) -> (PathBuf, Receiver<ApiRequest>) {
    let path = dir.0.join("api.sock");
    let server = ApiServer::bind(&path).unwrap();
    let (seen, rx) = mpsc::channel();
    thread::spawn(move || {
        server.serve(move |request| {
            let response = match &request {
                ApiRequest::GetInstanceInfo => {
                    ApiResponse::json(&InstanceInfo::new("test-vm", InstanceState::NotStarted))
                }
                ApiRequest::GetMachineConfig => ApiResponse::json(&MachineConfig {
                    vcpu_count: 1,
                    mem_size_mib: 128,
                    smt: false,
                    track_dirty_pages: false,
                    huge_pages: Default::default(),
                    cpu_template: None,
                }),
                ApiRequest::PatchVm(VmState::Resumed) => ApiResponse::fault("the VM is not paused"),
                _ => ApiResponse::NoContent,
            };
            seen.send(request).unwrap();
            response
        })
    });
    (path, rx)
}

fn fault_message(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["fault_message"].as_str().unwrap().to_string()
}

#[test]
fn keep_alive_serves_two_requests_on_one_connection() {
    let dir = TempDir::new("keepalive");
    let (path, seen) = start(&dir);
    let mut client = Client::connect(&path).unwrap();
    let (status, body) = client
        .request(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#),
        )
        .unwrap();
    assert_eq!((status, body.as_str()), (204, ""));
    let (status, body) = client.request("GET", "/", None).unwrap();
    assert_eq!(status, 200);
    let info: InstanceInfo = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (info.app_name.as_str(), info.state),
        ("kiln", InstanceState::NotStarted)
    );

    match seen.recv().unwrap() {
        ApiRequest::PutMachineConfig(m) => assert_eq!((m.vcpu_count, m.mem_size_mib), (2, 256)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(seen.recv().unwrap(), ApiRequest::GetInstanceInfo);
}

#[test]
fn handler_faults_and_bad_bodies_are_400_and_keep_the_connection() {
    let dir = TempDir::new("faults");
    let (path, seen) = start(&dir);
    let mut client = Client::connect(&path).unwrap();
    let (status, body) = client
        .request("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#))
        .unwrap();
    assert_eq!(
        (status, fault_message(&body).as_str()),
        (400, "the VM is not paused")
    );
    assert_eq!(seen.recv().unwrap(), ApiRequest::PatchVm(VmState::Resumed));

    let (status, body) = client
        .request("PUT", "/vsock", Some(r#"{"cid": 3}"#))
        .unwrap();
    assert_eq!(status, 400);
    assert!(
        fault_message(&body).starts_with("vsock: unknown field `cid`"),
        "{body}"
    );
    let (status, body) = client.request("GET", "/no-such-resource", None).unwrap();
    assert_eq!(
        (status, fault_message(&body).as_str()),
        (400, "unknown path /no-such-resource")
    );

    // Still the same connection, and nothing invalid reached the handler.
    let (status, _) = client.request("GET", "/machine-config", None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(seen.recv().unwrap(), ApiRequest::GetMachineConfig);
    assert!(seen.try_recv().is_err());
}

#[test]
fn oversized_request_is_refused() {
    let dir = TempDir::new("oversized");
    let (path, seen) = start(&dir);
    let mut client = Client::connect(&path).unwrap();
    let big = format!(r#"{{"kernel_image_path": "{}"}}"#, "k".repeat(60 * 1024));
    let (status, body) = client.request("PUT", "/boot-source", Some(&big)).unwrap();
    assert_eq!(status, 400);
    assert_eq!(
        fault_message(&body),
        "Request payload with size 61465 is larger than the limit of 51200 allowed by server."
    );
    // The server closed that connection; a new one works.
    assert!(client.request("GET", "/", None).is_err());
    assert_eq!(client::request(&path, "GET", "/", None).unwrap().0, 200);
    assert_eq!(seen.recv().unwrap(), ApiRequest::GetInstanceInfo);
    assert!(seen.try_recv().is_err());
}

#[test]
fn malformed_request_is_answered_400_and_closed() {
    let dir = TempDir::new("malformed");
    let (path, seen) = start(&dir);
    let mut stream = UnixStream::connect(&path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GARBAGE\r\n\r\nGET / HTTP/1.1\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    // read_to_string returning at all shows the server closed the connection.
    stream.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(answer.contains("Connection: close\r\n"), "{answer}");
    assert!(answer.contains("malformed request"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
    assert!(seen.try_recv().is_err());
}

#[test]
fn chunked_request_is_refused() {
    let dir = TempDir::new("chunked");
    let (path, _seen) = start(&dir);
    let mut stream = UnixStream::connect(&path).unwrap();
    stream
        .write_all(b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("Transfer-Encoding"), "{answer}");
}

#[test]
fn one_shot_request_and_pipelining() {
    let dir = TempDir::new("oneshot");
    let (path, seen) = start(&dir);
    let (status, body) = client::request(
        &path,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    )
    .unwrap();
    assert_eq!((status, body.as_str()), (204, ""));
    assert!(matches!(seen.recv().unwrap(), ApiRequest::PutAction(_)));

    // Two requests in one write are answered in order.
    let mut stream = UnixStream::connect(&path).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\n\r\nGET /vm/config HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 1, "{answer}");
    assert_eq!(
        answer.matches("HTTP/1.1 204 No Content").count(),
        1,
        "{answer}"
    );
    assert_eq!(seen.recv().unwrap(), ApiRequest::GetInstanceInfo);
    assert_eq!(seen.recv().unwrap(), ApiRequest::GetVmConfig);
}

#[test]
fn listening_as_soon_as_bind_returns() {
    let dir = TempDir::new("early");
    let path = dir.0.join("api.sock");
    let server = ApiServer::bind(&path).unwrap();
    // Connect and send before anything serves: the kernel queues both.
    let mut stream = UnixStream::connect(&path).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    thread::spawn(move || server.serve(|_| ApiResponse::NoContent));
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 204 No Content\r\n"),
        "{answer}"
    );
}

#[test]
fn an_idle_connection_does_not_block_others() {
    let dir = TempDir::new("idle");
    let (path, _seen) = start(&dir);
    let _idle = Client::connect(&path).unwrap();
    let mut half_sent = UnixStream::connect(&path).unwrap();
    half_sent
        .write_all(b"PUT /vm HTTP/1.1\r\nContent-Le")
        .unwrap();
    let (status, _) = client::request(&path, "GET", "/", None).unwrap();
    assert_eq!(status, 200);
}

#[test]
fn bind_refuses_an_existing_path() {
    let dir = TempDir::new("exists");
    let path = dir.0.join("api.sock");
    let _server = ApiServer::bind(&path).unwrap();
    // Bound under a temporary name and linked: nothing else is left in the directory.
    let names: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["api.sock"]);
    let e = ApiServer::bind(&path).unwrap_err();
    assert!(matches!(e, ApiError::SocketExists(_)), "{e}");
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");

    let file = dir.0.join("file");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(
        ApiServer::bind(&file),
        Err(ApiError::SocketExists(_))
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let e = ApiServer::bind(dir.0.join("no/such/dir/api.sock")).unwrap_err();
    assert!(matches!(e, ApiError::Bind { .. }), "{e}");
}
