//! The kilnd process the fake-VMM tests run (included with `#[path]`): started on `dir/state`
//! with the stand-in VMM (the test binary itself, run with `KILN_FAKE_VMM=agent`) unjailed, its
//! log appended to `dir/kilnd.log`; killed when dropped.

// Each test binary includes this file and uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_pool::client::Kilnd;

/// A running kilnd.
pub struct Daemon {
    child: Child,
    /// Its API socket.
    pub sock: PathBuf,
}

/// kilnd's command line for a state under `dir`, with `dir/vmlinux` and `dir/agent` as its
/// kernel and agent; the caller adds what its test needs (limits, listeners, fault switches).
pub fn command(dir: &Path) -> Command {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("kilnd.log"))
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kilnd"));
    cmd.arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--vmm")
        .arg(std::env::current_exe().unwrap())
        .arg("--kernel")
        .arg(dir.join("vmlinux"))
        .arg("--agent")
        .arg(dir.join("agent"))
        // The stand-in VMM is this test binary, which logs outside any jail.
        .arg("--no-jail")
        .env("KILN_FAKE_VMM", "agent")
        .env_remove("KILN_FAKE_VMM_LOG")
        .env_remove("KILN_FAKE_VMM_API_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    cmd
}

/// Waits up to 30 s until `listening` says kilnd listens; panics naming its log otherwise.
pub fn wait_listening(dir: &Path, mut listening: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while !listening() {
        assert!(
            Instant::now() < end,
            "kilnd did not listen; see {}/kilnd.log",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Daemon {
    /// Starts `cmd` (from [`command`] for `dir`) and waits until its API socket answers.
    pub fn spawn(dir: &Path, mut cmd: Command) -> Daemon {
        let sock = dir.join("state/kilnd.sock");
        let d = Daemon {
            child: cmd.spawn().unwrap(),
            sock,
        };
        wait_listening(dir, || {
            std::os::unix::net::UnixStream::connect(&d.sock).is_ok()
        });
        d
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client on its API socket.
    pub fn client(&self) -> Kilnd {
        Kilnd::new(&self.sock)
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(mut self) {
        // SAFETY: kill(2) with a pid and a signal touches no memory.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "kilnd exited with {status}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
