#![allow(dead_code)] // each test binary uses a different subset of these helpers
//! Shared pieces of the agent's host tests: a real `kiln-agent` process listening on a Unix
//! socket in a scratch directory, a Firecracker-style vsock proxy in front of it, and
//! deterministic test data.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use kiln_agent::client::{self, Client};

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-agent-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The agent binary under test: this build's, or `$KILN_TEST_AGENT` (to run the suite against
/// another build, e.g. the static release one).
pub fn agent_bin() -> String {
    std::env::var("KILN_TEST_AGENT")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_kiln-agent").to_string())
}

/// The agents' output grace in these tests, in ms (`KILN_OUTPUT_GRACE_MS`).
pub const GRACE_MS: u64 = 60_000;

/// A running agent binary.
pub struct Agent {
    pub child: Child,
    pub dir: PathBuf,
    pub sock: PathBuf,
}

impl Agent {
    /// Starts `kiln-agent --listen unix:<scratch>/agent.sock` and waits for the socket.
    pub fn start(name: &str) -> Agent {
        let dir = scratch(name);
        let sock = dir.join("agent.sock");
        let child = Command::new(agent_bin())
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            // A grace no exec can be mistaken for: one that waited it out took a minute.
            .env("KILN_OUTPUT_GRACE_MS", GRACE_MS.to_string())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn kiln-agent");
        let end = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < end, "agent socket never appeared");
            thread::sleep(Duration::from_millis(10));
        }
        Agent { child, dir, sock }
    }

    /// A new connection.
    pub fn client(&self) -> Client {
        client::connect_unix(&self.sock).expect("connect to the agent")
    }

    /// The agent's resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Waits up to `limit` for the agent to exit; its status code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > end {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Stands in for a VMM's vsock Unix socket at `path`: answers each `CONNECT <port>` line with
/// `answer` (a closure of the port), and when it starts with `OK`, splices the connection to
/// the agent socket `agent`.
pub fn vsock_proxy(
    path: &Path,
    agent: PathBuf,
    answer: impl Fn(&str) -> Option<String> + Send + 'static,
) {
    let listener = UnixListener::bind(path).unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut line = String::new();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let Some(reply) = answer(line.trim_end()) else {
                continue; // close without answering
            };
            let mut conn = conn;
            let _ = conn.write_all(reply.as_bytes());
            if !reply.starts_with("OK") {
                continue;
            }
            let upstream = UnixStream::connect(&agent).unwrap();
            splice(reader.into_inner(), upstream);
        }
    });
}

fn splice(a: UnixStream, b: UnixStream) {
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    thread::spawn(move || copy_then_shutdown(a, b));
    thread::spawn(move || copy_then_shutdown(b2, a2));
}

fn copy_then_shutdown(mut from: UnixStream, mut to: UnixStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// A deterministic byte source of `len` bytes.
pub struct Pattern {
    state: u64,
    left: u64,
}

impl Pattern {
    pub fn new(seed: u64, len: u64) -> Pattern {
        Pattern {
            state: seed | 1,
            left: len,
        }
    }
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.left as usize);
        for b in &mut buf[..n] {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            *b = self.state as u8;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// The hex SHA-256 of everything `r` yields.
pub fn sha256_of(mut r: impl Read) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("{:x}", h.finalize())
}

/// A `Write` that hashes and counts.
#[derive(Default)]
pub struct HashWriter {
    pub hasher: sha2::Sha256,
    pub len: u64,
}

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sha2::Digest::update(&mut self.hasher, buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl HashWriter {
    pub fn hex(self) -> String {
        format!("{:x}", sha2::Digest::finalize(self.hasher))
    }
}
