//! `kiln-lab-bench snapshot`: what snapshots cost and buy. A Kiln VM with the agent is booted
//! over the API (dirty page tracking on), then:
//! - snapshot create time and file sizes (apparent and allocated) for Full, and for a Diff after
//!   the guest wrote 10 MiB;
//! - restore latency, from spawning kiln-vmm to the agent's first reply, p50/p99 over N runs,
//!   against booting the same guest to its first agent reply under kiln-vmm and QEMU microvm;
//! - the memory (PSS) of 10 VMs restored from one snapshot against 10 booted VMs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_agent::client::{Client, wait_ready};
use kiln_agent::protocol::ExecSpec;
use kiln_api::client::request;
use kiln_tests::{guest_kernel, rootfs, snapshot_create_body, snapshot_load_body};

use crate::exec::percentiles;
use crate::peer::{Peer, Vm};

const MEM_MIB: u32 = 256;
const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet init=/usr/sbin/kiln-agent KILN_OVERLAY=tmpfs";
const LIMIT: Duration = Duration::from_secs(120);
const FLEET: usize = 10;

/// A kiln-vmm process and its sockets.
pub struct KilnVm {
    child: Child,
    sock: PathBuf,
    /// Its vsock Unix socket.
    pub uds: PathBuf,
}

impl Drop for KilnVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl KilnVm {
    /// Starts `kiln-vmm --api-sock` as `name` in `dir` and waits for its socket. With
    /// `KILN_BENCH_LEVEL` set (`Debug`, say) the VMM logs at that level on stderr, which shows
    /// where its own time goes (`cargo xtask lab -- sh -c 'KILN_BENCH_LEVEL=Debug kiln-lab-bench
    /// restore --runs 2'`).
    pub fn spawn(dir: &Path, name: &str) -> Result<Self, String> {
        let sock = dir.join(format!("{name}.api"));
        let uds = dir.join(format!("{name}.vsock"));
        let child = Command::new("kiln-vmm")
            .arg("--api-sock")
            .arg(&sock)
            .arg("--serial-out")
            .arg("/dev/null")
            .args(
                std::env::var("KILN_BENCH_LEVEL")
                    .map(|l| vec!["--level".to_string(), l])
                    .unwrap_or_default(),
            )
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting kiln-vmm: {e}"))?;
        // The socket file appears at bind, a moment before it listens: wait until it accepts.
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if start.elapsed() > LIMIT {
                return Err("kiln-vmm's API socket never answered".into());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(Self { child, sock, uds })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One API request that must answer 204.
    pub fn api(&self, method: &str, path: &str, body: &str) -> Result<(), String> {
        match request(&self.sock, method, path, Some(body)) {
            Ok((204, _)) => Ok(()),
            Ok((code, text)) => Err(format!("{method} {path}: {code} {text}")),
            Err(e) => Err(format!("{method} {path}: {e}")),
        }
    }

    /// Boots the rootfs with the agent, configured over the API.
    pub fn boot(dir: &Path, name: &str) -> Result<Self, String> {
        let vm = Self::spawn(dir, name)?;
        vm.api(
            "PUT",
            "/boot-source",
            &format!(
                r#"{{"kernel_image_path": "{}", "boot_args": "{CMDLINE}"}}"#,
                guest_kernel().display()
            ),
        )?;
        vm.api(
            "PUT",
            "/machine-config",
            &format!(
                r#"{{"vcpu_count": 1, "mem_size_mib": {MEM_MIB}, "track_dirty_pages": true}}"#
            ),
        )?;
        vm.api(
            "PUT",
            "/drives/rootfs",
            &format!(
                r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": true}}"#,
                rootfs().display()
            ),
        )?;
        vm.api(
            "PUT",
            "/vsock",
            &format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, vm.uds.display()),
        )?;
        vm.api("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#)?;
        Ok(vm)
    }

    /// A new process restored from `state`/`mem`, resumed at once.
    fn restore(dir: &Path, name: &str, state: &Path, mem: &Path) -> Result<Self, String> {
        let vm = Self::spawn(dir, name)?;
        vm.load(state, mem)?;
        Ok(vm)
    }

    /// Loads `state`/`mem` into this (fresh) process and resumes it.
    pub fn load(&self, state: &Path, mem: &Path) -> Result<(), String> {
        self.api(
            "PUT",
            "/snapshot/load",
            &snapshot_load_body(state, mem, false, &self.uds),
        )
    }

    /// [`load`](Self::load), mapping in the working set `ws` before the guest runs.
    pub fn load_with_working_set(&self, state: &Path, mem: &Path, ws: &Path) -> Result<(), String> {
        let mut body: serde_json::Value =
            serde_json::from_str(&snapshot_load_body(state, mem, false, &self.uds))
                .map_err(|e| format!("the load body: {e}"))?;
        body["working_set_path"] = ws.display().to_string().into();
        self.api("PUT", "/snapshot/load", &body.to_string())
    }

    /// The agent, once it answers a ping.
    pub fn agent(&self) -> Result<Client, String> {
        let client = wait_ready(&self.uds, Instant::now() + LIMIT)
            .map_err(|e| format!("the agent did not answer: {e}"))?;
        Ok(client)
    }

    /// Takes a snapshot of the (paused) VM; returns how long it took.
    pub fn snapshot(&self, state: &Path, mem: &Path, kind: &str) -> Result<Duration, String> {
        let start = Instant::now();
        self.api(
            "PUT",
            "/snapshot/create",
            &snapshot_create_body(state, mem, kind),
        )?;
        Ok(start.elapsed())
    }

    /// Proportional set size of the process, in KiB.
    fn pss_kib(&self) -> Result<u64, String> {
        let path = format!("/proc/{}/smaps_rollup", self.child.id());
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("{path} has no Pss line"))
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// Apparent and allocated size of a file, in MiB.
fn sizes(path: &Path) -> Result<(f64, f64), String> {
    let m = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((mib(m.len()), mib(m.blocks() * 512)))
}

/// Creates, measures and returns the Full snapshot the rest of the benchmark restores from.
fn take_snapshots(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let vm = KilnVm::boot(dir, "template")?;
    let client = vm.agent()?;
    client
        .run(ExecSpec::new(["true"]))
        .map_err(|e| format!("exec: {e}"))?;
    drop(client);
    vm.api("PATCH", "/vm", r#"{"state": "Paused"}"#)?;
    let (state, mem) = (dir.join("full.state"), dir.join("full.mem"));
    let full = vm.snapshot(&state, &mem, "Full")?;
    vm.api("PATCH", "/vm", r#"{"state": "Resumed"}"#)?;
    let client = vm.agent()?;
    client
        .run(ExecSpec::new([
            "sh",
            "-c",
            "head -c 10485760 /dev/urandom > /tmp/ten",
        ]))
        .map_err(|e| format!("exec: {e}"))?;
    drop(client);
    vm.api("PATCH", "/vm", r#"{"state": "Paused"}"#)?;
    let (diff_state, diff_mem) = (dir.join("diff.state"), dir.join("diff.mem"));
    let diff = vm.snapshot(&diff_state, &diff_mem, "Diff")?;
    let (full_len, full_alloc) = sizes(&mem)?;
    let (diff_len, diff_alloc) = sizes(&diff_mem)?;
    let state_kib = std::fs::metadata(&state)
        .map(|m| m.len() / 1024)
        .unwrap_or(0);
    println!("snapshot create ({MEM_MIB} MiB guest, paused):");
    println!("  | | time | memory file (apparent) | memory file (allocated) | state file |");
    println!("  |---|---|---|---|---|");
    println!(
        "  | Full | {:.0} ms | {full_len:.0} MiB | {full_alloc:.1} MiB | {state_kib} KiB |",
        full.as_secs_f64() * 1e3
    );
    println!(
        "  | Diff after writing 10 MiB | {:.0} ms | {diff_len:.0} MiB | {diff_alloc:.1} MiB | |",
        diff.as_secs_f64() * 1e3
    );
    Ok((state, mem))
}

/// Spawn to first agent reply, for a restore.
fn restore_once(dir: &Path, i: usize, state: &Path, mem: &Path) -> Result<Duration, String> {
    let start = Instant::now();
    let vm = KilnVm::restore(dir, &format!("r{i}"), state, mem)?;
    let client = vm.agent()?;
    let took = start.elapsed();
    drop(client);
    drop(vm);
    let _ = std::fs::remove_file(dir.join(format!("r{i}.api")));
    Ok(took)
}

/// Spawn to first agent reply, for a boot under `peer`.
fn boot_once(peer: Peer) -> Result<Duration, String> {
    let start = Instant::now();
    let vm = Vm::start(peer)?;
    let took = start.elapsed();
    vm.stop()?;
    Ok(took)
}

fn fmt_ms(d: f64) -> String {
    format!("{d:.0} ms")
}

/// Runs the snapshot benchmark with `runs` restores.
pub fn run(runs: usize) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("kiln-bench-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (state, mem) = take_snapshots(&dir)?;

    let mut restores = Vec::with_capacity(runs);
    for i in 0..runs {
        let took = restore_once(&dir, i, &state, &mem)?;
        eprintln!(
            "restore {}/{runs}: {:.0} ms",
            i + 1,
            took.as_secs_f64() * 1e3
        );
        restores.push(took);
    }
    let (r50, r99) = percentiles(&mut restores);
    let boots = 3;
    let mut kiln_boot = Vec::new();
    let mut qemu_boot = Vec::new();
    for _ in 0..boots {
        kiln_boot.push(boot_once(Peer::Kiln)?);
        qemu_boot.push(boot_once(Peer::Qemu)?);
    }
    let (kb50, _) = percentiles(&mut kiln_boot);
    let (qb50, _) = percentiles(&mut qemu_boot);
    println!(
        "\ntime to the agent's first reply (spawn -> reply; restores p50/p99 over {runs}, boots median of {boots}):"
    );
    println!("  | | p50 | p99 |");
    println!("  |---|---|---|");
    println!("  | kiln-vmm restore | {} | {} |", fmt_ms(r50), fmt_ms(r99));
    println!("  | kiln-vmm boot | {} | |", fmt_ms(kb50));
    println!("  | qemu microvm boot | {} | |", fmt_ms(qb50));
    println!(
        "  restore is {:.1}x faster than QEMU's boot and {:.1}x faster than Kiln's own",
        qb50 / r50,
        kb50 / r50
    );

    let mut restored = Vec::new();
    for i in 0..FLEET {
        let vm = KilnVm::restore(&dir, &format!("fleet{i}"), &state, &mem)?;
        drop(vm.agent()?);
        restored.push(vm);
    }
    std::thread::sleep(Duration::from_secs(2));
    let restored_pss: u64 = restored.iter().map(KilnVm::pss_kib).sum::<Result<_, _>>()?;
    let mem_name = mem.to_string_lossy().into_owned();
    let restored_usage = restored
        .iter()
        .map(|vm| kiln_tests::smaps::usage(vm.child.id(), &[&mem_name]))
        .collect::<Result<Vec<_>, _>>()?;
    drop(restored);
    let mut booted = Vec::new();
    for i in 0..FLEET {
        let vm = KilnVm::boot(&dir, &format!("booted{i}"))?;
        drop(vm.agent()?);
        booted.push(vm);
    }
    std::thread::sleep(Duration::from_secs(2));
    let booted_pss: u64 = booted.iter().map(KilnVm::pss_kib).sum::<Result<_, _>>()?;
    let booted_usage = booted
        .iter()
        .map(|vm| kiln_tests::smaps::usage(vm.child.id(), &["kiln-guest-mem"]))
        .collect::<Result<Vec<_>, _>>()?;
    drop(booted);
    println!(
        "\nmemory of {FLEET} idle VMs with the agent answering ({MEM_MIB} MiB each), total PSS:"
    );
    println!("  | | PSS |");
    println!("  |---|---|");
    println!(
        "  | {FLEET} restored from one snapshot | {:.0} MiB |",
        restored_pss as f64 / 1024.0
    );
    println!(
        "  | {FLEET} booted | {:.0} MiB |",
        booted_pss as f64 / 1024.0
    );
    println!(
        "  restored clones use {:.2}x the memory of booted VMs",
        restored_pss as f64 / booted_pss as f64
    );
    println!(
        "\nwhere one restored VM's memory goes (mean of {FLEET}):\n{}",
        kiln_tests::smaps::table(&restored_usage)
    );
    println!(
        "where one booted VM's memory goes (mean of {FLEET}):\n{}",
        kiln_tests::smaps::table(&booted_usage)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
