//! The E2B SDK suite: E2B's own Python SDK, a pinned release from PyPI in a venv this module
//! makes, drives kilnd in the lab through one forwarded port. L1 starts kilnd with its E2B
//! listener and builds the `base` template; the host runs `tests/e2b` with pytest against
//! `127.0.0.1:PORT` (QEMU forwards it to L1) while L1 waits; then the host sends pytest's status
//! back over a second forwarded port and L1 exits with it. `cargo xtask test` runs the suite in
//! the same L1 boot as the lab tests, after them ([`Before`]).
//!
//! The venv, its pinned versions and the port plumbing are here so that other suites (Kiln's own
//! SDK, `bench e2b`) can reuse them: [`venv`], [`free_port`], [`Forwarded`].

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::lab::{self, LabRun, LabStatus};
use crate::util::{self, Result};

/// The `e2b` release the suite runs (its version is recorded in the venv's `versions.txt`).
pub const E2B_VERSION: &str = "2.63.0";
/// The pytest release that runs it.
pub const PYTEST_VERSION: &str = "8.4.2";

/// The port kilnd's E2B listener uses inside L1.
const L1_E2B_PORT: u16 = 3000;
/// The port L1 waits on for the host's verdict.
const L1_CONTROL_PORT: u16 = 3001;
/// The line L1 prints after the first command of a shared boot, before its status.
const BEFORE_MARK: &str = "e2b-l1: the lab tests exited ";
/// How long L1 may take to have kilnd and the `base` template ready.
const READY_WITHIN: Duration = Duration::from_secs(900);
/// How long the whole lab run may take.
const LAB_TIMEOUT: Duration = Duration::from_secs(2400);

/// Runs in L1 (from /share): first the command in its arguments if any (the lab tests of a
/// shared boot), then kilnd with its E2B listener on eth0, the `base` template, a file only L1
/// has (the suite checks that no sandbox path reaches it), then waits for the verdict and exits
/// with it. The first command's status is in its output line ([`BEFORE_MARK`]).
const L1_SCRIPT: &str = r#"#!/bin/sh
before=0
if [ $# -gt 0 ]; then
  "$@"
  before=$?
  echo "@BEFORE_MARK@$before"
fi
key=$(cat /share/e2b-api-key)
state=/kiln/e2b-state
rm -rf "$state"; mkdir -p "$state"
echo "this file is on L1, never in a sandbox" >/tmp/kiln-l1-only
KILND_E2B_API_KEY="$key" kilnd --state-dir "$state" --max-vms 16 \
  --e2b-listen 10.0.2.15:@E2B_PORT@ 2>"$state.log" &
kilnd=$!
n=0
while [ ! -S "$state/kilnd.sock" ]; do
  n=$((n + 1))
  if [ $n -gt 600 ]; then echo "e2b-l1: kilnd did not start"; cat "$state.log"; exit 3; fi
  sleep 0.1
done
KILND_SOCKET="$state/kilnd.sock" kiln template build /kiln/examples/base.toml || {
  echo "e2b-l1: building the base template failed"; tail -50 "$state.log"; exit 3; }
echo "e2b-l1: kilnd serves E2B on port @E2B_PORT@"
verdict=$(nc -l -p @CONTROL_PORT@ </dev/null | tr -dc 0-9)
kill $kilnd; wait $kilnd
if [ "$verdict" != 0 ]; then
  echo "e2b-l1: the suite failed; kilnd's last log lines:"
  tail -60 "$state.log"
fi
exit "${verdict:-1}"
"#;

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

/// A lab run the suite shares its boot with: L1 runs `run.cmd` first, in `run.share` (where the
/// suite adds its own files), with `run.files` and the rest of `run`'s settings; its `timeout` is
/// that command's.
pub struct Before {
    /// The first command's lab run.
    pub run: LabRun,
}

/// How a suite run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// pytest's status.
    pub suite: u8,
    /// Whether the command of a shared boot ([`Before`]) passed (true without one).
    pub before_passed: bool,
}

/// `cargo xtask test --e2b [FILTER]`: the suite, FILTER passed to pytest's `-k`, in its own L1
/// boot or after `before` in one. The lab failing is an error.
pub fn run_suite(filter: Option<String>, before: Option<Before>) -> Result<Verdict> {
    let venv = venv()?;
    let suite = util::workspace_root().join("tests/e2b");
    let (mut run, before_cmd, before_timeout) = match before {
        Some(b) => {
            let mut run = b.run;
            let cmd = std::mem::take(&mut run.cmd);
            let timeout = run.timeout;
            (run, cmd, timeout)
        }
        None => (LabRun::default(), Vec::new(), Duration::ZERO),
    };
    let shared = !before_cmd.is_empty();
    let share = match &run.share {
        Some(s) => s.clone(),
        None => {
            let s = util::cache_dir().join("e2b-share");
            let _ = std::fs::remove_dir_all(&s);
            s
        }
    };
    util::mkdir(&share)?;
    let key = random_key()?;
    util::write_atomic(&share.join("e2b-api-key"), key.as_bytes())?;
    util::write_atomic(
        &share.join("e2b-l1.sh"),
        L1_SCRIPT
            .replace("@E2B_PORT@", &L1_E2B_PORT.to_string())
            .replace("@CONTROL_PORT@", &L1_CONTROL_PORT.to_string())
            .replace("@BEFORE_MARK@", BEFORE_MARK)
            .as_bytes(),
    )?;
    let (api, control) = (Forwarded(free_port()?), Forwarded(free_port()?));
    run.share = Some(share);
    run.cmd = ["sh", "/share/e2b-l1.sh"]
        .into_iter()
        .map(String::from)
        .chain(before_cmd)
        .collect();
    run.forwards = vec![(api.0, L1_E2B_PORT), (control.0, L1_CONTROL_PORT)];
    run.timeout = before_timeout + LAB_TIMEOUT;
    let lab_thread = std::thread::spawn(move || lab::run(&run));
    // Ready when kilnd in L1 lists the base template through the forwarded port.
    let end = Instant::now() + before_timeout + READY_WITHIN;
    let ready = loop {
        if lab_thread.is_finished() {
            break false;
        }
        if let Some((200, body)) = api.get("/templates", &[("X-API-Key", &key)])
            && body.contains("\"base\"")
        {
            break true;
        }
        if Instant::now() > end {
            break false;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let verdict = if ready {
        eprintln!(
            "\n==> xtask e2b: pytest tests/e2b against kilnd in the lab (127.0.0.1:{})",
            api.0
        );
        let url = format!("http://127.0.0.1:{}", api.0);
        let mut pytest = Command::new(venv.join("bin/python"));
        pytest
            .args(["-m", "pytest", "-v", "-p", "no:cacheprovider"])
            .arg(&suite)
            .env("E2B_API_KEY", &key)
            .env("E2B_API_URL", &url)
            .env("E2B_SANDBOX_URL", &url)
            .env_remove("E2B_DOMAIN")
            .env_remove("E2B_DEBUG");
        if let Some(f) = &filter {
            pytest.args(["-k", f]);
        }
        let status = pytest
            .status()
            .map_err(|e| format!("cannot run pytest: {e}"))?;
        status.code().unwrap_or(1)
    } else {
        -1
    };
    if verdict >= 0 {
        // A send that raced L1 reaching its listener is lost without a sign: send again until
        // L1 goes down.
        for _ in 0..6 {
            let _ = control.send(&format!("{verdict}\n"), Duration::from_secs(60));
            let sent = Instant::now();
            while !lab_thread.is_finished() && sent.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(200));
            }
            if lab_thread.is_finished() {
                break;
            }
        }
    }
    let outcome = lab_thread
        .join()
        .map_err(|_| "the lab thread panicked".to_string())??;
    let before_passed = !shared
        || outcome
            .output
            .lines()
            .any(|l| l.trim_end() == format!("{BEFORE_MARK}0"));
    match (&outcome.status, verdict) {
        (LabStatus::Exited(code), v) if v >= 0 && *code == v => Ok(Verdict {
            suite: u8::try_from(v).unwrap_or(1),
            before_passed,
        }),
        (LabStatus::Exited(code), -1) => Err(format!(
            "kilnd in the lab never served E2B (the L1 script exited {code}; its output is above)"
        )),
        (LabStatus::Exited(code), v) => Err(format!(
            "pytest exited {v} but L1 reported {code} (did the verdict reach it?)"
        )),
        (LabStatus::Failed(why), _) => {
            outcome.print_diagnosis();
            Err(format!("the lab failed, not the suite: {why}"))
        }
    }
}

/// The stand-in VMM's "guest" is the host: tests that need a VM of their own (memory apart for
/// forks, a filesystem apart from the machine kilnd runs on) are marked `vm` and left to the lab.
const HOST_MARKS: &str = "not vm";

/// Builds kilnd, `kiln` and the stand-in VMM (debug, as `cargo test` does): their paths.
fn host_programs() -> Result<Vec<PathBuf>> {
    let out = util::output(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(util::workspace_root())
            .args([
                "build",
                "--package",
                "kiln-pool",
                "--bin",
                "kilnd",
                "--example",
                "fake_vmm",
                "--package",
                "kiln-cli",
                "--bin",
                "kiln",
                "--message-format=json-render-diagnostics",
            ]),
    )?;
    crate::sdk::executables(&out, &["kilnd", "kiln", "fake_vmm"])
}

/// kilnd on the host, stopped (SIGTERM, so it ends its stand-in VMs) when dropped.
struct HostKilnd(std::process::Child);

impl Drop for HostKilnd {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cargo xtask test` (host stage): the suite against kilnd on the host with the stand-in VMM
/// (the real agent code in-process), so protocol breakage shows in seconds, before the lab; the
/// tests marked `vm` run only in the lab. FILTER is pytest's `-k`.
pub fn run_host_suite(filter: Option<&str>) -> Result<()> {
    let venv = venv()?;
    let programs = host_programs()?;
    let [kilnd, kiln, vmm] = &programs[..] else {
        return Err("cargo reported fewer programs than asked for".into());
    };
    let dir = util::cache_dir().join("e2b-host");
    let _ = std::fs::remove_dir_all(&dir);
    util::mkdir(&dir.join("tree/etc"))?;
    let write = |name: &str, bytes: &[u8]| util::write_atomic(&dir.join(name), bytes);
    // The stand-in boots nothing: any kernel and agent file will do.
    write("vmlinux", b"kernel")?;
    write("agent", &[0x7f; 4096])?;
    write(
        "base.toml",
        format!(
            "name = \"base\"\n[from]\ndir = \"{}\"\n",
            dir.join("tree").display()
        )
        .as_bytes(),
    )?;
    let key = random_key()?;
    let port = free_port()?;
    let log = std::fs::File::create(dir.join("kilnd.log"))
        .map_err(|e| format!("cannot create {}: {e}", dir.join("kilnd.log").display()))?;
    let sock = dir.join("state/kilnd.sock");
    let _daemon = HostKilnd(
        Command::new(kilnd)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--vmm")
            .arg(vmm)
            .arg("--kernel")
            .arg(dir.join("vmlinux"))
            .arg("--agent")
            .arg(dir.join("agent"))
            .arg("--no-jail")
            .args(["--e2b-listen", &format!("127.0.0.1:{port}")])
            .env("KILND_E2B_API_KEY", &key)
            .env("KILN_FAKE_VMM", "agent")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", kilnd.display()))?,
    );
    let end = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        if Instant::now() > end {
            return Err(format!(
                "kilnd made no {} within 30 s (its log: {})",
                sock.display(),
                dir.join("kilnd.log").display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    util::run(
        Command::new(kiln)
            .args(["template", "build"])
            .arg(dir.join("base.toml"))
            .env("KILND_SOCKET", &sock),
    )?;
    let url = format!("http://127.0.0.1:{port}");
    let mut pytest = Command::new(venv.join("bin/python"));
    pytest
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            HOST_MARKS,
        ])
        .arg(util::workspace_root().join("tests/e2b"))
        .env("E2B_API_KEY", &key)
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG");
    if let Some(f) = filter {
        pytest.args(["-k", f]);
    }
    util::run(&mut pytest).map_err(|e| {
        format!(
            "the E2B SDK suite failed against kilnd on the host: {e} (kilnd's log: {})",
            dir.join("kilnd.log").display()
        )
    })
}
