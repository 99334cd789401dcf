//! E2B's own Python SDK, a pinned release from PyPI in a venv this module makes, against kilnd:
//! in the lab through forwarded ports ([`lab`]: the suite `tests/e2b`, after the lab tests in
//! the same L1 boot under `cargo xtask test`, and `bench e2b`), or on the host with the stand-in
//! VMM ([`host`]).
//!
//! The venv, its pinned versions and the port plumbing are here so that other suites (Kiln's own
//! SDK) can reuse them: [`venv`], [`free_port`], [`Forwarded`].

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::util::{self, Result};

mod bench;
mod host;
mod lab;

pub use bench::run_bench;
pub use host::run_host_suite;
pub use lab::{Before, run_suite};

/// The `e2b` release the suite runs (its version is recorded in the venv's `versions.txt`).
pub const E2B_VERSION: &str = "2.63.0";
/// The pytest release that runs it.
pub const PYTEST_VERSION: &str = "8.4.2";

/// The venv with the pinned `e2b` and pytest, made on first use under the cache and reused:
/// `<cache>/e2b-venv/<e2b>-<pytest>/`. Its `versions.txt` records what pip installed.
pub fn venv() -> Result<PathBuf> {
    let dir = util::cache_dir()
        .join("e2b-venv")
        .join(format!("e2b-{E2B_VERSION}-pytest-{PYTEST_VERSION}"));
    util::python_venv(
        &dir,
        "e2b",
        &[
            format!("e2b=={E2B_VERSION}"),
            format!("pytest=={PYTEST_VERSION}"),
        ],
    )?;
    Ok(dir)
}

/// A port on 127.0.0.1 free now (the kernel picks it; it is released at once for QEMU to take).
pub fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port on 127.0.0.1: {e}"))
}

/// A host port QEMU forwards to L1.
pub struct Forwarded(pub u16);

impl Forwarded {
    /// The answer to a plain HTTP/1.1 `GET path` with `headers`, or `None` while nothing in L1
    /// answers (QEMU accepts the connection and closes it).
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.0)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        Some((status, body))
    }

    /// Sends `text` to whoever listens behind the port in L1, retrying while nobody does yet.
    pub fn send(&self, text: &str, within: Duration) -> Result<()> {
        let end = Instant::now() + within;
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.0))
                && s.write_all(text.as_bytes()).is_ok()
                && s.shutdown(std::net::Shutdown::Write).is_ok()
            {
                // A listener that was there read it; QEMU's own accept would reset at once.
                let mut rest = Vec::new();
                if s.read_to_end(&mut rest).is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > end {
                return Err(format!(
                    "nothing in L1 took {text:?} on host port {}",
                    self.0
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn random_key() -> Result<String> {
    let mut bytes = [0u8; 20];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(format!(
        "e2b_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}
