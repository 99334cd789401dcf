//! Kiln's end-to-end harness: what the tests and benchmarks that run inside the nested lab share.
//!
//! Inside the lab (see `cargo xtask lab`), Kiln's binaries are on `PATH` and the guest kernel and test
//! images sit in `/kiln` (or `$KILN_LAB_DIR`). This crate finds them, runs `kiln-vmm` with a deadline
//! and reads what the guest printed. It drives the binaries a user runs (`kiln-vmm`, `kiln`) and,
//! for file transfers, the agent's client library. `cargo xtask test` builds it on the host and
//! runs it in the lab.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_agent::client::Client;
use kiln_agent::protocol::{ExecSpec, ExitStatus as AgentExit};

pub mod cycles;
pub mod fakenet;
pub mod memory;
pub mod nic;
pub mod smaps;

/// The marker the test initramfs prints first thing in `/init`.
pub const INIT_MARKER: &str = "KILN-INIT-START";

/// kiln-vmm's exit status when a seccomp filter stopped one of its threads
/// (`kiln_vmm::seccomp::EXIT_BAD_SYSCALL`; this crate does not depend on kiln-vmm).
pub const EXIT_BAD_SYSCALL: i32 = 148;
/// The line prefix under which the test initramfs reports what it saw.
pub const REPORT_PREFIX: &str = "KILN-REPORT";

/// Folder holding the lab's guest kernel and images.
pub fn lab_dir() -> PathBuf {
    std::env::var_os("KILN_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/kiln"))
}

/// A file in the lab folder; panics with a clear message when it is missing (not in the lab).
pub fn lab_file(name: &str) -> PathBuf {
    let path = lab_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: lab tests run inside `cargo xtask lab` (via `cargo xtask test`)",
        path.display()
    );
    path
}

/// The guest kernel built by `cargo xtask guest-kernel`.
pub fn guest_kernel() -> PathBuf {
    lab_file("vmlinux")
}

/// The busybox test initramfs (its `/init` prints [`INIT_MARKER`], a [`REPORT_PREFIX`] line, runs
/// `$KILN_RUN` if set, and reboots).
pub fn test_initramfs() -> PathBuf {
    lab_file("test-initramfs.cpio")
}

/// What a finished process printed and how it ended.
#[derive(Debug)]
pub struct Run {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout, with the serial console's `\r\n` line ends read as `\n`.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
    /// Time from spawn to the first stdout line containing the watched marker, if it appeared.
    pub marker_after: Option<Duration>,
    /// The process was still running at the deadline and was killed (`status` is the kill's).
    pub timed_out: bool,
}

impl Run {
    /// The `key=value` fields of the guest's report line.
    pub fn report(&self) -> Vec<(String, String)> {
        let line = self
            .stdout
            .lines()
            .find(|l| l.starts_with(REPORT_PREFIX))
            .unwrap_or("");
        line.split_whitespace()
            .skip(1)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// One field of the report, parsed.
    pub fn report_value<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
        self.report()
            .into_iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.parse().ok())
    }
}

/// Runs `cmd`, streaming stdout to find `marker`, and kills it after `limit` (then
/// [`Run::timed_out`] is set and the output so far is kept).
pub fn run_watching(mut cmd: Command, marker: &str, limit: Duration) -> std::io::Result<Run> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("no stdout pipe"))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| std::io::Error::other("no stderr pipe"))?;
    let (tx, rx) = mpsc::channel();
    let marker = marker.to_string();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        let mut seen = None;
        let mut lines = BufReader::new(stdout);
        let mut raw = Vec::new();
        // Bytes, not `read_line`: a console may carry anything, and a reader that stopped at the
        // first invalid UTF-8 byte would leave the process blocked on a full pipe.
        while lines.read_until(b'\n', &mut raw).unwrap_or(0) > 0 {
            let mut line = String::from_utf8_lossy(&raw).into_owned();
            if seen.is_none() && line.contains(&marker) {
                seen = Some(start.elapsed());
            }
            if line.ends_with("\r\n") {
                line.truncate(line.len() - 2);
                line.push('\n');
            }
            all.push_str(&line);
            raw.clear();
        }
        let _ = tx.send((all, seen));
    });
    let err_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let (status, timed_out) = wait_with_deadline(&mut child, limit)?;
    let (stdout, marker_after) = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    let _ = reader.join();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Run {
        status,
        stdout,
        stderr,
        marker_after,
        timed_out,
    })
}

/// Waits for `child`, killing it after `limit`; returns its status and whether it was killed.
pub fn wait_with_deadline(
    child: &mut Child,
    limit: Duration,
) -> std::io::Result<(ExitStatus, bool)> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok((status, false));
        }
        if start.elapsed() > limit {
            child.kill()?;
            return Ok((child.wait()?, true));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The last `n` lines of the text file `path` (empty when it cannot be read).
pub fn file_tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last lines of the console log a failed `kiln run` names in `stderr` (`console log: PATH`),
/// as text to append to a failure message; empty when it names none or the file is gone.
pub fn console_tail_named_in(stderr: &str) -> String {
    const LINES: usize = 40;
    let Some(path) = stderr
        .rsplit_once("console log: ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
    else {
        return String::new();
    };
    let tail = file_tail(std::path::Path::new(path), LINES);
    if tail.is_empty() {
        return String::new();
    }
    format!("\nthe guest's console ({path}), last {LINES} lines:\n{tail}")
}

/// Prints the end of a file (a guest's console, a VMM's log) when dropped while the test panics,
/// so that a failure deep in a test (a lost agent connection) comes with what was said there:
/// `TailOnFailure("the guest's console", path)`.
pub struct TailOnFailure(pub &'static str, pub PathBuf);

impl Drop for TailOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{} ({}), last 60 lines:\n{}",
                self.0,
                self.1.display(),
                file_tail(&self.1, 60)
            );
        }
    }
}

/// The SHA-256 of a file, in hex (by `sha256sum`, which streams: images are hundreds of MiB).
pub fn file_sha256(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum {} failed", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The command line Kiln's lab guests boot with.
pub const LAB_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

/// The Debian rootfs with python3 and the agent, built by `cargo xtask rootfs`.
pub fn rootfs() -> PathBuf {
    lab_file("rootfs.ext4")
}

/// A `kiln-vmm` command booting the guest kernel from the rootfs image `disk` (the root drive,
/// read-only with `ro`) with a vsock device at `uds`, `mem_mib` of memory and `cmdline`.
pub fn kiln_vmm_rootfs(
    disk: &std::path::Path,
    ro: bool,
    uds: &std::path::Path,
    mem_mib: u32,
    cmdline: &str,
) -> Command {
    let ro = if ro { ",ro" } else { "" };
    let mut cmd = Command::new("kiln-vmm");
    cmd.arg("--kernel")
        .arg(guest_kernel())
        .args(["--mem-mib", &mem_mib.to_string(), "--cmdline", cmdline])
        .arg("--drive")
        .arg(format!("id=rootfs,path={},root{ro}", disk.display()))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()));
    cmd
}

/// A `kiln-vmm` command. With `KILN_VMM_STRACE=DIR` in the environment it runs under
/// `strace -f` instead, each process tracing to its own `DIR/kiln-vmm-<pid>-<n>.trace` (for
/// re-deriving the seccomp filters; `cargo xtask lab --with-strace` puts strace in the lab).
pub fn kiln_vmm() -> Command {
    let Some(dir) = std::env::var_os("KILN_VMM_STRACE") else {
        return Command::new("kiln-vmm");
    };
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let out = Path::new(&dir).join(format!("kiln-vmm-{}-{n}.trace", std::process::id()));
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-X", "verbose", "-s", "48", "-o"])
        .arg(out)
        .arg("kiln-vmm");
    cmd
}

/// A fresh folder under the temporary directory, removed with everything in it when dropped: L1's
/// /tmp is a tmpfs that the lab tests share, and snapshot memory files fill it quickly.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates `<tmp>/kiln-<name>-<pid>`, emptied first.
    pub fn new(name: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("kiln-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        ScratchDir(dir)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How a process that was waited for ended.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything it wrote on stderr.
    pub stderr: String,
    /// It was still running at the deadline and was killed.
    pub timed_out: bool,
}

/// A `kiln-vmm` serving its API socket, with its stderr kept for [`ApiVmm::finish`]; killed
/// when dropped.
pub struct ApiVmm {
    child: Child,
    sock: PathBuf,
    stderr: Option<JoinHandle<String>>,
}

impl ApiVmm {
    /// Starts `cmd` (a `kiln-vmm` command) with `--api-sock sock`, stdin closed, stderr captured,
    /// and waits until the socket exists.
    pub fn start(mut cmd: Command, sock: &Path) -> ApiVmm {
        let mut child = cmd
            .arg("--api-sock")
            .arg(sock)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kiln-vmm");
        let mut pipe = child.stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        });
        let vmm = ApiVmm {
            child,
            sock: sock.to_path_buf(),
            stderr: Some(stderr),
        };
        let start = Instant::now();
        while !sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no API socket at {} after 60 s",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        vmm
    }

    /// The API socket.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// The kiln-vmm process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One API request; its status code and body.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        kiln_api::client::request(&self.sock, method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path} on {}: {e}", self.sock.display()))
    }

    /// One API request that must be answered 204 No Content.
    pub fn ok(&self, method: &str, path: &str, body: &str) {
        let (code, text) = self.call(method, path, Some(body));
        assert_eq!(code, 204, "{method} {path}: {text}");
    }

    /// Waits up to `limit` for the process to end (killing it then) and returns how it ended.
    pub fn finish(mut self, limit: Duration) -> Finished {
        let (status, timed_out) =
            wait_with_deadline(&mut self.child, limit).expect("wait for kiln-vmm");
        let stderr = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        Finished {
            status,
            stderr,
            timed_out,
        }
    }
}

/// Runs `spec` in the guest through the agent; its stdout, after checking it exited 0.
pub fn run_ok(client: &Client, spec: ExecSpec) -> String {
    let argv = spec.argv.clone();
    let out = client.run(spec).expect("exec");
    assert_eq!(
        out.status,
        AgentExit::Exited(0),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `script` with sh in the guest; its stdout, after checking it exited 0.
pub fn sh(client: &Client, script: &str) -> String {
    run_ok(client, ExecSpec::new(["sh", "-c", script]))
}

/// The body of `PUT /snapshot/create`.
pub fn snapshot_create_body(state: &Path, mem: &Path, kind: &str) -> String {
    format!(
        r#"{{"snapshot_type": "{kind}", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        mem.display()
    )
}

/// The body of `PUT /snapshot/load` for a VM resumed at once, listening on its own vsock socket
/// `uds`.
pub fn snapshot_load_body(state: &Path, mem: &Path, track_dirty: bool, uds: &Path) -> String {
    format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}},
            "resume_vm": true, "track_dirty_pages": {track_dirty},
            "vsock_override": {{"uds_path": "{}"}}}}"#,
        state.display(),
        mem.display(),
        uds.display()
    )
}

impl Drop for ApiVmm {
    /// Kills the process; when a test is failing, first says whether it had already ended (and
    /// how: status 148 means a seccomp filter stopped it, SIGSYS that one stopped its SIGSYS
    /// handler too) and what it wrote on stderr.
    fn drop(&mut self) {
        let ended = self.child.try_wait().ok().flatten();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            use std::os::unix::process::ExitStatusExt;
            let how = match ended {
                Some(s) if s.code() == Some(EXIT_BAD_SYSCALL) => {
                    format!("had been stopped by a seccomp filter ({s})")
                }
                Some(s) if s.signal() == Some(libc::SIGSYS) => {
                    format!("had been killed by a seccomp filter ({s})")
                }
                Some(s) => format!("had ended ({s})"),
                None => "was still running".into(),
            };
            let stderr = self
                .stderr
                .take()
                .and_then(|t| t.join().ok())
                .unwrap_or_default();
            eprintln!(
                "kiln-vmm at {} {how}; its stderr:\n{stderr}",
                self.sock.display()
            );
        }
    }
}

/// Debian's cloud-kernel bzImage, for the bzImage loader.
pub fn debian_bzimage() -> PathBuf {
    lab_file("bzImage")
}

/// A `kiln-vmm` command booting the guest kernel and test initramfs.
pub fn kiln_vmm_boot(vcpus: u8, mem_mib: u32, extra_cmdline: &str) -> Command {
    kiln_vmm_boot_kernel(&guest_kernel(), vcpus, mem_mib, extra_cmdline)
}

/// A `kiln-vmm` command booting `kernel` with the test initramfs.
pub fn kiln_vmm_boot_kernel(
    kernel: &std::path::Path,
    vcpus: u8,
    mem_mib: u32,
    extra_cmdline: &str,
) -> Command {
    let mut cmd = Command::new("kiln-vmm");
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(test_initramfs())
        .arg("--cmdline")
        .arg(format!("{LAB_CMDLINE} {extra_cmdline}").trim_end())
        .args([
            "--vcpus",
            &vcpus.to_string(),
            "--mem-mib",
            &mem_mib.to_string(),
        ]);
    cmd
}

/// QEMU `-M microvm` on KVM with `vcpus` and `mem_mib`, no default devices, the serial console
/// on stdout, exiting instead of rebooting: the peer Kiln is measured against.
pub fn qemu_microvm(vcpus: u8, mem_mib: u32) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,acpi=off,rtc=off",
        "-accel",
        "kvm",
        "-cpu",
        "host",
    ])
    .args(["-smp", &vcpus.to_string(), "-m", &mem_mib.to_string()])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
    ]);
    cmd
}

/// A QEMU microvm command booting the same kernel and initramfs with KVM, for comparison.
/// microvm has no i8042, so the guest reboots by triple fault (`reboot=t`), which ends QEMU under
/// `-no-reboot`; the reboot method does not change the time to init.
pub fn qemu_microvm_boot(vcpus: u8, mem_mib: u32, extra_cmdline: &str) -> Command {
    let mut cmd = qemu_microvm(vcpus, mem_mib);
    cmd.arg("-kernel")
        .arg(guest_kernel())
        .arg("-initrd")
        .arg(test_initramfs())
        .args([
            "-append",
            format!(
                "{} {extra_cmdline}",
                LAB_CMDLINE.replace("reboot=k", "reboot=t")
            )
            .trim_end(),
        ]);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_runs_console_tail_is_read_from_the_path_it_names() {
        let log = std::env::temp_dir().join(format!("kiln-tail-test-{}.log", std::process::id()));
        let text: String = (1..=50).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).unwrap();
        let stderr = format!(
            "kiln: no answer; kiln-vmm was stopped; console log: {}\n",
            log.display()
        );
        let tail = console_tail_named_in(&stderr);
        std::fs::remove_file(&log).unwrap();
        assert!(
            tail.contains("line 11\nline 12") && tail.ends_with("line 50"),
            "{tail}"
        );
        assert!(!tail.contains("line 10\n"), "{tail}");
        assert_eq!(
            console_tail_named_in("kiln: failed; the VMM wrote no console log"),
            ""
        );
    }

    #[test]
    fn report_fields_are_parsed() {
        let run = Run {
            status: std::process::ExitStatus::default(),
            stdout: "noise\nKILN-REPORT cpus=2 mem_kb=240112 name=x\nmore\n".into(),
            stderr: String::new(),
            marker_after: None,
            timed_out: false,
        };
        assert_eq!(run.report_value::<u32>("cpus"), Some(2));
        assert_eq!(run.report_value::<u64>("mem_kb"), Some(240112));
        assert_eq!(run.report_value::<u32>("name"), None);
        assert_eq!(run.report_value::<u32>("absent"), None);
    }

    #[test]
    fn marker_time_and_output_are_captured() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "printf 'one\\r\\n\\377\\n'; echo KILN-INIT-START; echo err >&2; exit 3",
        ]);
        let run = run_watching(cmd, INIT_MARKER, Duration::from_secs(10)).unwrap();
        assert_eq!(run.status.code(), Some(3));
        assert_eq!(
            run.stdout, "one\n\u{fffd}\nKILN-INIT-START\n",
            "invalid UTF-8 does not stop it"
        );
        assert_eq!(run.stderr, "err\n");
        assert!(run.marker_after.is_some());
    }

    #[test]
    fn a_hung_process_is_killed_at_the_deadline() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; exec sleep 30"]);
        let run = run_watching(cmd, "started", Duration::from_millis(300)).unwrap();
        assert!(run.timed_out);
        assert_eq!(run.stdout, "started\n", "output before the kill is kept");
        assert!(run.marker_after.is_some());
    }
}
