//! `kiln-lab-bench restore [--runs N]`: restore -> first exec result, step by step. A Kiln VM with
//! the agent is booted and snapshotted (Full, paused); then, N times, a fresh restore is driven to
//! the result of its first command, timing each step:
//!
//! - spawn: starting kiln-vmm until its API socket exists;
//! - load: `PUT /snapshot/load` with `resume_vm` (state file, memory mapping, KVM and device state);
//! - connect: the agent's vsock connection and hello;
//! - clone step: the agent's `restored` (entropy, clock, environment);
//! - first exec: `true`, from request to exit status;
//! - and, for scale, a second exec of `true` in the same VM (a warm round trip).
//!
//! The same is done on the new path: `kiln-vmm` started ahead of the request (as a pool keeps
//! them) and the clone step and first exec sent with the agent's connection in one round trip;
//! and on the new path with a working set: the pages one restore touched up to its first result
//! (`PUT /snapshot/working-set`, recorded once before the runs) are mapped in by the load
//! (`working_set_path`) before the guest runs. The paths are interleaved; each is printed with
//! p50/p99 per step and in total, and the new paths' share of the old one's time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_agent::client::{self, wait_ready};
use kiln_agent::protocol::ExecSpec;
use kiln_tests::ScratchDir;

use crate::exec::percentiles;
use crate::kvm;
use crate::snapshot::KilnVm;

/// The steps of one restore, in order.
const STEPS: [&str; 6] = [
    "spawn",
    "load",
    "connect",
    "clone step",
    "first exec",
    "second exec",
];

/// One restore's step times.
type Steps = [Duration; 6];

thread_local! {
    /// KVM counter deltas (exits, faults fixed, 4K pages) per new-path restore, by path.
    static COUNTERS: std::cell::RefCell<BTreeMap<&'static str, Vec<[u64; 3]>>> =
        const { std::cell::RefCell::new(BTreeMap::new()) };
}

/// How a new-path restore is loaded.
#[derive(Clone, Copy)]
enum Prefault<'a> {
    /// Plain: every page faults in when the guest touches it.
    None,
    /// Record the working set to this file after the first result.
    Record(&'a Path),
    /// Map the working set in this file in before the guest runs.
    Apply(&'a Path),
}

/// Restores `state`/`mem` once as `name` and times each step.
fn restore_steps(dir: &Path, name: &str, state: &Path, mem: &Path) -> Result<Steps, String> {
    let t0 = Instant::now();
    let vm = KilnVm::spawn(dir, name)?;
    let t1 = Instant::now();
    vm.load(state, mem)?;
    let t2 = Instant::now();
    let client = wait_ready(&vm.uds, Instant::now() + Duration::from_secs(60))
        .map_err(|e| format!("the restored agent: {e}"))?;
    let t3 = Instant::now();
    client
        .restored_now(BTreeMap::new())
        .map_err(|e| format!("the clone step: {e}"))?;
    let t4 = Instant::now();
    let true_once = || {
        let out = client
            .run(ExecSpec::new(["true"]))
            .map_err(|e| format!("exec true: {e}"))?;
        if out.status.shell_code() != 0 {
            return Err(format!("true ended with {:?}", out.status));
        }
        Ok(Instant::now())
    };
    let t5 = true_once()?;
    let t6 = true_once()?;
    drop(client);
    drop(vm);
    let _ = std::fs::remove_file(dir.join(format!("{name}.api")));
    Ok([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5])
}

/// The new path: `kiln-vmm` started ahead (as a pool keeps them; not timed), then the load, and
/// the clone step and first exec pipelined with the agent's connection in one round trip
/// (`client::restore_and_exec`). Steps: load, then connect + clone step + first exec as one.
fn restore_steps_fast(
    dir: &Path,
    name: &str,
    state: &Path,
    mem: &Path,
    prefault: Prefault,
) -> Result<Steps, String> {
    let vm = KilnVm::spawn(dir, name)?;
    let t1 = Instant::now();
    match prefault {
        Prefault::Apply(ws) => vm.load_with_working_set(state, mem, ws)?,
        Prefault::None | Prefault::Record(_) => vm.load(state, mem)?,
    }
    let t2 = Instant::now();
    let at_load = kvm::counters(vm.pid());
    let first = client::restore_and_exec(
        &vm.uds,
        Instant::now() + Duration::from_secs(60),
        BTreeMap::new(),
        None,
        ExecSpec::new(["true"]),
    )
    .map_err(|e| format!("the restored agent: {e}"))?;
    let exec = first.exec.map_err(|e| format!("exec true: {e}"))?;
    let out = exec.output().map_err(|e| format!("exec true: {e}"))?;
    if out.status.shell_code() != 0 {
        return Err(format!("true ended with {:?}", out.status));
    }
    let t5 = Instant::now();
    if let (Some(a), Some(b)) = (at_load, kvm::counters(vm.pid())) {
        let path = match prefault {
            Prefault::Apply(_) => "with the working set",
            Prefault::None | Prefault::Record(_) => "without",
        };
        COUNTERS.with(|c| {
            c.borrow_mut()
                .entry(path)
                .or_default()
                .push([b[0] - a[0], b[1] - a[1], b[2] - a[2]])
        });
    }
    if let Prefault::Record(ws) = prefault {
        vm.api(
            "PUT",
            "/snapshot/working-set",
            &format!(r#"{{"path": "{}"}}"#, ws.display()),
        )?;
    }
    let again = first
        .client
        .run(ExecSpec::new(["true"]))
        .map_err(|e| format!("exec true: {e}"))?;
    if again.status.shell_code() != 0 {
        return Err(format!("true ended with {:?}", again.status));
    }
    let t6 = Instant::now();
    drop(first.client);
    drop(vm);
    let _ = std::fs::remove_file(dir.join(format!("{name}.api")));
    Ok([
        Duration::ZERO,
        t2 - t1,
        t5 - t2,
        Duration::ZERO,
        Duration::ZERO,
        t6 - t5,
    ])
}

/// Prints the step table for `samples` under `title`; returns the p50 of the total to the first
/// result (every step but the second exec).
fn report(title: &str, samples: &[Steps]) -> f64 {
    println!("\n{title} ({} restores):", samples.len());
    println!("  | step | p50 | p99 |");
    println!("  |---|---|---|");
    for (i, step) in STEPS.iter().enumerate() {
        let mut col: Vec<Duration> = samples.iter().map(|s| s[i]).collect();
        let (p50, p99) = percentiles(&mut col);
        println!("  | {step} | {p50:.1} ms | {p99:.1} ms |");
    }
    let mut totals: Vec<Duration> = samples.iter().map(|s| s[..5].iter().sum()).collect();
    let (p50, p99) = percentiles(&mut totals);
    println!("  | **spawn -> first result** | **{p50:.1} ms** | **{p99:.1} ms** |");
    p50
}

/// Runs the benchmark with `runs` restores per path.
pub fn run(runs: usize) -> Result<(), String> {
    let scratch = ScratchDir::new("bench-restore");
    let dir = scratch.path();
    let (state, mem) = (dir.join("full.state"), dir.join("full.mem"));
    {
        let vm = KilnVm::boot(dir, "template")?;
        let client = vm.agent()?;
        client
            .run(ExecSpec::new(["true"]))
            .map_err(|e| format!("exec: {e}"))?;
        drop(client);
        vm.api("PATCH", "/vm", r#"{"state": "Paused"}"#)?;
        vm.snapshot(&state, &mem, "Full")?;
    }
    // The working set: what one fresh restore touches up to its first result.
    let ws = dir.join("full.ws");
    restore_steps_fast(dir, "record", &state, &mem, Prefault::Record(&ws))?;
    // Interleaved, so that drift in the lab's speed hits every path alike.
    let mut paths: [Vec<Steps>; 3] = Default::default();
    for i in 0..runs {
        let o = restore_steps(dir, &format!("o{i}"), &state, &mem)?;
        let n = restore_steps_fast(dir, &format!("n{i}"), &state, &mem, Prefault::None)?;
        let w = restore_steps_fast(dir, &format!("w{i}"), &state, &mem, Prefault::Apply(&ws))?;
        let total = |s: &Steps| s[..5].iter().sum::<Duration>().as_secs_f64() * 1e3;
        eprintln!(
            "restore {}/{runs}: {:.0} ms (old path), {:.0} ms (new path), {:.0} ms (new path \
             with the working set) to the first result",
            i + 1,
            total(&o),
            total(&n),
            total(&w)
        );
        for (path, steps) in paths.iter_mut().zip([o, n, w]) {
            path.push(steps);
        }
    }
    let [old, new, warm] = paths;
    let before = report(
        "restore -> first exec result, the old path (spawn, load, connect, clone step, exec)",
        &old,
    );
    let after = report(
        "restore -> first exec result, the new path (kiln-vmm started ahead; connect, clone \
         step and exec in one round trip, reported as \"connect\")",
        &new,
    );
    let prefaulted = report(
        "restore -> first exec result, the new path with the working set mapped in by the load \
         (in \"load\")",
        &warm,
    );
    println!(
        "\nthe new path takes {:.2}x the old path's time to the first result; with the working \
         set {:.2}x (and {:.2}x the new path's without it)",
        after / before,
        prefaulted / before,
        prefaulted / after
    );
    COUNTERS.with(|c| {
        for (path, c) in c.borrow().iter() {
            let n = c.len();
            let avg = |i: usize| c.iter().map(|s| s[i]).sum::<u64>() / n as u64;
            println!(
                "from load to the first result (new path {path}, mean of {n}): {} KVM exits, \
                 {} page faults fixed (nested page faults in the lab), {} 4K pages mapped",
                avg(0),
                avg(1),
                avg(2)
            );
        }
    });
    Ok(())
}
