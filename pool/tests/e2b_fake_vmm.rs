//! kilnd's E2B listener end to end on the host, with the stand-in VMM (the real agent code
//! in-process, the "guest" being this host): E2B's REST lifecycle behind its API key, and envd
//! over Connect — JSON over HTTP/1.1 and protobuf over HTTP/2 cleartext, server and client
//! streams — for processes (start, output, exit codes, background processes found again by pid
//! and tag, stdin, signals) and the filesystem, `/files` uploads (multipart, octet-stream,
//! gzip, 2 GiB streamed) and downloads, and the refusals the SDK maps to its exceptions.

#[path = "../../cli/tests/fake_vmm/vmm.rs"]
mod fake_vmm;
#[path = "common/kilnd_daemon.rs"]
mod kilnd_daemon;

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::Request;
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use kiln_pool::e2b::proto::process::{
    ProcessConfig, StartRequest, StartResponse, process_event, process_event::data_event,
};
use kiln_pool::template::spec::Spec;
use kiln_pool::types::BuildEvent;
use prost::Message;
use serde_json::{Value, json};

const KEY: &str = "e2b_test_key_0123456789abcdef";

fn main() {
    fake_vmm::main(&[("e2b_api_with_a_stand_in_vmm", end_to_end)]);
}

/// kilnd with its E2B listener on a port of its own.
struct Daemon {
    d: kilnd_daemon::Daemon,
    port: u16,
}

fn start_kilnd(dir: &Path) -> Daemon {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = kilnd_daemon::command(dir);
    cmd.args(["--e2b-listen", &format!("127.0.0.1:{port}")])
        .env("KILND_E2B_API_KEY", KEY)
        .env("KILN_FAKE_VMM_CREATE_FAULT_IF", dir.join("create-fault"));
    let d = kilnd_daemon::Daemon::spawn(dir, cmd);
    kilnd_daemon::wait_listening(dir, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    Daemon { d, port }
}

/// An HTTP answer.
struct Answer {
    status: u16,
    headers: hyper::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// A connection to the E2B listener, HTTP/1.1 or HTTP/2 (prior knowledge).
struct Http {
    rt: tokio::runtime::Runtime,
    port: u16,
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

impl Http {
    fn send(&self, h2: bool, req: Request<Body>) -> hyper::Response<hyper::body::Incoming> {
        self.rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .unwrap();
            let io = TokioIo::new(tcp);
            if h2 {
                let (mut s, conn) =
                    hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                        .await
                        .unwrap();
                tokio::spawn(conn);
                s.send_request(req).await.unwrap()
            } else {
                let (mut s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                tokio::spawn(conn);
                s.send_request(req).await.unwrap()
            }
        })
    }

    fn call(&self, h2: bool, req: Request<Body>) -> Answer {
        let resp = self.send(h2, req);
        let (parts, body) = resp.into_parts();
        let body = self
            .rt
            .block_on(body.collect())
            .unwrap()
            .to_bytes()
            .to_vec();
        Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    /// A REST call with the API key.
    fn rest(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("x-api-key", KEY);
        if body.is_some() {
            b = b.header("content-type", "application/json");
        }
        let body = body.map_or_else(|| full(Bytes::new()), |v| full(v.to_string()));
        self.call(false, b.body(body).unwrap())
    }
}

/// An envd request for sandbox `id` with `token`.
fn envd(id: &str, token: &str, method: &str, path: &str) -> hyper::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("e2b-sandbox-id", id)
        .header("e2b-sandbox-port", "49983")
        .header("x-access-token", token)
}

fn envelope(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Splits a stream body into (flags, payload) envelopes.
fn envelopes(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        out.push((body[0], body[5..5 + len].to_vec()));
        body = &body[5 + len..];
    }
    assert!(
        body.is_empty(),
        "{} stray bytes after the envelopes",
        body.len()
    );
    out
}

/// A JSON unary call on envd.
fn unary(h: &Http, id: &str, token: &str, method: &str, msg: Value) -> Answer {
    h.call(
        false,
        envd(id, token, "POST", &format!("/{method}"))
            .header("content-type", "application/json")
            .body(full(msg.to_string()))
            .unwrap(),
    )
}

/// A JSON server-stream call run to its end: the messages and the end-of-stream object.
fn stream(h: &Http, id: &str, token: &str, method: &str, msg: Value) -> (Vec<Value>, Value) {
    let a = h.call(
        false,
        envd(id, token, "POST", &format!("/{method}"))
            .header("content-type", "application/connect+json")
            .body(full(envelope(msg.to_string().as_bytes())))
            .unwrap(),
    );
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let mut msgs = Vec::new();
    let mut end = Value::Null;
    for (flags, data) in envelopes(&a.body) {
        let v: Value = serde_json::from_slice(&data).unwrap();
        if flags & 2 != 0 {
            end = v;
        } else {
            msgs.push(v);
        }
    }
    (msgs, end)
}

/// Stdout, stderr and the end event of a process's JSON events.
fn collect(events: &[Value]) -> (String, String, Value) {
    let b64 = |v: &Value| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    let (mut out, mut err, mut end) = (String::new(), String::new(), Value::Null);
    for e in events {
        let ev = &e["event"];
        if let Some(d) = ev.get("data") {
            if let Some(s) = d.get("stdout") {
                out += &b64(s);
            }
            if let Some(s) = d.get("stderr") {
                err += &b64(s);
            }
        }
        if let Some(x) = ev.get("end") {
            end = x.clone();
        }
    }
    (out, err, end)
}

fn start_msg(script: &str) -> Value {
    json!({"process": {"cmd": "sh", "args": ["-c", script]}, "stdin": false})
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn end_to_end() {
    let dir = std::env::temp_dir().join(format!("kilnd-e2b-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tree/etc")).unwrap();
    std::fs::write(dir.join("vmlinux"), "kernel").unwrap();
    std::fs::write(dir.join("agent"), vec![0x7f; 4096]).unwrap();
    let out = dir.display().to_string();
    let d = start_kilnd(&dir);
    let k = d.d.client();
    let spec = Spec::parse(&format!(
        "name = \"t\"\nenv = {{ WHO = \"template\" }}\n[from]\ndir = \"{out}/tree\"\n"
    ))
    .unwrap();
    assert!(matches!(
        k.build(&spec, |_| {}).unwrap(),
        BuildEvent::Done { .. }
    ));
    let h = Http {
        rt: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
        port: d.port,
    };

    // The API key is checked; unknown things are named.
    let mut no_key = Request::builder().uri("/v2/sandboxes").header("host", "x");
    assert_eq!(
        h.call(false, no_key.body(full(Bytes::new())).unwrap())
            .status,
        401
    );
    no_key = Request::builder()
        .uri("/v2/sandboxes")
        .header("host", "x")
        .header("x-api-key", "e2b_wrong_key_00000000000");
    assert_eq!(
        h.call(false, no_key.body(full(Bytes::new())).unwrap())
            .status,
        401
    );
    let a = h.rest("POST", "/v2/sandboxes", Some(json!({"templateID": "nope"})));
    assert_eq!(a.status, 404);
    assert!(a.json()["message"].as_str().unwrap().contains("nope"));
    // The network: what kilnd cannot express is refused by name, the rest mapped to a policy.
    let a = h.rest(
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "t", "network": {"allowOut": ["1.1.1.1"]}})),
    );
    let msg = a.json()["message"].as_str().unwrap().to_string();
    assert!(
        a.status == 400 && msg.starts_with("network.allowOut: \"1.1.1.1\": "),
        "{msg}"
    );
    let a = h.rest(
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "t", "allow_internet_access": true,
                    "network": {"denyOut": ["8.8.8.0/24"]}})),
    );
    let msg = a.json()["message"].as_str().unwrap().to_string();
    assert!(
        a.status == 400 && msg.starts_with("network.denyOut: "),
        "{msg}"
    );
    let a = h.rest(
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "t",
                    "network": {"allowOut": ["pypi.org"], "denyOut": ["0.0.0.0/0"]}})),
    );
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let nid = a.json()["sandboxID"].as_str().unwrap().to_string();
    let info = k.sandbox(&nid).unwrap();
    assert_eq!(
        (info.network.allow_domains, info.network.allow_net),
        (vec!["pypi.org".to_string()], false)
    );
    let detail = h.rest("GET", &format!("/sandboxes/{nid}"), None).json();
    assert_eq!(detail["allowInternetAccess"], false);
    assert_eq!(
        h.rest("DELETE", &format!("/sandboxes/{nid}"), None).status,
        204
    );

    // Create, as the SDK does. Saying nothing of the network gets the template's default policy
    // (kilnd's --e2b-internet-default is deny): no egress.
    let a = h.rest(
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "t", "metadata": {"team": "x"}, "envVars": {"A": "from-env"}})),
    );
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let sb = a.json();
    let id = sb["sandboxID"].as_str().unwrap().to_string();
    let info = k.sandbox(&id).unwrap();
    assert!(info.network.allow_domains.is_empty() && !info.network.allow_net);
    let token = sb["envdAccessToken"].as_str().unwrap().to_string();
    assert_eq!(sb["envdVersion"], "0.5.7");
    assert_eq!(sb["templateID"], "t");

    // A command over JSON/HTTP 1.1: output, stderr, the environment, the exit code.
    let (events, end) = stream(
        &h,
        &id,
        &token,
        "process.Process/Start",
        start_msg("echo $A-$WHO; echo oops >&2; exit 3"),
    );
    assert_eq!(end, json!({}), "a clean end of stream");
    assert!(events[0]["event"]["start"]["pid"].as_u64().unwrap() > 0);
    let (stdout, stderr, exit) = collect(&events);
    assert_eq!(
        (stdout.as_str(), stderr.as_str()),
        ("from-env-template\n", "oops\n")
    );
    assert_eq!(exit["exitCode"], 3);
    assert_eq!(exit["exited"], true);
    assert_eq!(exit["status"], "exit status 3");

    // The same over protobuf and HTTP/2 cleartext.
    let start = StartRequest {
        process: Some(ProcessConfig {
            cmd: "sh".into(),
            args: vec!["-c".into(), "printf h2; kill -TERM $$".into()],
            envs: Default::default(),
            cwd: Some(out.clone()),
        }),
        pty: None,
        tag: None,
        stdin: Some(false),
    };
    let a = h.call(
        true,
        envd(&id, &token, "POST", "/process.Process/Start")
            .header("content-type", "application/connect+proto")
            .body(full(envelope(&start.encode_to_vec())))
            .unwrap(),
    );
    assert_eq!(a.status, 200);
    assert_eq!(
        a.headers["content-type"].to_str().unwrap(),
        "application/connect+proto"
    );
    let frames = envelopes(&a.body);
    let (mut got, mut end) = (Vec::new(), None);
    for (flags, data) in &frames[..frames.len() - 1] {
        assert_eq!(*flags, 0);
        let ev = StartResponse::decode(&data[..])
            .unwrap()
            .event
            .unwrap()
            .event;
        match ev {
            Some(process_event::Event::Data(d)) => {
                if let Some(data_event::Output::Stdout(b)) = d.output {
                    got.extend(b);
                }
            }
            Some(process_event::Event::End(e)) => end = Some(e),
            _ => {}
        }
    }
    assert_eq!(got, b"h2");
    let end = end.unwrap();
    assert_eq!(
        (end.exited, end.status.as_str()),
        (false, "signal: terminated")
    );
    assert_eq!(
        frames.last().unwrap().0,
        2,
        "the stream ends with an end-of-stream envelope"
    );

    // A background process: abandon its stream mid-way, find it listed, feed its stdin, follow it
    // again by tag.
    let mut bg = start_msg("echo one; read x; echo got $x; exit 4");
    bg["stdin"] = json!(true);
    bg["tag"] = json!("bg");
    let resp = h.send(
        false,
        envd(&id, &token, "POST", "/process.Process/Start")
            .header("content-type", "application/connect+json")
            .body(full(envelope(bg.to_string().as_bytes())))
            .unwrap(),
    );
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("b25lCg==") {
        let frame = h.rt.block_on(body.frame()).unwrap().unwrap();
        if let Ok(data) = frame.into_data() {
            seen.extend_from_slice(&data);
        }
    }
    drop(body);
    let streams = || {
        h.rest("GET", "/kiln/streams", None).json()["open"]
            .as_u64()
            .unwrap()
    };
    wait_for("the abandoned stream to be let go", || streams() == 0);
    let list = unary(&h, &id, &token, "process.Process/List", json!({})).json();
    let procs = list["processes"].as_array().unwrap();
    let p = procs.iter().find(|p| p["tag"] == "bg").expect("listed");
    let pid = p["pid"].as_u64().unwrap();
    assert_eq!(p["config"]["cmd"], "sh");
    let a = unary(
        &h,
        &id,
        &token,
        "process.Process/SendInput",
        json!({"process": {"pid": pid}, "input": {"stdin": "aGkK"}}),
    );
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let (events, end) = stream(
        &h,
        &id,
        &token,
        "process.Process/Connect",
        json!({"process": {"tag": "bg"}}),
    );
    assert_eq!(end, json!({}));
    let (stdout, _, exit) = collect(&events);
    assert_eq!(stdout, "got hi\n");
    assert_eq!(exit["exitCode"], 4);

    // Stdin through a client stream, then closed; signals; unknown pids are not_found.
    let mut cat = json!({"process": {"cmd": "cat"}, "stdin": true});
    cat["tag"] = json!("cat");
    let resp = h.send(
        false,
        envd(&id, &token, "POST", "/process.Process/Start")
            .header("content-type", "application/connect+json")
            .body(full(envelope(cat.to_string().as_bytes())))
            .unwrap(),
    );
    drop(resp);
    wait_for("cat to be listed", || {
        unary(&h, &id, &token, "process.Process/List", json!({})).json()["processes"]
            .as_array()
            .is_some_and(|l| l.iter().any(|p| p["tag"] == "cat"))
    });
    let mut input = Vec::new();
    for m in [
        json!({"start": {"process": {"tag": "cat"}}}),
        json!({"data": {"input": {"stdin": "c3RyZWFt"}}}),
        json!({"keepalive": {}}),
        json!({"data": {"input": {"stdin": "ZWQ="}}}),
    ] {
        input.extend(envelope(m.to_string().as_bytes()));
    }
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = input
        .chunks(7)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let a = h.call(
        true,
        envd(&id, &token, "POST", "/process.Process/StreamInput")
            .header("content-type", "application/connect+json")
            .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                chunks,
            ))))
            .unwrap(),
    );
    let frames = envelopes(&a.body);
    assert_eq!(frames.last().unwrap().1, b"{}", "{frames:?}");
    let a = unary(
        &h,
        &id,
        &token,
        "process.Process/CloseStdin",
        json!({"process": {"tag": "cat"}}),
    );
    assert_eq!(a.status, 200);
    let (events, _) = stream(
        &h,
        &id,
        &token,
        "process.Process/Connect",
        json!({"process": {"tag": "cat"}}),
    );
    let (stdout, _, exit) = collect(&events);
    // proto3's JSON leaves zero values out: an absent exitCode is 0.
    assert_eq!(stdout, "streamed");
    assert_eq!(
        (exit["exitCode"].as_i64(), exit["exited"].as_bool()),
        (None, Some(true))
    );
    let a = unary(
        &h,
        &id,
        &token,
        "process.Process/SendSignal",
        json!({"process": {"pid": 999999}, "signal": "SIGNAL_SIGKILL"}),
    );
    assert_eq!(
        (a.status, a.json()["code"].as_str()),
        (404, Some("not_found"))
    );

    // The filesystem service, paths relative to root's home resolved, absolute ones as given.
    let fs = |m: &str, v: Value| unary(&h, &id, &token, &format!("filesystem.Filesystem/{m}"), v);
    let a = fs("MakeDir", json!({"path": format!("{out}/w/a/b")}));
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["entry"]["type"], "FILE_TYPE_DIRECTORY");
    let a = fs("MakeDir", json!({"path": format!("{out}/w/a/b")}));
    assert_eq!(
        (a.status, a.json()["code"].as_str()),
        (409, Some("already_exists"))
    );
    std::fs::write(dir.join("w/a/f.txt"), "12345").unwrap();
    let a = fs("Stat", json!({"path": format!("{out}/w/a/f.txt")}));
    let e = &a.json()["entry"];
    assert_eq!(
        (e["name"].as_str(), e["size"].as_str()),
        (Some("f.txt"), Some("5"))
    );
    assert_eq!(e["permissions"], "-rw-r--r--");
    let a = fs(
        "Move",
        json!({"source": format!("{out}/w/a/f.txt"), "destination": format!("{out}/w/c/g.txt")}),
    );
    assert_eq!(a.json()["entry"]["path"], format!("{out}/w/c/g.txt"));
    let a = fs("ListDir", json!({"path": format!("{out}/w"), "depth": 2}));
    let mut names: Vec<String> = a.json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["path"]
                .as_str()
                .unwrap()
                .trim_start_matches(&out)
                .to_string()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["/w/a", "/w/a/b", "/w/c", "/w/c/g.txt"]);
    assert_eq!(
        fs("Remove", json!({"path": format!("{out}/w/c")})).status,
        200
    );
    let a = fs("Stat", json!({"path": format!("{out}/w/c")}));
    assert_eq!(
        (a.status, a.json()["code"].as_str()),
        (404, Some("not_found"))
    );
    let a = fs("WatchDir", json!({"path": "/"}));
    assert_eq!(a.status, 415, "WatchDir is a stream");

    // /files: multipart (two files named by their parts), octet-stream, gzip; downloads.
    let files = |b: hyper::http::request::Builder, body: Body| h.call(false, b.body(body).unwrap());
    let mp = format!(
        "--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{out}/up/one\"\r\n\r\nfirst\r\n--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{out}/up/two\"\r\n\r\nsecond\r\n--XX--\r\n"
    );
    let a = files(
        envd(&id, &token, "POST", "/files")
            .header("content-type", "multipart/form-data; boundary=XX"),
        full(mp),
    );
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()[1]["path"], format!("{out}/up/two"));
    assert_eq!(
        std::fs::read_to_string(dir.join("up/one")).unwrap(),
        "first"
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b"zipped bytes").unwrap();
    let a = files(
        envd(&id, &token, "POST", &format!("/files?path={out}/up/z"))
            .header("content-type", "application/octet-stream")
            .header("content-encoding", "gzip"),
        full(gz.finish().unwrap()),
    );
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let a = files(
        envd(&id, &token, "GET", &format!("/files?path={out}/up/z")),
        full(Bytes::new()),
    );
    assert_eq!((a.status, a.body.as_slice()), (200, &b"zipped bytes"[..]));
    let a = files(
        envd(&id, &token, "GET", &format!("/files?path={out}/up/none")),
        full(Bytes::new()),
    );
    assert_eq!((a.status, a.json()["code"].as_u64()), (404, Some(404)));
    let a = files(
        envd(&id, &token, "GET", &format!("/files?path={out}/up")),
        full(Bytes::new()),
    );
    assert_eq!(a.status, 400);

    // A 2 GiB upload streams through without being held whole.
    let before = rss_kib(d.d.pid());
    let chunk = Bytes::from(vec![b'x'; 1 << 20]);
    let body = futures_util::stream::iter(
        (0..2048).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))),
    );
    let a = files(
        envd(&id, &token, "POST", "/files?path=/dev/null")
            .header("content-type", "application/octet-stream"),
        BodyExt::boxed(StreamBody::new(body)),
    );
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let grew = rss_kib(d.d.pid()).saturating_sub(before);
    assert!(
        grew < 256 * 1024,
        "kilnd grew by {grew} KiB over a 2 GiB upload"
    );

    // Refusals the SDK maps: bad protobuf, content type, tokens, unknown sandbox or port.
    let a = h.call(
        false,
        envd(&id, &token, "POST", "/filesystem.Filesystem/Stat")
            .header("content-type", "application/proto")
            .body(full(vec![0x0a, 0xff, 0xff]))
            .unwrap(),
    );
    assert_eq!(
        (a.status, a.json()["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    let a = h.call(
        false,
        envd(&id, &token, "POST", "/filesystem.Filesystem/Stat")
            .header("content-type", "text/plain")
            .body(full("x"))
            .unwrap(),
    );
    assert_eq!(a.status, 415);
    let a = unary(&h, &id, "not-the-token", "process.Process/List", json!({}));
    assert_eq!(
        (a.status, a.json()["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    let a = unary(
        &h,
        "nosuchsandbox",
        &token,
        "process.Process/List",
        json!({}),
    );
    assert_eq!(a.status, 502);
    assert!(
        a.json()["message"]
            .as_str()
            .unwrap()
            .contains("was not found")
    );
    let a = h.call(
        false,
        Request::builder()
            .uri("/health")
            .header("host", "localhost")
            .header("e2b-sandbox-id", &id)
            .header("e2b-sandbox-port", "8080")
            .header("x-access-token", &token)
            .body(full(Bytes::new()))
            .unwrap(),
    );
    assert!(
        a.status == 502
            && a.json()["message"]
                .as_str()
                .unwrap()
                .contains("port is not open")
    );
    assert_eq!(
        h.call(
            false,
            envd(&id, &token, "GET", "/health")
                .body(full(Bytes::new()))
                .unwrap()
        )
        .status,
        204
    );

    // Lifecycle: list and filters, detail, timeout, pause (twice), connect (resumes, then finds
    // it running), fork, kill.
    let a = h.rest("GET", "/v2/sandboxes?state=running&metadata=team%3Dx", None);
    let listed = a.json();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["sandboxID"], id.as_str());
    assert!(listed[0]["startedAt"].as_str().unwrap().ends_with('Z'));
    let a = h.rest("GET", "/v2/sandboxes?metadata=team%3Dy", None);
    assert_eq!(a.json(), json!([]));
    assert_eq!(
        h.rest("GET", &format!("/sandboxes/{id}"), None).json()["envdAccessToken"],
        token.as_str()
    );
    assert_eq!(
        h.rest(
            "POST",
            &format!("/sandboxes/{id}/timeout"),
            Some(json!({"timeout": 600}))
        )
        .status,
        204
    );
    assert_eq!(
        h.rest("POST", &format!("/sandboxes/{id}/pause"), Some(json!({})))
            .status,
        204
    );
    assert_eq!(
        h.rest("POST", &format!("/sandboxes/{id}/pause"), Some(json!({})))
            .status,
        409
    );
    let a = unary(&h, &id, &token, "process.Process/List", json!({}));
    assert!(
        a.status == 502
            && a.json()["message"]
                .as_str()
                .unwrap()
                .contains("was not found")
    );
    assert_eq!(
        h.rest("GET", "/v2/sandboxes?state=paused", None).json()[0]["state"],
        "paused"
    );
    let a = h.rest(
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({"timeout": 300})),
    );
    assert_eq!(a.status, 201);
    assert_eq!(
        a.json()["envdAccessToken"],
        token.as_str(),
        "a resumed sandbox keeps its token"
    );
    assert_eq!(
        h.rest(
            "POST",
            &format!("/v2/sandboxes/{id}/connect"),
            Some(json!({}))
        )
        .status,
        200
    );
    let a = h.rest(
        "POST",
        &format!("/sandboxes/{id}/fork"),
        Some(json!({"count": 2})),
    );
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let forks = a.json();
    let f0 = forks[0]["sandbox"].clone();
    let (fid, ftoken) = (
        f0["sandboxID"].as_str().unwrap(),
        f0["envdAccessToken"].as_str().unwrap(),
    );
    assert_ne!(ftoken, token, "forks get their own token");
    let (events, _) = stream(
        &h,
        fid,
        ftoken,
        "process.Process/Start",
        start_msg("echo $A"),
    );
    assert_eq!(collect(&events).0, "from-env\n");
    assert_eq!(
        unary(&h, fid, &token, "process.Process/List", json!({})).status,
        401
    );
    assert_eq!(
        h.rest("GET", "/templates", None).json()[0]["aliases"][0],
        "t"
    );
    snapshots(&h, &id, &token, &dir.join("state/templates"));
    for s in h
        .rest("GET", "/v2/sandboxes", None)
        .json()
        .as_array()
        .unwrap()
    {
        let sid = s["sandboxID"].as_str().unwrap();
        assert_eq!(
            h.rest("DELETE", &format!("/sandboxes/{sid}"), None).status,
            204
        );
    }
    assert_eq!(
        h.rest("DELETE", &format!("/sandboxes/{id}"), None).status,
        404
    );
    // The killed sandbox's token opens nothing, not even a new sandbox.
    let a = h.rest("POST", "/v2/sandboxes", Some(json!({"templateID": "t"})));
    let new_id = a.json()["sandboxID"].as_str().unwrap().to_string();
    assert_eq!(
        unary(&h, &new_id, &token, "process.Process/List", json!({})).status,
        401
    );
    assert_eq!(
        h.rest("DELETE", &format!("/sandboxes/{new_id}"), None)
            .status,
        204
    );
    assert_eq!(streams(), 0);
    // The replaced snapshot's files went with its last sandbox; the named one outlived its
    // source and every sandbox: it starts sandboxes, then is deleted.
    let folders = || {
        std::fs::read_dir(dir.join("state/templates"))
            .unwrap()
            .count()
    };
    assert_eq!(folders(), 2);
    let a = h.rest(
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "snap1"})),
    );
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let sid = a.json()["sandboxID"].as_str().unwrap().to_string();
    assert_eq!(
        h.rest("DELETE", "/templates/snap1", None).status,
        409,
        "a snapshot in use stays"
    );
    assert_eq!(
        h.rest("DELETE", &format!("/sandboxes/{sid}"), None).status,
        204
    );
    assert_eq!(h.rest("DELETE", "/templates/snap1", None).status, 204);
    assert_eq!(h.rest("GET", "/snapshots", None).json(), json!([]));
    assert_eq!(folders(), 1);
    assert_eq!(h.rest("DELETE", "/templates/snap1", None).status, 404);
    assert_eq!(
        h.rest("DELETE", "/templates/t", None).status,
        501,
        "built templates are kiln template rm's"
    );
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Snapshots of running sandbox `id`: refusals, a named one, sandboxes from it, the source
/// running on, a replacement under the same name, and the list.
fn snapshots(h: &Http, id: &str, token: &str, templates: &Path) {
    let snap =
        |sid: &str, body: Value| h.rest("POST", &format!("/sandboxes/{sid}/snapshots"), Some(body));
    let a = snap("nope", json!({}));
    assert_eq!(a.status, 404);
    assert_eq!(a.json()["message"], "sandbox nope not found");
    let a = snap(id, json!({"memory": false}));
    assert_eq!(a.status, 400);
    assert!(
        a.json()["message"]
            .as_str()
            .unwrap()
            .contains("memory: false")
    );
    assert_eq!(a.json()["error_code"], "snapshot_filesystem_only_disabled");
    let a = snap(id, json!({"name": "Bad Name"}));
    assert_eq!(a.status, 400);
    assert!(
        a.json()["message"]
            .as_str()
            .unwrap()
            .contains("\"Bad Name\"")
    );
    assert_eq!(
        snap(id, json!({"name": "t"})).status,
        409,
        "a built template's name"
    );
    let folders = || std::fs::read_dir(templates).unwrap().count();
    assert_eq!(folders(), 1, "refusals leave no folder");
    // A snapshot the VMM fails leaves no record and no folder, and the sandbox runs on.
    let fault = templates.join("../../create-fault");
    std::fs::write(&fault, "").unwrap();
    let a = snap(id, json!({"name": "failed"}));
    std::fs::remove_file(&fault).unwrap();
    assert_eq!(a.status, 500, "{}", String::from_utf8_lossy(&a.body));
    assert!(
        a.json()["message"]
            .as_str()
            .unwrap()
            .contains("cannot create /x/memory")
    );
    assert_eq!(folders(), 1, "a failed snapshot leaves no folder");
    assert_eq!(h.rest("GET", "/snapshots", None).json(), json!([]));
    let (events, _) = stream(h, id, token, "process.Process/Start", start_msg("echo ok"));
    assert_eq!(collect(&events).0, "ok\n");

    let a = snap(id, json!({"name": "snap1"}));
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json(), json!({"snapshotID": "snap1", "names": ["snap1"]}));
    let (events, _) = stream(h, id, token, "process.Process/Start", start_msg("echo on"));
    assert_eq!(collect(&events).0, "on\n", "the source runs on");
    let a = h.rest(
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "snap1"})),
    );
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let made = a.json();
    assert_eq!(made["templateID"], "snap1");
    let (sid, stoken) = (
        made["sandboxID"].as_str().unwrap(),
        made["envdAccessToken"].as_str().unwrap(),
    );
    let (events, _) = stream(
        h,
        sid,
        stoken,
        "process.Process/Start",
        start_msg("echo $A"),
    );
    assert_eq!(collect(&events).0, "from-env\n", "the source's environment");

    // The same name again: the name moves to the new snapshot; the old one's files stay while
    // a sandbox runs from it.
    assert_eq!(snap(id, json!({"name": "snap1"})).status, 201);
    assert_eq!(folders(), 3);
    let names: Vec<Value> = h
        .rest("GET", "/templates", None)
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["aliases"][0].clone())
        .collect();
    assert_eq!(names, [json!("snap1"), json!("t")]);
    let a = snap(id, json!({}));
    assert_eq!(a.status, 201);
    let unnamed = a.json()["snapshotID"].as_str().unwrap().to_string();
    assert!(unnamed.starts_with("snapshot-"), "{unnamed}");

    let list = h
        .rest("GET", &format!("/snapshots?sandboxID={id}"), None)
        .json();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(
        h.rest("GET", &format!("/snapshots?sandboxID={sid}"), None)
            .json(),
        json!([])
    );
    let a = h.rest("GET", "/snapshots?limit=1", None);
    assert_eq!(a.json().as_array().unwrap().len(), 1);
    let next = a.headers["x-next-token"].to_str().unwrap().to_string();
    let a = h.rest("GET", &format!("/snapshots?limit=1&nextToken={next}"), None);
    assert_eq!(a.json().as_array().unwrap().len(), 1);
    assert!(!a.headers.contains_key("x-next-token"));
    let a = h.rest("GET", "/snapshots?name=snap1:default", None).json();
    assert_eq!(a, json!([{"snapshotID": "snap1", "names": ["snap1"]}]));
    assert_eq!(
        h.rest("DELETE", &format!("/templates/{unnamed}"), None)
            .status,
        204
    );

    // A paused sandbox is refused.
    assert_eq!(
        h.rest("POST", &format!("/sandboxes/{sid}/pause"), Some(json!({})))
            .status,
        204
    );
    let a = snap(sid, json!({}));
    assert_eq!(a.status, 409);
    assert!(a.json()["message"].as_str().unwrap().contains("paused"));
}
