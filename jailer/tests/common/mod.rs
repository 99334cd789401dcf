#![allow(dead_code)] // each test binary uses a different subset of these helpers
//! What kiln-jailer's host tests share: the kiln-vmm binary to jail, fresh ids and base folders,
//! a running jailer, and readers for `/proc/PID/...`.
//!
//! The kiln-vmm binary is the workspace's own debug build, found next to this test's executable:
//! `target/debug/deps/<test>` is `current_exe()`, so `target/debug/kiln-vmm` is two folders up.
//! `cargo test --workspace` (what `cargo xtask test` runs) builds every binary before running any
//! test; `cargo test -p kiln-jailer` alone does not, hence the message below.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long anything in these tests may take before the test fails.
pub const LIMIT: Duration = Duration::from_secs(60);
/// The ids the jailed VMM runs as (no such user needs to exist).
pub const UID: u32 = 123;
/// See [`UID`].
pub const GID: u32 = 123;

/// The workspace's kiln-vmm, next to this test binary.
pub fn kiln_vmm() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary sits in target/<profile>/deps");
    let vmm = dir.join("kiln-vmm");
    assert!(
        vmm.is_file(),
        "{} is missing: build it first (cargo build -p kiln-vmm; cargo test --workspace does)",
        vmm.display()
    );
    vmm
}

/// Fails the test unless it runs as root (the jailer needs it; these machines run as root).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "kiln-jailer's host tests run as root");
}

/// A fresh id and base folder for one test, and the guard that removes what a failure leaves.
pub fn fresh(name: &str) -> (String, PathBuf, Leftovers) {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let id = format!("it-{}-{name}-{n}", std::process::id());
    let base = std::env::temp_dir().join(format!("kiln-jailer-{id}"));
    let _ = std::fs::remove_dir_all(&base);
    let guard = Leftovers {
        id: id.clone(),
        base: base.clone(),
    };
    (id, base, guard)
}

/// Removes what a test's jail left if the test fails part way: kills what is still in its memory
/// cgroup, runs `--cleanup` and removes the base folder. A passing test has cleaned up already.
pub struct Leftovers {
    /// The jail's id.
    pub id: String,
    /// Its base folder.
    pub base: PathBuf,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let procs = memory_cgroup(&self.id).join("cgroup.procs");
        let start = Instant::now();
        while let Ok(text) = std::fs::read_to_string(&procs) {
            let pids: Vec<i32> = text
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            if pids.is_empty() || start.elapsed() > LIMIT {
                break;
            }
            for pid in pids {
                // SAFETY: kill only sends a signal, to a process this test's jail holds.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.base.exists() {
            let _ = cleanup(&self.id, &self.base);
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }
}

/// The jail root the jailer builds for `id` under `base`.
pub fn jail_root(base: &Path, id: &str) -> PathBuf {
    base.join("kiln-vmm").join(id).join("root")
}

/// The `--cgroup` memory limit for this host's cgroup version, and the file that holds it.
pub fn memory_limit(bytes: u64) -> (String, &'static str) {
    if Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
        (
            format!("memory.limit_in_bytes={bytes}"),
            "memory.limit_in_bytes",
        )
    } else {
        (format!("memory.max={bytes}"), "memory.max")
    }
}

/// The memory cgroup folder of `parent/id` on this host.
pub fn memory_cgroup(id: &str) -> PathBuf {
    let v1 = Path::new("/sys/fs/cgroup/memory");
    let root = if v1.join("memory.limit_in_bytes").exists() {
        v1.to_path_buf()
    } else {
        PathBuf::from("/sys/fs/cgroup")
    };
    root.join("kiln-vmm").join(id)
}

/// The jailer command for `id`: the workspace's kiln-vmm as uid:gid [`UID`]:[`GID`], under
/// `base`, with `extra` jailer flags; VMM arguments are added by the caller after `--`.
pub fn jailer(id: &str, base: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln-jailer"));
    cmd.args(["--id", id, "--exec-file"])
        .arg(kiln_vmm())
        .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
        .arg("--chroot-base-dir")
        .arg(base)
        .args(extra);
    cmd
}

/// Runs `kiln-jailer ARGS` to completion.
pub fn run_jailer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln-jailer"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run kiln-jailer")
}

/// `kiln-jailer --cleanup` for `id` under `base`.
pub fn cleanup(id: &str, base: &Path) -> Output {
    let base = base.to_str().expect("UTF-8 temp dir");
    run_jailer(&["--cleanup", "--id", id, "--chroot-base-dir", base])
}

/// Text of a process's output stream.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits for `path` to appear while `child` (if any) runs; on timeout or exit, fails with its
/// stderr.
pub fn wait_for(path: &Path, mut child: Option<&mut Child>) {
    let start = Instant::now();
    while !path.exists() {
        if let Some(child) = child.as_deref_mut()
            && let Some(status) = child.try_wait().expect("poll the jailer")
        {
            let mut err = String::new();
            child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!(
                "the jailer ended ({status}) before {} appeared: {err}",
                path.display()
            );
        }
        assert!(start.elapsed() < LIMIT, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `child` to end, killing it (and failing) past [`LIMIT`].
pub fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("poll the jailer") {
            return status;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("the jailer was still running after {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until no process is left in the cgroup `dir`. A killed process leaves its cgroup only
/// once every one of its threads has exited, a little after it shows as a zombie.
pub fn wait_empty(dir: &Path) {
    let start = Instant::now();
    loop {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            return;
        }
        assert!(
            start.elapsed() < LIMIT,
            "{} still holds {procs}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A field of `/proc/PID/status`, whitespace-separated words joined by one space.
pub fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A limit line of `/proc/PID/limits` as (soft, hard).
pub fn limit(pid: u32, name: &str) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in {limits}"));
    let mut words = line[name.len()..].split_whitespace();
    (
        words.next().unwrap_or_default().to_string(),
        words.next().unwrap_or_default().to_string(),
    )
}

/// The namespace `/proc/PID/ns/KIND` names (`mnt:[4026531841]`).
pub fn namespace(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .expect("read a namespace link")
        .display()
        .to_string()
}

/// (device, inode) of what `path` resolves to.
pub fn identity(path: &Path) -> (u64, u64) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.dev(), meta.ino())
}
