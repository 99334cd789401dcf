//! `kiln-lab-bench memory`: what free page reporting buys a sandbox host. One 512 MiB guest per
//! VMM, booted from the Debian rootfs with the agent (read-only root under a tmpfs overlay, as
//! `kiln run` does): kiln-vmm with its balloon (free page reporting, deflate_on_oom), and QEMU
//! microvm with `virtio-balloon-device,free-page-reporting=on,deflate-on-oom=on`, same kernel,
//! same agent (which sets zram, THP off and 2 MiB reporting blocks in both). For each:
//! - host memory of the VM's process (RSS) idle, holding a 300 MiB workload, and after the
//!   workload exited (settled), with how long it took to fall to 1.2x idle;
//! - a full snapshot right after: Kiln's memory file (allocated bytes), QEMU's migration stream
//!   written to a file (`migrate exec:cat > FILE`, zero pages sent as flags); and Kiln again after
//!   `kiln snapshot create --reclaim`'s step (drop caches and compact, then wait for the reports),
//!   with what that step cost;
//! - restore from that snapshot to the agent's first reply (Kiln: a new kiln-vmm and
//!   `snapshot/load`; QEMU: a new QEMU with `-incoming`);
//! - what KVM's dirty log costs a guest that frees and rewrites memory (Kiln only): the restored
//!   VM writes 300 MiB, frees it and waits for the reports, three times, loaded once without
//!   the log (the balloon alone does not turn it on) and once with `track_dirty_pages` (every
//!   report then re-protects every page written since, and KVM maps 4 KiB pages only).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_agent::client::{Client, wait_ready};
use kiln_agent::protocol::{ExecSpec, ExitStatus};
use kiln_tests::memory::{HostMemory, host_memory, settled_memory, wait_for_memory};
use kiln_tests::{
    ApiVmm, guest_kernel, kiln_vmm, kiln_vmm_rootfs, qemu_microvm, rootfs, snapshot_create_body,
    snapshot_load_body,
};
use serde_json::json;

use crate::median;
use crate::peer::{QEMU_CID, qemu_agent};
use crate::qmp::Qmp;

const MEM_MIB: u32 = 512;
const WORKLOAD_MIB: u64 = 300;
const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(180);
const CMDLINE: &str = "console=ttyS0 panic=-1 quiet init=/usr/sbin/kiln-agent KILN_OVERLAY=tmpfs";
/// Drops the guest's caches and compacts it (what `kiln snapshot create --reclaim` runs).
const RECLAIM: &str =
    "sync && echo 3 > /proc/sys/vm/drop_caches && echo 1 > /proc/sys/vm/compact_memory";
/// How long `--reclaim` waits for the guest's reports.
const REPORTING_WAIT: Duration = Duration::from_secs(3);

/// What one VMM measured.
#[derive(Default)]
struct Sample {
    idle: f64,
    peak: f64,
    after: f64,
    settle_ms: Option<f64>,
    snapshot_mib: f64,
    snapshot_ms: f64,
    reclaimed_mib: Option<f64>,
    reclaim_ms: Option<f64>,
    restore_ms: f64,
    rewrite_ms: Option<f64>,
    rewrite_logged_ms: Option<f64>,
}

fn mib(b: u64) -> f64 {
    HostMemory::mib(b)
}

fn run_ok(client: &Client, script: &str) -> Result<(), String> {
    let out = client
        .run(ExecSpec::new(["sh", "-c", script]))
        .map_err(|e| format!("exec {script:?}: {e}"))?;
    if out.status != ExitStatus::Exited(0) {
        return Err(format!(
            "{script:?} ended with {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Idle, holding the workload and after it: the memory readings of `pid` (RSS) and the time from
/// the workload's end to 1.2x idle.
fn workload(pid: u32, client: &Client, s: &mut Sample) -> Result<(), String> {
    let rss = |m: &HostMemory| m.rss;
    // Python's own files stay in the guest's page cache: load them before the idle reading.
    run_ok(client, "python3 -c 'import time'")?;
    let idle = settled_memory(pid, rss, Duration::from_secs(5), 2 * MIB, LIMIT)?;
    run_ok(
        client,
        &format!(
            "setsid python3 -c 'import time; b = bytes([1]) * ({WORKLOAD_MIB} << 20); open(\"/tmp/held\", \"w\").close(); time.sleep(3600)' </dev/null >/dev/null 2>&1 &
             echo $! > /tmp/hold.pid; while [ ! -e /tmp/held ]; do sleep 0.1; done"
        ),
    )?;
    let peak = host_memory(pid)?;
    run_ok(
        client,
        "p=$(cat /tmp/hold.pid); kill $p; while [ -e /proc/$p ]; do sleep 0.1; done",
    )?;
    let goal = idle.rss + idle.rss / 5;
    let (_, took) = wait_for_memory(pid, LIMIT, |m| m.rss <= goal)?;
    let after = settled_memory(pid, rss, Duration::from_secs(5), 2 * MIB, LIMIT)?;
    s.idle = mib(idle.rss);
    s.peak = mib(peak.rss);
    s.after = mib(after.rss);
    s.settle_ms = took.map(|t| t.as_secs_f64() * 1e3);
    Ok(())
}

fn kiln(dir: &Path, run: usize) -> Result<Sample, String> {
    let mut s = Sample::default();
    let uds = dir.join(format!("kiln{run}.vsock"));
    let mut cmd = kiln_vmm_rootfs(
        &rootfs(),
        true,
        &uds,
        MEM_MIB,
        &format!("{CMDLINE} reboot=k"),
    );
    cmd.args(["--balloon", "free_page_reporting,deflate_on_oom"])
        .args(["--serial-out", "/dev/null"]);
    let vm = ApiVmm::start(cmd, &dir.join(format!("kiln{run}.api")));
    let client = wait_ready(&uds, Instant::now() + LIMIT).map_err(|e| format!("kiln: {e}"))?;
    workload(vm.pid(), &client, &mut s)?;

    let (state, mem) = (dir.join("kiln.state"), dir.join("kiln.mem"));
    vm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let start = Instant::now();
    vm.ok(
        "PUT",
        "/snapshot/create",
        &snapshot_create_body(&state, &mem, "Full"),
    );
    s.snapshot_ms = start.elapsed().as_secs_f64() * 1e3;
    s.snapshot_mib = mib(allocated(&mem)?);

    // Again after the guest dropped its caches and compacted.
    vm.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    drop(client);
    let client = wait_ready(&uds, Instant::now() + LIMIT).map_err(|e| format!("kiln: {e}"))?;
    let start = Instant::now();
    run_ok(&client, RECLAIM)?;
    s.reclaim_ms = Some(start.elapsed().as_secs_f64() * 1e3);
    std::thread::sleep(REPORTING_WAIT);
    vm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (state2, mem2) = (dir.join("kiln2.state"), dir.join("kiln2.mem"));
    vm.ok(
        "PUT",
        "/snapshot/create",
        &snapshot_create_body(&state2, &mem2, "Full"),
    );
    s.reclaimed_mib = Some(mib(allocated(&mem2)?));
    drop(vm);
    let _ = std::fs::remove_file(&mem2);

    let uds = dir.join(format!("kiln{run}r.vsock"));
    let start = Instant::now();
    let restored = ApiVmm::start(kiln_vmm(), &dir.join(format!("kiln{run}r.api")));
    restored.ok(
        "PUT",
        "/snapshot/load",
        &snapshot_load_body(&state, &mem, false, &uds),
    );
    let client =
        wait_ready(&uds, Instant::now() + LIMIT).map_err(|e| format!("kiln restore: {e}"))?;
    s.restore_ms = start.elapsed().as_secs_f64() * 1e3;
    s.rewrite_ms = Some(rewrite(&client)?);
    drop(client);
    drop(restored);

    let uds = dir.join(format!("kiln{run}l.vsock"));
    let logged = ApiVmm::start(kiln_vmm(), &dir.join(format!("kiln{run}l.api")));
    logged.ok(
        "PUT",
        "/snapshot/load",
        &snapshot_load_body(&state, &mem, true, &uds),
    );
    let client =
        wait_ready(&uds, Instant::now() + LIMIT).map_err(|e| format!("kiln restore: {e}"))?;
    s.rewrite_logged_ms = Some(rewrite(&client)?);
    drop(client);
    drop(logged);
    let _ = std::fs::remove_file(&mem);
    Ok(s)
}

/// Writes the workload, frees it and waits for the reports, three times; the time spent writing.
fn rewrite(client: &Client) -> Result<f64, String> {
    let mut ms = 0.0;
    for _ in 0..3 {
        let start = Instant::now();
        run_ok(
            client,
            &format!("python3 -c 'b = bytes([1]) * ({WORKLOAD_MIB} << 20)'"),
        )?;
        ms += start.elapsed().as_secs_f64() * 1e3;
        std::thread::sleep(REPORTING_WAIT);
    }
    Ok(ms)
}

/// A QEMU process killed when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// QEMU for run files named `name` in `dir`: its QMP socket `NAME.qmp`, its console (serial on
/// stdout) in `NAME.console`.
fn qemu_cmd(dir: &Path, name: &str, incoming: Option<&Path>) -> Result<Command, String> {
    let qmp = dir.join(format!("{name}.qmp"));
    let console_path = dir.join(format!("{name}.console"));
    let console = std::fs::File::create(&console_path)
        .map_err(|e| format!("{}: {e}", console_path.display()))?;
    let mut c = qemu_microvm(1, MEM_MIB);
    c.arg("-kernel").arg(guest_kernel());
    // microvm has no i8042: reboot=t (a triple fault ends QEMU under -no-reboot).
    // Without `quiet`: the console (kept in NAME.console) then shows how far the guest got.
    let cmdline = CMDLINE.replace(" quiet", "");
    c.args(["-append", &format!("{cmdline} reboot=t root=/dev/vda ro")]);
    c.arg("-drive").arg(format!(
        "id=d0,file={},format=raw,if=none,readonly=on",
        rootfs().display()
    ));
    c.args(["-device", "virtio-blk-device,drive=d0"]);
    c.args([
        "-device",
        &format!("vhost-vsock-device,guest-cid={QEMU_CID}"),
    ]);
    c.args([
        "-device",
        "virtio-balloon-device,free-page-reporting=on,deflate-on-oom=on",
    ]);
    c.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if let Some(file) = incoming {
        c.args(["-incoming", &format!("exec:cat {}", file.display())]);
    }
    c.stdin(Stdio::null()).stdout(console);
    Ok(c)
}

/// The agent of the QEMU `vm` whose run files are `name`, or an error ending with what QEMU says
/// of its guest (QMP's run state and the vCPU's registers) and its console's tail.
fn qemu_agent_of(vm: &mut Qemu, dir: &Path, name: &str) -> Result<Client, String> {
    qemu_agent(Instant::now() + LIMIT).map_err(|e| {
        let console =
            std::fs::read_to_string(dir.join(format!("{name}.console"))).unwrap_or_default();
        let lines: Vec<&str> = console.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!(
            "{e}; {}; the end of its console:\n{tail}",
            qemu_state(vm, &dir.join(format!("{name}.qmp")))
        )
    })
}

/// Whether QEMU runs, and if so its guest's run state and where its vCPU is.
fn qemu_state(vm: &mut Qemu, qmp: &Path) -> String {
    if let Ok(Some(status)) = vm.0.try_wait() {
        return format!("QEMU exited: {status}");
    }
    let mut qmp = match Qmp::connect(qmp, Instant::now() + Duration::from_secs(5)) {
        Ok(q) => q,
        Err(e) => return format!("QEMU runs but its QMP does not answer: {e}"),
    };
    let status = qmp
        .execute("query-status", json!({}))
        .map_or_else(|e| e, |v| v.to_string());
    let regs = qmp
        .execute(
            "human-monitor-command",
            json!({"command-line": "info registers"}),
        )
        .map_or_else(|e| e, |v| v.as_str().unwrap_or_default().to_string());
    let regs: Vec<&str> = regs
        .lines()
        .filter(|l| l.starts_with("RAX") || l.starts_with("RSI") || l.starts_with("RIP"))
        .collect();
    format!("QEMU's guest: {status}, {}", regs.join(" / "))
}

fn qemu(dir: &Path, run: usize) -> Result<Sample, String> {
    let mut s = Sample::default();
    let name = format!("qemu{run}");
    let qmp_path = dir.join(format!("{name}.qmp"));
    let mut vm = Qemu(
        qemu_cmd(dir, &name, None)?
            .spawn()
            .map_err(|e| format!("starting QEMU: {e}"))?,
    );
    let client = qemu_agent_of(&mut vm, dir, &name)?;
    workload(vm.0.id(), &client, &mut s)?;
    drop(client);

    let stream = dir.join("qemu.migration");
    let mut qmp = Qmp::connect(&qmp_path, Instant::now() + LIMIT)?;
    qmp.execute("stop", json!({}))?;
    let start = Instant::now();
    qmp.migrate(&format!("exec:cat > {}", stream.display()))?;
    s.snapshot_ms = start.elapsed().as_secs_f64() * 1e3;
    s.snapshot_mib = mib(allocated(&stream)?);
    let _ = qmp.execute("quit", json!({}));
    drop(vm);

    let start = Instant::now();
    let name = format!("qemu{run}r");
    let mut restored = Qemu(
        qemu_cmd(dir, &name, Some(&stream))?
            .spawn()
            .map_err(|e| format!("starting QEMU -incoming: {e}"))?,
    );
    // The stream carries the source's run state, and the source was stopped for it: the
    // destination stays paused after the stream is in until told to continue.
    resume_after_incoming(&dir.join(format!("{name}.qmp")))?;
    let client = qemu_agent_of(&mut restored, dir, &name)?;
    s.restore_ms = start.elapsed().as_secs_f64() * 1e3;
    drop(client);
    drop(restored);
    let _ = std::fs::remove_file(&stream);
    Ok(s)
}

/// Waits for an incoming QEMU to have its whole migration stream, then runs its guest.
fn resume_after_incoming(qmp_path: &Path) -> Result<(), String> {
    let end = Instant::now() + LIMIT;
    let mut qmp = Qmp::connect(qmp_path, end)?;
    loop {
        let status = qmp.execute("query-status", json!({}))?;
        match status["status"].as_str() {
            Some("running") => return Ok(()),
            Some("paused" | "postmigrate") => {
                qmp.execute("cont", json!({}))?;
                return Ok(());
            }
            _ if Instant::now() > end => {
                return Err(format!(
                    "QEMU's incoming migration did not finish: {status}"
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn allocated(path: &Path) -> Result<u64, String> {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn med(samples: &[Sample], f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    let mut v: Vec<f64> = samples.iter().filter_map(f).collect();
    (!v.is_empty()).then(|| median(&mut v))
}

fn print_row(name: &str, samples: &[Sample]) {
    let m = |f: fn(&Sample) -> f64| med(samples, |s| Some(f(s))).unwrap_or(f64::NAN);
    let settle = med(samples, |s| s.settle_ms)
        .map_or_else(|| "never".to_string(), |ms| format!("{:.1} s", ms / 1e3));
    println!(
        "  | {name} | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.2}x | {settle} |",
        m(|s| s.idle),
        m(|s| s.peak),
        m(|s| s.after),
        m(|s| s.after) / m(|s| s.idle)
    );
}

/// Runs the memory benchmark `runs` times per VMM, interleaved.
pub fn run(runs: usize) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("kiln-bench-mem-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (mut k, mut q, mut q_failed) = (Vec::new(), Vec::new(), None);
    for run in 0..runs {
        // The peer first, in an L1 nothing else has used yet; a failing peer does not stop the
        // Kiln runs, and fails the benchmark at the end.
        match qemu(&dir, run) {
            Ok(s) => {
                q.push(s);
                eprintln!("qemu run {}/{runs} done", run + 1);
            }
            Err(e) => {
                eprintln!("qemu run {}/{runs} failed: {e}", run + 1);
                q_failed = Some(e);
            }
        }
        let s = kiln(&dir, run)?;
        // Printed as they come: a failing peer must not take Kiln's own figures with it.
        eprintln!(
            "kiln run {}/{runs}: idle {:.0} MiB, holding {:.0}, after {:.0}; snapshot {:.1} MiB, \
             {:.1} MiB after --reclaim's step; restore {:.0} ms",
            run + 1,
            s.idle,
            s.peak,
            s.after,
            s.snapshot_mib,
            s.reclaimed_mib.unwrap_or(f64::NAN),
            s.restore_ms
        );
        k.push(s);
    }
    let ram = f64::from(MEM_MIB);
    println!(
        "host memory of a {MEM_MIB} MiB VM (RSS of its process), median of {runs}: idle, holding a {WORKLOAD_MIB} MiB workload, and after it exited:"
    );
    println!("  | | idle | holding | after | after / idle | to 1.2x idle |");
    println!("  |---|---|---|---|---|---|");
    print_row("kiln-vmm (balloon, free page reporting)", &k);
    print_row(
        "qemu microvm (virtio-balloon-device, free-page-reporting=on)",
        &q,
    );
    let m = |v: &[Sample], f: fn(&Sample) -> f64| med(v, |s| Some(f(s))).unwrap_or(f64::NAN);
    println!(
        "\nsnapshot right after the workload, and restore from it to the agent's first reply:"
    );
    println!("  | | snapshot size | of RAM | create | restore |");
    println!("  |---|---|---|---|---|");
    println!(
        "  | kiln-vmm memory file (allocated) | {:.1} MiB | {:.1} % | {:.0} ms | {:.0} ms |",
        m(&k, |s| s.snapshot_mib),
        m(&k, |s| s.snapshot_mib) * 100.0 / ram,
        m(&k, |s| s.snapshot_ms),
        m(&k, |s| s.restore_ms)
    );
    println!(
        "  | qemu migration stream to a file | {:.1} MiB | {:.1} % | {:.0} ms | {:.0} ms |",
        m(&q, |s| s.snapshot_mib),
        m(&q, |s| s.snapshot_mib) * 100.0 / ram,
        m(&q, |s| s.snapshot_ms),
        m(&q, |s| s.restore_ms)
    );
    if let (Some(size), Some(cost)) = (med(&k, |s| s.reclaimed_mib), med(&k, |s| s.reclaim_ms)) {
        println!(
            "  | kiln-vmm after drop caches + compact | {size:.1} MiB | {:.1} % | +{cost:.0} ms in the guest, +{} ms waiting for reports | |",
            size * 100.0 / ram,
            REPORTING_WAIT.as_millis()
        );
    }
    if let (Some(plain), Some(logged)) =
        (med(&k, |s| s.rewrite_ms), med(&k, |s| s.rewrite_logged_ms))
    {
        println!(
            "\nKVM's dirty log: a restored kiln-vmm VM writing {WORKLOAD_MIB} MiB, freeing it and waiting for the reports, 3 times (time writing):"
        );
        println!("  | | write time | ratio |");
        println!("  |---|---|---|");
        println!("  | balloon, no dirty log (the default) | {plain:.0} ms | 1.00x |");
        println!(
            "  | balloon + track_dirty_pages (KVM's dirty log) | {logged:.0} ms | {:.2}x |",
            logged / plain
        );
    }
    let after_ratio = m(&k, |s| s.after) / m(&k, |s| s.idle);
    let snap = m(&k, |s| s.snapshot_mib) * 100.0 / ram;
    println!(
        "\ngoals: host memory after the workload <= 1.2x idle: {after_ratio:.2}x ({}); snapshot <= 15 % of RAM: {snap:.1} % ({})",
        if after_ratio <= 1.2 { "met" } else { "NOT met" },
        if snap <= 15.0 { "met" } else { "NOT met" }
    );
    println!(
        "kiln-vmm vs QEMU: after-workload memory {:.2}x, snapshot {:.2}x, restore {:.2}x (QEMU / Kiln)",
        m(&q, |s| s.after) / m(&k, |s| s.after),
        m(&q, |s| s.snapshot_mib) / m(&k, |s| s.snapshot_mib),
        m(&q, |s| s.restore_ms) / m(&k, |s| s.restore_ms)
    );
    let _ = std::fs::remove_dir_all(&dir);
    match q_failed {
        Some(e) => Err(format!(
            "{} of {runs} QEMU runs failed, the last with: {e}",
            runs - q.len()
        )),
        None => Ok(()),
    }
}
