//! Snapshots of real Linux guests, inside the nested lab: a booted VM with the agent is paused,
//! snapshotted and restored in new processes, which carry on its processes and files; clones of
//! one snapshot run side by side and are not twins; diffs hold only what changed; a snapshot
//! killed mid-write leaves the previous one loadable; a pause does not show in the guest's clock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use kiln_agent::client::{Client, wait_ready};
use kiln_api::client::request;
use kiln_tests::{
    ApiVmm, ScratchDir, file_sha256, kiln_vmm, kiln_vmm_rootfs, rootfs, sh, snapshot_create_body,
    snapshot_load_body,
};

/// The command line `kiln run` boots with: the agent as init over a tmpfs overlay.
const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet init=/usr/sbin/kiln-agent KILN_OVERLAY=tmpfs";
const AGENT_WAIT: Duration = Duration::from_secs(120);

/// One kiln-vmm process with its API socket and the host end of its vsock.
struct LabVm {
    vm: ApiVmm,
    uds: PathBuf,
}

impl LabVm {
    /// Starts `cmd` as `name`, its API socket and console beside its vsock socket in `dir`.
    fn start(dir: &Path, name: &str, mut cmd: Command) -> Self {
        cmd.arg("--serial-out")
            .arg(dir.join(format!("{name}.console")));
        Self {
            vm: ApiVmm::start(cmd, &dir.join(format!("{name}.api"))),
            uds: dir.join(format!("{name}.vsock")),
        }
    }

    /// Boots the rootfs with the agent, 256 MiB, one vCPU.
    fn boot(dir: &Path, name: &str) -> Self {
        Self::boot_with(dir, name, 1)
    }

    /// Boots the rootfs with the agent, 256 MiB, `vcpus` vCPUs.
    fn boot_with(dir: &Path, name: &str, vcpus: u8) -> Self {
        let uds = dir.join(format!("{name}.vsock"));
        let mut cmd = kiln_vmm_rootfs(&rootfs(), true, &uds, 256, CMDLINE);
        cmd.args(["--vcpus", &vcpus.to_string()]);
        Self::start(dir, name, cmd)
    }

    /// A new kiln-vmm restored from `state` and `mem`, with its own vsock socket.
    fn restore(dir: &Path, name: &str, state: &Path, mem: &Path, track_dirty: bool) -> Self {
        let lab = Self::start(dir, name, kiln_vmm());
        let body = snapshot_load_body(state, mem, track_dirty, &lab.uds);
        lab.vm.ok("PUT", "/snapshot/load", &body);
        lab
    }

    fn pause(&self) {
        self.vm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    }

    fn resume(&self) {
        self.vm.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    }

    fn snapshot(&self, state: &Path, mem: &Path, kind: &str) {
        self.vm.ok(
            "PUT",
            "/snapshot/create",
            &snapshot_create_body(state, mem, kind),
        );
    }

    /// The agent, once it answers.
    fn agent(&self) -> Client {
        wait_ready(&self.uds, Instant::now() + AGENT_WAIT).expect("the agent answers")
    }
}

fn counter(client: &Client) -> u64 {
    sh(client, "cat /tmp/counter")
        .trim()
        .parse()
        .expect("a count")
}

/// The guest process the tests keep alive across snapshots: a count in memory, written out.
const COUNTER: &str = "setsid python3 -c 'import time\nn=0\nwhile True:\n    n+=1\n    open(\"/tmp/counter.new\",\"w\").write(str(n))\n    __import__(\"os\").rename(\"/tmp/counter.new\",\"/tmp/counter\")\n    time.sleep(0.02)' </dev/null >/dev/null 2>&1 &
while [ ! -s /tmp/counter ]; do sleep 0.05; done";

fn host_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn snapshot_restored_vms_continue_and_clones_are_not_twins() {
    let scratch = ScratchDir::new("snap-restore");
    let dir = scratch.path();
    let (state, mem) = (dir.join("full.state"), dir.join("full.mem"));
    {
        let vm = LabVm::boot(dir, "boot");
        let client = vm.agent();
        sh(&client, "echo kept-across-restore > /tmp/note");
        sh(&client, COUNTER);
        let before = counter(&client);
        vm.pause();
        vm.snapshot(&state, &mem, "Full");
        assert!(before > 0);

        // A second snapshot over the same files, killed while it writes, must leave the first.
        vm.resume();
        std::thread::sleep(Duration::from_millis(200));
        vm.pause();
        let (tx, rx) = mpsc::channel();
        let (sock, body) = (
            vm.vm.sock().to_path_buf(),
            snapshot_create_body(&state, &mem, "Full"),
        );
        std::thread::spawn(move || {
            let _ = tx.send(request(&sock, "PUT", "/snapshot/create", Some(&body)));
        });
        let start = Instant::now();
        let temporary = loop {
            let found = std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .any(|e| kiln_snapshot::is_temporary_name(&e.file_name()));
            if found {
                break true;
            }
            if rx.try_recv().is_ok() || start.elapsed() > Duration::from_secs(60) {
                break false;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert!(
            temporary,
            "the second snapshot never showed its temporary file"
        );
        // Killed at once: a zero deadline.
        vm.vm.finish(Duration::ZERO);
        assert!(
            rx.recv_timeout(Duration::from_secs(10))
                .is_ok_and(|r| r.is_err()),
            "the killed snapshot did not complete"
        );
    }

    // A new process carries on from the first snapshot.
    let restored = LabVm::restore(dir, "restored", &state, &mem, false);
    let client = restored.agent();
    client
        .restored_now(BTreeMap::new())
        .expect("post-restore step");
    assert_eq!(sh(&client, "cat /tmp/note"), "kept-across-restore\n");
    let first = counter(&client);
    std::thread::sleep(Duration::from_millis(500));
    let later = counter(&client);
    assert!(
        later > first,
        "the guest's counter runs on: {first} then {later}"
    );
    let guest_now: u64 = sh(&client, "date +%s").trim().parse().unwrap();
    assert!(
        guest_now.abs_diff(host_secs()) <= 5,
        "the restored guest's clock was stepped to the host's: {guest_now} vs {}",
        host_secs()
    );
    drop(client);
    drop(restored);

    // Three clones at once, each with its own socket, commands and randomness.
    let clones: Vec<LabVm> = (0..3)
        .map(|i| LabVm::restore(dir, &format!("clone{i}"), &state, &mem, false))
        .collect();
    let mut seen = Vec::new();
    for (i, vm) in clones.iter().enumerate() {
        let client = vm.agent();
        let env = BTreeMap::from([("CLONE".to_string(), i.to_string())]);
        client.restored_now(env).expect("post-restore step");
        assert_eq!(
            sh(&client, "echo clone-$CLONE > /tmp/who; cat /tmp/who"),
            format!("clone-{i}\n")
        );
        let random = sh(
            &client,
            "cat /proc/sys/kernel/random/uuid; head -c 16 /dev/urandom | od -An -tx1",
        );
        assert!(
            !seen.contains(&random),
            "clone {i} repeats another's randomness: {random}"
        );
        seen.push(random);
    }
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn snapshot_diff_holds_what_changed_and_merges_into_its_base() {
    let scratch = ScratchDir::new("snap-diff");
    let dir = scratch.path();
    let (base_state, base_mem) = (dir.join("base.state"), dir.join("base.mem"));
    {
        // Two vCPUs here, so SMP guests' state (both LAPICs, an idle AP) round-trips too.
        let vm = LabVm::boot_with(dir, "boot", 2);
        drop(vm.agent());
        vm.pause();
        vm.snapshot(&base_state, &base_mem, "Full");
    }
    let vm = LabVm::restore(dir, "tracked", &base_state, &base_mem, true);
    let client = vm.agent();
    client
        .restored_now(BTreeMap::new())
        .expect("post-restore step");
    // A base taken with tracking on, so the diff below is relative to it.
    vm.pause();
    vm.snapshot(&dir.join("base2.state"), &dir.join("base2.mem"), "Full");
    vm.resume();
    // A snapshot resets the guest's vsock connections (as on Firecracker): connect again.
    drop(client);
    let client = vm.agent();
    let sum = sh(
        &client,
        "head -c 10485760 /dev/urandom > /tmp/ten && sha256sum /tmp/ten | cut -d' ' -f1",
    );
    vm.pause();
    let (diff_state, diff_mem) = (dir.join("diff.state"), dir.join("diff.mem"));
    vm.snapshot(&diff_state, &diff_mem, "Diff");
    drop(client);
    drop(vm);

    let f = std::fs::File::open(&diff_mem).unwrap();
    let data: u64 = kiln_snapshot::data_ranges(&f, &diff_mem)
        .unwrap()
        .iter()
        .map(|r| r.end - r.start)
        .sum();
    assert!(
        (10 << 20..48 << 20).contains(&data),
        "the diff holds about the 10 MiB written, not 256 MiB: {data} bytes"
    );
    let merged = dir.join("merged.mem");
    std::fs::copy(dir.join("base2.mem"), &merged).unwrap();
    let base_sum = file_sha256(&dir.join("base2.mem"));
    kiln_snapshot::merge(&merged, &[diff_mem]).unwrap();
    assert_eq!(
        file_sha256(&dir.join("base2.mem")),
        base_sum,
        "the base copy is untouched"
    );

    let vm = LabVm::restore(dir, "merged", &diff_state, &merged, false);
    let client = vm.agent();
    client
        .restored_now(BTreeMap::new())
        .expect("post-restore step");
    assert_eq!(sh(&client, "sha256sum /tmp/ten | cut -d' ' -f1"), sum);
    // Both vCPUs came back and run work.
    assert_eq!(sh(&client, "nproc"), "2\n");
    assert_eq!(
        sh(&client, "taskset -c 1 sh -c 'echo on-cpu1'"),
        "on-cpu1\n"
    );
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn snapshot_pause_does_not_show_in_the_guest_clock() {
    let scratch = ScratchDir::new("snap-pause");
    let dir = scratch.path();
    let vm = LabVm::boot(dir, "boot");
    let client = vm.agent();
    let uptime =
        |c: &Client| -> f64 { sh(c, "cut -d' ' -f1 /proc/uptime").trim().parse().unwrap() };
    let host_start = Instant::now();
    let before = uptime(&client);
    vm.pause();
    std::thread::sleep(Duration::from_secs(2));
    vm.resume();
    let after = uptime(&client);
    let host = host_start.elapsed().as_secs_f64();
    assert!(
        after - before < host - 1.5,
        "the guest saw {:.2} s pass while the host saw {host:.2} s, 2 s of it paused",
        after - before
    );
    assert!(after > before, "the guest clock still moves");
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn snapshot_kiln_cli_creates_and_runs_clones() {
    let scratch = ScratchDir::new("snap-cli");
    let dir = scratch.path();
    let snap = dir.join("template");
    {
        let vm = LabVm::boot(dir, "boot");
        drop(vm.agent());
        let out = Command::new("kiln")
            .args(["snapshot", "create", "--api-sock"])
            .arg(vm.vm.sock())
            .arg("--dir")
            .arg(&snap)
            .output()
            .expect("run kiln snapshot create");
        assert!(
            out.status.success(),
            "kiln snapshot create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (state_sum, mem_sum) = (
        file_sha256(&snap.join("vmstate")),
        file_sha256(&snap.join("memory")),
    );
    // Each clone's output with the host's clock read just before and just after its run.
    let clone = |n: &str| {
        let before = host_secs();
        let out = Command::new("kiln")
            .args(["run", "--snapshot"])
            .arg(&snap)
            .args(["--env", &format!("WHO={n}"), "--"])
            .args([
                "sh",
                "-c",
                "echo $WHO; date +%s; head -c 16 /dev/urandom | od -An -tx1; python3 -c 'print(6*7)'",
            ])
            .output()
            .expect("run kiln run --snapshot");
        assert_eq!(
            out.status.code(),
            Some(0),
            "kiln run --snapshot: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let after = host_secs();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            before,
            after,
        )
    };
    let ((a, a_from, a_to), (b, b_from, b_to)) = (clone("a"), clone("b"));
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    assert_eq!((la[0], lb[0]), ("a", "b"), "{a}\n{b}");
    for (lines, from, to) in [(&la, a_from, a_to), (&lb, b_from, b_to)] {
        // The guest read its clock during its own run: it must fall in that window (whole
        // seconds, so one second of rounding either side), however loaded the machine is.
        let guest: u64 = lines[1].trim().parse().unwrap();
        assert!(
            (from.saturating_sub(1)..=to + 1).contains(&guest),
            "the clone's clock {guest} is outside its run [{from}, {to}]"
        );
        assert_eq!(lines[3], "42");
    }
    assert_ne!(la[2], lb[2], "the clones' random bytes differ");
    assert_eq!(
        file_sha256(&snap.join("vmstate")),
        state_sum,
        "the snapshot is only read"
    );
    assert_eq!(file_sha256(&snap.join("memory")), mem_sum);
}
