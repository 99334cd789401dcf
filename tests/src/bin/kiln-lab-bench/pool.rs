//! `kiln-lab-bench pool [--runs N]`: kilnd in the lab. With the bundled `python` template
//! (512 MiB) built:
//!
//! - create -> first exec result (`true`), p50/p99 over N, from a warm pool and from a cold one,
//!   against the exec round trip of a sandbox already running and against `kiln run` (a boot);
//!   the same with `python3 -c pass` as the command; and, per exec, the time and KVM's exits and
//!   page faults fixed in a sandbox just handed out and in one that has run for a while;
//! - sustained creates per second (create, exec, kill) at concurrency 1 and 4;
//! - the memory (PSS) of 50 idle sandboxes of the template, per sandbox;
//! - a fork of a sandbox into 4 clones: time until all four answer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_pool::client::Kilnd;
use kiln_pool::template::spec::Spec;
use kiln_pool::types::{BuildEvent, CreateSandbox, ExecEvent, ExecRequest, PoolSettings};
use kiln_tests::ScratchDir;

use crate::exec::percentiles;
use crate::kvm;

/// kilnd on a state folder (killed when dropped).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(state: &Path) -> Result<(Daemon, Kilnd), String> {
    let sock = state.join("kilnd.sock");
    let child = Command::new("kilnd")
        .arg("--state-dir")
        .arg(state)
        .args(["--max-vms", "60"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting kilnd: {e}"))?;
    let d = Daemon(child);
    let end = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if Instant::now() > end {
            return Err("kilnd did not listen".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((d, Kilnd::new(sock)))
}

/// A first command heavier than `true`: the python template's own interpreter.
const PYTHON: &[&str] = &["python3", "-c", "pass"];

/// How long a settled pool's VMs have waited before the create.
const SETTLED: Duration = Duration::from_secs(5);

fn exec_true(k: &Kilnd, id: &str) -> Result<(), String> {
    exec_ok(k, id, &["true"])
}

/// Runs `argv` in sandbox `id`; an error unless it exits 0.
fn exec_ok(k: &Kilnd, id: &str, argv: &[&str]) -> Result<(), String> {
    let last = k
        .exec(
            id,
            &ExecRequest {
                argv: argv.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            },
            |_| {},
        )
        .map_err(|e| e.to_string())?;
    match last {
        ExecEvent::Exit {
            exit_code: Some(0), ..
        } => Ok(()),
        other => Err(format!("{argv:?}: {other:?}")),
    }
}

fn create(k: &Kilnd) -> Result<String, String> {
    Ok(k.create(&CreateSandbox {
        template: "python".into(),
        timeout_s: Some(3600),
        ..Default::default()
    })
    .map_err(|e| e.to_string())?
    .id)
}

/// Creates a sandbox and runs `argv` in it: (its id, the create call alone, create -> result).
fn create_and_exec(k: &Kilnd, argv: &[&str]) -> Result<(String, Duration, Duration), String> {
    let t = Instant::now();
    let id = create(k)?;
    let created = t.elapsed();
    exec_ok(k, &id, argv)?;
    Ok((id, created, t.elapsed()))
}

/// Create -> first result of `argv` for one sandbox; it is killed afterwards (not timed).
fn create_to_result(k: &Kilnd, argv: &[&str]) -> Result<Duration, String> {
    let (id, _, all) = create_and_exec(k, argv)?;
    k.kill(&id).map_err(|e| e.to_string())?;
    Ok(all)
}

/// One create, timed.
struct CreateTimes {
    /// The create call alone.
    created: Duration,
    /// Create -> first result.
    all: Duration,
    /// The same command once more in the same sandbox, right after.
    second: Duration,
}

/// Create -> first result of `argv` for one sandbox, then `argv` once more; the sandbox is
/// killed afterwards (not timed).
fn create_then_result(k: &Kilnd, argv: &[&str]) -> Result<CreateTimes, String> {
    let (id, created, all) = create_and_exec(k, argv)?;
    let t = Instant::now();
    exec_ok(k, &id, argv)?;
    let second = t.elapsed();
    k.kill(&id).map_err(|e| e.to_string())?;
    Ok(CreateTimes {
        created,
        all,
        second,
    })
}

fn wait_ready(k: &Kilnd, n: u32) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(300);
    loop {
        let t = k.templates().map_err(|e| e.to_string())?;
        if t.iter()
            .find(|t| t.name == "python")
            .is_some_and(|t| t.ready >= n)
        {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(format!("the pool never had {n} ready"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pid of sandbox `id`'s VMM, from kilnd's records.
fn vmm_pid(state: &Path, id: &str) -> Result<u32, String> {
    let db = kiln_pool::db::Db::open(&state.join("kilnd.db")).map_err(|e| e.to_string())?;
    db.sandboxes()
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|s| s.id == id)
        .and_then(|s| s.vmm_pid)
        .ok_or_else(|| format!("kilnd has no VMM pid for sandbox {id}"))
}

/// `true` run `n` times in sandbox `id`: each run's time and KVM's exits and page faults fixed
/// across it (zeros without L1's debugfs).
fn exec_costs(
    k: &Kilnd,
    id: &str,
    pid: u32,
    n: usize,
) -> Result<Vec<(Duration, u64, u64)>, String> {
    (0..n)
        .map(|_| {
            let before = kvm::counters(pid).unwrap_or_default();
            let t = Instant::now();
            exec_true(k, id)?;
            let took = t.elapsed();
            let after = kvm::counters(pid).unwrap_or_default();
            let delta = |i: usize| after[i].saturating_sub(before[i]);
            Ok((took, delta(0), delta(1)))
        })
        .collect()
}

/// [`exec_costs`] of 5 execs in a sandbox handed out from a pool whose VMs have waited `wait`
/// (killed afterwards).
fn handed_out_costs(
    k: &Kilnd,
    state: &Path,
    wait: Duration,
) -> Result<Vec<(Duration, u64, u64)>, String> {
    wait_ready(k, 2)?;
    std::thread::sleep(wait);
    let id = create(k)?;
    let costs = exec_costs(k, &id, vmm_pid(state, &id)?, 5)?;
    k.kill(&id).map_err(|e| e.to_string())?;
    Ok(costs)
}

/// `argv` run `n` times in sandbox `id`: each run's time.
fn round_trips(k: &Kilnd, id: &str, argv: &[&str], n: usize) -> Result<Vec<Duration>, String> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            exec_ok(k, id, argv)?;
            Ok(t.elapsed())
        })
        .collect()
}

/// Prints [`exec_costs`]' rows under `label`.
fn print_exec_costs(label: &str, first: usize, costs: &[(Duration, u64, u64)]) {
    for (i, (took, exits, faults)) in costs.iter().enumerate() {
        println!(
            "  | {label}, exec {} | {:.0} ms | {exits} | {faults} |",
            first + i,
            took.as_secs_f64() * 1e3
        );
    }
}

/// The PSS of each of `ids`' VMMs as kilnd reports it (`kiln_sandbox_pss_bytes` in its metrics;
/// the VMMs run jailed, under their own uids, so kilnd is where a user reads this).
fn pss_bytes(k: &Kilnd, ids: &[String]) -> Result<Vec<u64>, String> {
    let text = k.metrics().map_err(|e| e.to_string())?;
    ids.iter()
        .map(|id| {
            let prefix = format!("kiln_sandbox_pss_bytes{{sandbox=\"{id}\",");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|rest| rest.rsplit(' ').next()?.parse().ok())
                .ok_or_else(|| format!("kilnd's metrics have no PSS for sandbox {id}"))
        })
        .collect()
}

/// Prints the PSS of the idle sandboxes, `idle` after the last one's exec.
fn print_pss(pss: &[u64], idle: Duration) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let total = mib(pss.iter().sum::<u64>());
    let mean = |part: &[u64]| mib(part.iter().sum::<u64>()) / part.len().max(1) as f64;
    let tenth = pss.len() / 10;
    println!(
        "50 idle sandboxes of the 512 MiB template, {}s after the last exec: total PSS {total:.0} MiB, {:.2} MiB each (goal <= 4 MiB; least {:.2}, most {:.2}; first tenth made {:.2}, last tenth {:.2})",
        idle.as_secs(),
        total / pss.len().max(1) as f64,
        mib(pss.iter().min().copied().unwrap_or(0)),
        mib(pss.iter().max().copied().unwrap_or(0)),
        mean(&pss[..tenth]),
        mean(&pss[pss.len() - tenth..]),
    );
}

/// Runs the benchmark.
pub fn run(runs: usize) -> Result<(), String> {
    let scratch = ScratchDir::new("bench-pool");
    let state: PathBuf = kiln_tests::lab_dir().join("bench-pool-state");
    let _ = std::fs::remove_dir_all(&state);
    let (_d, k) = start(&state)?;
    let spec = Spec::load(&kiln_tests::lab_dir().join("examples/python.toml"))
        .map_err(|e| e.to_string())?;
    match k.build(&spec, |_| {}).map_err(|e| e.to_string())? {
        BuildEvent::Done { .. } => {}
        other => return Err(format!("building the python template: {other:?}")),
    }

    // Cold: nothing warm.
    let mut cold = Vec::new();
    for _ in 0..runs {
        cold.push(create_to_result(&k, &["true"])?);
    }
    // Warm: a pool kept at 2, refilled between creates.
    k.set_pool(
        "python",
        &PoolSettings {
            min_ready: 2,
            max_sandboxes: 0,
        },
    )
    .map_err(|e| e.to_string())?;
    let (mut warm, mut warm_create, mut warm_second) = (Vec::new(), Vec::new(), Vec::new());
    let (mut warm_sh, mut warm_settled, mut warm_py) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        wait_ready(&k, 2)?;
        let times = create_then_result(&k, &["true"])?;
        warm_create.push(times.created);
        warm.push(times.all);
        warm_second.push(times.second);
        // The same with the pool's own warm-up command first, every page of which the warm VM
        // has touched already: tells the first command's own first touches from the rest.
        wait_ready(&k, 2)?;
        warm_sh.push(create_to_result(&k, kiln_pool::types::WARM_UP[0])?);
        // And with `true` again, but from a pool whose VMs have sat there a while (their
        // guests' own after-restore work done), as a pool meets most creates.
        wait_ready(&k, 2)?;
        std::thread::sleep(SETTLED);
        warm_settled.push(create_to_result(&k, &["true"])?);
        // A heavier first command, which the warm-up does not run either.
        wait_ready(&k, 2)?;
        warm_py.push(create_to_result(&k, PYTHON)?);
    }
    // Where a handed-out VM's first execs differ from a running sandbox's: KVM's counters.
    let handed_costs = handed_out_costs(&k, &state, Duration::ZERO)?;
    let settled_costs = handed_out_costs(&k, &state, SETTLED)?;
    k.set_pool(
        "python",
        &PoolSettings {
            min_ready: 0,
            max_sandboxes: 0,
        },
    )
    .map_err(|e| e.to_string())?;
    // A running sandbox's round trip, and a boot with kiln run, for scale.
    let id = create(&k)?;
    let mut rt = round_trips(&k, &id, &["true"], runs.max(20))?;
    let mut rt_py = round_trips(&k, &id, PYTHON, runs)?;
    // The execs it has run: the `true`s above and the pythons.
    let running = rt.len() + rt_py.len();
    let running_costs = exec_costs(&k, &id, vmm_pid(&state, &id)?, 5)?;
    k.kill(&id).map_err(|e| e.to_string())?;
    let mut boots = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let st = Command::new("kiln")
            .args(["run", "--", "true"])
            .stdin(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("kiln run -- true: {st}"));
        }
        boots.push(t.elapsed());
    }
    let (c50, c99) = percentiles(&mut cold);
    let (w50, w99) = percentiles(&mut warm);
    let (wc50, wc99) = percentiles(&mut warm_create);
    let (ws50, ws99) = percentiles(&mut warm_second);
    let (wsh50, wsh99) = percentiles(&mut warm_sh);
    let (wst50, wst99) = percentiles(&mut warm_settled);
    let (r50, r99) = percentiles(&mut rt);
    let (wp50, wp99) = percentiles(&mut warm_py);
    let (rp50, rp99) = percentiles(&mut rt_py);
    let (b50, _) = percentiles(&mut boots);
    println!("create -> first exec result (python template, 512 MiB, {runs} runs):");
    println!("  | | p50 | p99 |");
    println!("  |---|---|---|");
    println!("  | warm pool | {w50:.0} ms | {w99:.0} ms |");
    println!("  | warm pool: the create call alone | {wc50:.0} ms | {wc99:.0} ms |");
    println!("  | warm pool: the second exec, right after | {ws50:.0} ms | {ws99:.0} ms |");
    println!(
        "  | warm pool, the pool's warm-up command ({}) first | {wsh50:.0} ms | {wsh99:.0} ms |",
        kiln_pool::types::WARM_UP[0].join(" ")
    );
    println!(
        "  | warm pool, its VMs {} s in the pool | {wst50:.0} ms | {wst99:.0} ms |",
        SETTLED.as_secs()
    );
    println!("  | cold (restore on demand) | {c50:.0} ms | {c99:.0} ms |");
    println!("  | exec round trip in a running sandbox | {r50:.0} ms | {r99:.0} ms |");
    println!("  | kiln run -- true (boot) | {b50:.0} ms | |");
    println!(
        "  | warm pool, first command {} | {wp50:.0} ms | {wp99:.0} ms |",
        PYTHON.join(" ")
    );
    println!(
        "  | {} round trip in a running sandbox | {rp50:.0} ms | {rp99:.0} ms |",
        PYTHON.join(" ")
    );
    println!(
        "per exec of `true` (time, KVM exits, page faults fixed: each a nested page fault in the lab):"
    );
    println!("  | sandbox | time | exits | page faults fixed |");
    println!("  |---|---|---|---|");
    print_exec_costs("from the warm pool", 1, &handed_costs);
    print_exec_costs(
        &format!("from the warm pool, {} s in it", SETTLED.as_secs()),
        1,
        &settled_costs,
    );
    print_exec_costs("running", running + 1, &running_costs);
    println!(
        "  warm create -> result is {:.1}x a running sandbox's round trip (goal <= 2x) and {:.1}x faster than a boot",
        w50 / r50,
        b50 / w50
    );
    println!(
        "  with {} as the command: {:.1}x",
        PYTHON.join(" "),
        wp50 / rp50
    );

    // Sustained creates per second at concurrency 1 and 4 (create, exec, kill).
    for conc in [1usize, 4] {
        let total = 8 * conc;
        let k = Arc::new(k.clone());
        let start = Instant::now();
        let handles: Vec<_> = (0..conc)
            .map(|_| {
                let k = k.clone();
                std::thread::spawn(move || -> Result<(), String> {
                    for _ in 0..8 {
                        create_to_result(&k, &["true"])?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "a worker panicked".to_string())??;
        }
        println!(
            "sustained at concurrency {conc}: {:.2} creates/s ({total} in {:.1} s)",
            total as f64 / start.elapsed().as_secs_f64(),
            start.elapsed().as_secs_f64()
        );
    }

    // 50 idle sandboxes: PSS per sandbox.
    let ids: Vec<String> = (0..50).map(|_| create(&k)).collect::<Result<_, _>>()?;
    for id in &ids {
        exec_true(&k, id)?;
    }
    // Free page reporting hands memory back in rounds two seconds apart, each a share of the
    // free lists: the PSS is read soon after the last exec and again after a while idle.
    let mut idle = Duration::ZERO;
    for wait in [Duration::from_secs(2), Duration::from_secs(28)] {
        std::thread::sleep(wait);
        idle += wait;
        let pss = pss_bytes(&k, &ids)?;
        print_pss(&pss, idle);
    }
    // Where it goes: every kiln-vmm now running is one of the 50 or a warm VM of the pool.
    let pids = kiln_tests::cycles::kiln_pids(&["kiln-vmm"]);
    let usages = pids
        .iter()
        .map(|&pid| kiln_tests::smaps::usage(pid, &["/memory", "kiln-guest-mem"]))
        .collect::<Result<Vec<_>, _>>()?;
    println!(
        "where an idle sandbox's memory goes (mean of {} kiln-vmm processes):\n{}",
        usages.len(),
        kiln_tests::smaps::table(&usages)
    );
    if let Some(&pid) = pids.first() {
        println!("  one kiln-vmm's anonymous mappings of 64 KiB PSS or more (size, PSS):");
        for (size, pss, header) in kiln_tests::smaps::largest_anonymous(pid, 64)? {
            println!("    {size:>6} KiB {pss:>6} KiB  {header}");
        }
    }
    for id in &ids {
        k.kill(id).map_err(|e| e.to_string())?;
    }

    // Fork into 4: time until all four answer.
    let id = create(&k)?;
    exec_true(&k, &id)?;
    let t = Instant::now();
    let forks = k.fork(&id, 4).map_err(|e| e.to_string())?;
    for f in &forks {
        exec_true(&k, &f.id)?;
    }
    println!(
        "fork of a 512 MiB sandbox into 4: {:.0} ms until all four answered",
        t.elapsed().as_secs_f64() * 1e3
    );
    // What a fork is made of: a snapshot of the original (as a pause writes one) and restores.
    let t = Instant::now();
    k.pause(&id).map_err(|e| e.to_string())?;
    let paused = t.elapsed();
    let t = Instant::now();
    k.resume(&id).map_err(|e| e.to_string())?;
    exec_true(&k, &id)?;
    println!(
        "  of which, measured apart: pause (snapshot to disk, VM ends) {:.0} ms; resume -> first result {:.0} ms",
        paused.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3
    );
    for s in k.sandboxes().map_err(|e| e.to_string())? {
        let _ = k.kill(&s.id);
    }
    drop(scratch);
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}
