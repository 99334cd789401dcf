//! kiln-vmm's seccomp filters against a real workload, inside the nested lab: a Linux guest with
//! every device Kiln has (the rootfs as a read-only root drive, a read-write data drive, vsock)
//! is configured over the API and does block I/O, vsock traffic both ways and commands through
//! the agent; it is paused, snapshotted (Full, then Diff with dirty page tracking) and restored
//! into new kiln-vmm processes that carry on. Every kiln-vmm runs with its filters on and must
//! end by the guest's reset with status 0: none may be stopped by a filter (status 148 and a
//! line naming the call, or SIGSYS if even that failed) nor say anything about seccomp.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_agent::client::{Client, wait_ready};
use kiln_agent::protocol::ExecSpec;
use kiln_tests::{
    ApiVmm, EXIT_BAD_SYSCALL, Finished, ScratchDir, file_sha256, guest_kernel, kiln_vmm, rootfs,
    run_ok, snapshot_create_body, snapshot_load_body,
};

/// The agent as init over a tmpfs overlay, as `kiln run` boots.
const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet init=/usr/sbin/kiln-agent KILN_OVERLAY=tmpfs";
const AGENT_WAIT: Duration = Duration::from_secs(120);
const EXIT_WAIT: Duration = Duration::from_secs(60);
/// Bytes the guest writes to the data drive.
const DATA_BYTES: usize = 8 << 20;
/// The host port the guest connects to over vsock.
const HOST_PORT: u32 = 5005;
/// The whole test's limit, past which the watchdog ends it saying where it was.
const TEST_LIMIT: Duration = Duration::from_secs(600);

/// What the test is doing, for the watchdog's report.
static STEP: Mutex<String> = Mutex::new(String::new());

fn step(what: &str) {
    *STEP.lock().unwrap_or_else(|p| p.into_inner()) = what.to_string();
}

/// Ends the test process if it is still running after [`TEST_LIMIT`] (something in a guest or a
/// kiln-vmm stopped answering), naming the step and showing the tail of each console in `dir`.
fn watchdog(dir: PathBuf) {
    std::thread::spawn(move || {
        std::thread::sleep(TEST_LIMIT);
        let step = STEP.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // Straight to fd 2: the test harness captures eprintln!, and the process exits below.
        let mut report =
            format!("lab_seccomp: still at step {step:?} after {TEST_LIMIT:?}; giving up\n");
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "console") {
                let bytes = std::fs::read(&path).unwrap_or_default();
                let tail = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(2000)..]);
                report.push_str(&format!("--- {} (tail) ---\n{tail}\n", path.display()));
            }
        }
        let _ = std::io::stderr().write_all(report.as_bytes());
        std::process::exit(1);
    });
}

/// A kiln-vmm with its API socket `<name>.api` and its console in `<name>.console`.
fn start(dir: &Path, name: &str) -> ApiVmm {
    let mut cmd = kiln_vmm();
    cmd.arg("--serial-out")
        .arg(dir.join(format!("{name}.console")));
    ApiVmm::start(cmd, &dir.join(format!("{name}.api")))
}

fn vsock_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.vsock"))
}

/// Runs `script` with sh in the guest; its stdout, after checking it exited 0.
fn sh(client: &Client, script: &str) -> String {
    step(script);
    let mut spec = ExecSpec::new(["sh", "-c", script]);
    spec.timeout_ms = Some(120_000);
    run_ok(client, spec).trim().to_string()
}

fn agent(uds: &Path) -> Client {
    wait_ready(uds, Instant::now() + AGENT_WAIT).expect("the agent answers")
}

/// Asks the guest to shut down and checks that kiln-vmm then ended as a guest reset does.
fn shut_down(name: &str, vm: ApiVmm, client: Client) {
    client.shutdown().expect("shutdown request");
    drop(client);
    assert_ended_cleanly(name, &vm.finish(EXIT_WAIT));
}

/// No filter killed the process, nothing complained about one, and it exited 0.
fn assert_ended_cleanly(name: &str, end: &Finished) {
    assert!(
        !end.timed_out,
        "{name}: kiln-vmm did not exit within {EXIT_WAIT:?} of the guest's shutdown"
    );
    assert_ne!(
        end.status.signal(),
        Some(libc::SIGSYS),
        "{name}: kiln-vmm was killed by a seccomp filter (SIGSYS); stderr:\n{}",
        end.stderr
    );
    assert_ne!(
        end.status.code(),
        Some(EXIT_BAD_SYSCALL),
        "{name}: kiln-vmm was stopped by a seccomp filter; stderr:\n{}",
        end.stderr
    );
    assert!(
        !end.stderr.to_lowercase().contains("seccomp"),
        "{name}: kiln-vmm wrote about seccomp:\n{}",
        end.stderr
    );
    assert_eq!(
        end.status.code(),
        Some(0),
        "{name}: kiln-vmm {}; stderr:\n{}",
        end.status,
        end.stderr
    );
}

/// The guest connects to host port [`HOST_PORT`]; the host answers `pong` to its `ping`.
fn guest_to_host(client: &Client, uds: &Path) {
    let listener = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display())).unwrap();
    let host = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut got = [0u8; 5];
        stream.read_exact(&mut got).unwrap();
        stream.write_all(b"pong\n").unwrap();
        got
    });
    let answer = sh(
        client,
        &format!(
            "python3 -c 'import socket\ns=socket.socket(socket.AF_VSOCK,socket.SOCK_STREAM)\ns.connect((2,{HOST_PORT}))\ns.sendall(b\"ping\\n\")\nprint(s.recv(16).decode().strip())'"
        ),
    );
    assert_eq!(answer, "pong", "the host's answer reached the guest");
    assert_eq!(
        &host.join().unwrap(),
        b"ping\n",
        "the guest's bytes reached the host"
    );
}

/// Boots the guest configured over the API: 2 vCPUs, dirty page tracking, the rootfs read-only
/// as root, `data` read-write, vsock.
fn boot(dir: &Path, data: &Path) -> ApiVmm {
    let vm = start(dir, "boot");
    vm.ok(
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "{CMDLINE}"}}"#,
            guest_kernel().display()
        ),
    );
    vm.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256, "track_dirty_pages": true}"#,
    );
    vm.ok(
        "PUT",
        "/drives/rootfs",
        &format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": true}}"#,
            rootfs().display()
        ),
    );
    vm.ok(
        "PUT",
        "/drives/data",
        &format!(
            r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
            data.display()
        ),
    );
    vm.ok(
        "PUT",
        "/vsock",
        &format!(
            r#"{{"guest_cid": 3, "uds_path": "{}"}}"#,
            vsock_path(dir, "boot").display()
        ),
    );
    vm.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    vm
}

fn snapshot(vm: &ApiVmm, state: &Path, mem: &Path, kind: &str) {
    vm.ok(
        "PUT",
        "/snapshot/create",
        &snapshot_create_body(state, mem, kind),
    );
}

/// A new kiln-vmm `name` restored from `state` and `mem`, running, with its own vsock socket.
fn restore(dir: &Path, name: &str, state: &Path, mem: &Path) -> ApiVmm {
    let vm = start(dir, name);
    vm.ok(
        "PUT",
        "/snapshot/load",
        &snapshot_load_body(state, mem, true, &vsock_path(dir, name)),
    );
    vm
}

/// The sha256 of the data drive's first [`DATA_BYTES`], read by the guest past its page cache.
const READ_DATA: &str =
    "dd if=/dev/vdb bs=1M count=8 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1";

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn seccomp_filters_allow_every_device_pause_snapshot_and_restore() {
    let scratch = ScratchDir::new("seccomp");
    let dir = scratch.path();
    watchdog(dir.to_path_buf());
    let data = dir.join("data.img");
    std::fs::write(&data, vec![0u8; 2 * DATA_BYTES]).unwrap();

    step("boot");
    let vm = boot(dir, &data);
    let uds = vsock_path(dir, "boot");
    let client = agent(&uds);
    // Block I/O on the data drive, flushed, then read back past the guest's cache.
    let written = sh(
        &client,
        "head -c 8388608 /dev/urandom > /tmp/pattern && \
         dd if=/tmp/pattern of=/dev/vdb bs=1M oflag=direct conv=fsync 2>/dev/null && \
         sha256sum /tmp/pattern | cut -d' ' -f1",
    );
    assert_eq!(
        sh(&client, READ_DATA),
        written,
        "the guest reads back what it wrote"
    );
    assert_eq!(
        sh(&client, "cat /sys/block/vda/ro"),
        "1",
        "the root drive is read-only"
    );
    guest_to_host(&client, &uds);
    let (code, info) = vm.call("GET", "/", None);
    assert!(code == 200 && info.contains("Running"), "{code} {info}");

    // Pause, a full snapshot, resume; a change; pause, a diff, resume.
    step("pause and a full snapshot");
    let (full_state, full_mem) = (dir.join("full.state"), dir.join("full.mem"));
    vm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (code, info) = vm.call("GET", "/", None);
    assert!(code == 200 && info.contains("Paused"), "{code} {info}");
    snapshot(&vm, &full_state, &full_mem, "Full");
    vm.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    // A snapshot resets the guest's vsock connections (as on Firecracker): connect again.
    step("the agent after the full snapshot");
    drop(client);
    let client = agent(&uds);
    sh(&client, "echo after-full > /tmp/after-full");
    step("pause and a diff snapshot");
    let (diff_state, diff_mem) = (dir.join("diff.state"), dir.join("diff.mem"));
    vm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    snapshot(&vm, &diff_state, &diff_mem, "Diff");
    vm.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    step("the agent after the diff snapshot");
    drop(client);
    let client = agent(&uds);
    assert_eq!(sh(&client, "cat /tmp/after-full"), "after-full");
    step("shutting down the booted VM");
    shut_down("the booted VM", vm, client);
    let on_host = {
        let mut bytes = std::fs::read(&data).unwrap();
        bytes.truncate(DATA_BYTES);
        let path = dir.join("written.bin");
        std::fs::write(&path, bytes).unwrap();
        file_sha256(&path)
    };
    assert_eq!(
        on_host, written,
        "the data image holds what the guest wrote"
    );

    // The full snapshot, restored in a new process: its memory, devices and agent carry on.
    step("restoring the full snapshot");
    let vm = restore(dir, "restored", &full_state, &full_mem);
    let uds = vsock_path(dir, "restored");
    let client = agent(&uds);
    client
        .restored_now(BTreeMap::new())
        .expect("post-restore step");
    assert_eq!(
        sh(&client, "sha256sum /tmp/pattern | cut -d' ' -f1"),
        written
    );
    assert_eq!(
        sh(&client, "test -e /tmp/after-full || echo absent"),
        "absent"
    );
    assert_eq!(sh(&client, READ_DATA), written, "the data drive reads back");
    sh(
        &client,
        "dd if=/dev/urandom of=/dev/vdb bs=4096 count=16 seek=2048 oflag=direct conv=fsync 2>/dev/null",
    );
    guest_to_host(&client, &uds);
    step("shutting down the restored VM");
    shut_down("the VM restored from the full snapshot", vm, client);

    // The diff merged into its base, restored: the change made between the two is there.
    let merged = dir.join("merged.mem");
    std::fs::copy(&full_mem, &merged).unwrap();
    kiln_snapshot::merge(&merged, &[diff_mem]).unwrap();
    step("restoring the merged diff");
    let vm = restore(dir, "merged", &diff_state, &merged);
    let client = agent(&vsock_path(dir, "merged"));
    client
        .restored_now(BTreeMap::new())
        .expect("post-restore step");
    assert_eq!(sh(&client, "cat /tmp/after-full"), "after-full");
    step("shutting down the merged VM");
    shut_down("the VM restored from the merged diff", vm, client);
}
