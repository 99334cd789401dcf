//! VM lifecycles one after another in one L1, as a user's loop of `kiln run` makes them: restores
//! of one snapshot (restore, exec, kill) and boots (boot, exec, shutdown). Each cycle is bounded:
//! one that does not end in time is killed and reported with what the stuck processes were doing,
//! never waited on forever. The lab test (`lab_cycles`) and the benchmark (`kiln-lab-bench
//! cycles`) both run these.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ApiVmm, kiln_vmm_rootfs, rootfs, wait_with_deadline};

/// The command line `kiln run` boots with: the agent as init over a tmpfs overlay.
pub const AGENT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet init=/usr/sbin/kiln-agent KILN_OVERLAY=tmpfs";

/// How long one cycle may take before it counts as hung.
pub const CYCLE_LIMIT: Duration = Duration::from_secs(90);

/// Boots the rootfs with the agent in `dir`, waits for the agent, and snapshots it into
/// `dir/snap` with `kiln snapshot create` (the files `kiln run --snapshot` restores).
pub fn make_snapshot(dir: &Path) -> Result<PathBuf, String> {
    snapshot_of(dir, None)
}

/// As [`make_snapshot`], for a VM with a network interface on a sandbox network of its own
/// (allowing `domain`), made as `kiln run --net` makes one: its clones need `--net` or an
/// `--allow-` flag, which gives each its own TAP through `network_overrides`.
pub fn make_snapshot_with_nic(dir: &Path, domain: &str) -> Result<PathBuf, String> {
    let sandbox = kiln_net::Sandbox::create(kiln_net::SandboxConfig {
        vm_id: "kiln-snapshot-source".into(),
        policy: kiln_net::Policy {
            domains: vec![domain.parse().map_err(|e| format!("{domain}: {e}"))?],
            allow_net: false,
        },
        upstream: kiln_net::dns::Upstream::System,
        uplink: None,
        on_refusal: None,
    })
    .map_err(|e| format!("a sandbox network for the snapshot's VM: {e}"))?;
    snapshot_of(dir, Some(&sandbox))
}

fn snapshot_of(dir: &Path, net: Option<&kiln_net::Sandbox>) -> Result<PathBuf, String> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    let uds = dir.join("template.vsock");
    let cmdline = match net {
        Some(s) => format!("{AGENT_CMDLINE} {}", s.guest_net_spec().to_cmdline()),
        None => AGENT_CMDLINE.to_string(),
    };
    let mut cmd = kiln_vmm_rootfs(&rootfs(), true, &uds, 256, &cmdline);
    cmd.arg("--serial-out").arg(dir.join("template.console"));
    if let Some(s) = net {
        cmd.args(["--net", &kiln_net::addr::vmm_net_arg()]);
        let ns = s.netns().as_raw_fd();
        // SAFETY: setns is one system call on a descriptor the sandbox keeps open past the
        // spawn, safe between fork and exec.
        unsafe { cmd.pre_exec(move || kiln_net::netns::enter_raw(ns)) };
    }
    let vm = ApiVmm::start(cmd, &dir.join("template.api"));
    kiln_agent::client::wait_ready(&uds, Instant::now() + CYCLE_LIMIT)
        .map_err(|e| format!("the template VM's agent: {e}"))?;
    let snap = dir.join("snap");
    let out = Command::new("kiln")
        .args(["snapshot", "create", "--api-sock"])
        .arg(vm.sock())
        .arg("--dir")
        .arg(&snap)
        .output()
        .map_err(|e| format!("kiln snapshot create: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "kiln snapshot create: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(snap)
}

/// What one cycle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cycle {
    /// `kiln run --snapshot DIR -- CMD`: restore, exec, kill.
    Restore,
    /// `kiln run -- CMD`: boot, exec, shut down.
    Boot,
    /// `kiln run --snapshot DIR --allow-domain D -- CMD` of a snapshot taken with a NIC
    /// ([`make_snapshot_with_nic`]): a sandbox network (namespace, TAP, rules, resolver) made
    /// and removed with each VM.
    NetRestore(&'static str),
}

/// Runs cycle number `n` of `kind` (`snap` is the snapshot for restores): the guest echoes a
/// number derived from `n`, which must come back exactly, with exit status 0. Returns how long
/// the whole `kiln run` took.
pub fn run_cycle(kind: Cycle, n: usize, snap: &Path) -> Result<Duration, String> {
    let expect = format!("cycle {n} {}", n * 7);
    let script = format!("echo cycle {n} $(({n} * 7))");
    let mut cmd = Command::new("kiln");
    cmd.arg("run");
    match kind {
        Cycle::Restore => {
            cmd.arg("--snapshot").arg(snap);
        }
        Cycle::NetRestore(domain) => {
            cmd.arg("--snapshot")
                .arg(snap)
                .args(["--allow-domain", domain]);
        }
        Cycle::Boot => {}
    }
    cmd.args(["--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("starting kiln: {e}"))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let readers = (
        std::thread::spawn(move || read_all(stdout)),
        std::thread::spawn(move || read_all(stderr)),
    );
    let waited = wait_with_deadline_diagnosed(&mut child, CYCLE_LIMIT);
    let took = start.elapsed();
    let (out, err) = (
        readers.0.join().unwrap_or_default(),
        readers.1.join().unwrap_or_default(),
    );
    let (status, hung) = waited?;
    if let Some(report) = hung {
        return Err(format!(
            "{kind:?} cycle {n} did not end within {CYCLE_LIMIT:?} and was killed\n{report}\nstdout: {out}\nstderr: {err}"
        ));
    }
    if !status.success() || out.trim() != expect {
        return Err(format!(
            "{kind:?} cycle {n}: kiln run ended with {status}; stdout {out:?} (expected {expect:?}); stderr: {err}{}",
            crate::console_tail_named_in(&err)
        ));
    }
    Ok(took)
}

fn read_all(pipe: Option<impl std::io::Read>) -> String {
    let mut bytes = Vec::new();
    if let Some(mut p) = pipe {
        let _ = p.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Like [`wait_with_deadline`], but before killing a process that overstayed, describes every
/// `kiln` and `kiln-vmm` process: state, and each thread's kernel stack and wait channel.
fn wait_with_deadline_diagnosed(
    child: &mut std::process::Child,
    limit: Duration,
) -> Result<(std::process::ExitStatus, Option<String>), String> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok((status, None)),
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for kiln: {e}")),
        }
        if start.elapsed() > limit {
            let report = describe_kiln_processes();
            let (status, _) = wait_with_deadline(child, Duration::ZERO)
                .map_err(|e| format!("killing kiln: {e}"))?;
            return Ok((status, Some(report)));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every `kiln`/`kiln-vmm` process with its threads' states and kernel stacks.
pub fn describe_kiln_processes() -> String {
    let mut out = String::new();
    for pid in kiln_pids(&["kiln", "kiln-vmm"]) {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let comm = read_trim(&proc_dir.join("comm"));
        out.push_str(&format!("process {pid} {comm}:\n"));
        for task in std::fs::read_dir(proc_dir.join("task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let t = task.path();
            let stat = read_trim(&t.join("stat"));
            let state = stat
                .rsplit_once(") ")
                .map(|(_, rest)| rest.chars().next().unwrap_or('?'))
                .unwrap_or('?');
            out.push_str(&format!(
                "  thread {} {} state {state} wchan {}\n",
                task.file_name().to_string_lossy(),
                read_trim(&t.join("comm")),
                read_trim(&t.join("wchan"))
            ));
            for frame in read_trim(&t.join("stack")).lines() {
                out.push_str(&format!("    {frame}\n"));
            }
        }
    }
    if out.is_empty() {
        out.push_str("(no kiln or kiln-vmm process left)\n");
    }
    out
}

fn read_trim(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The pids of processes whose name is one of `names`.
pub fn kiln_pids(names: &[&str]) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            let comm = read_trim(Path::new(&format!("/proc/{pid}/comm")));
            names.contains(&comm.as_str())
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// What a cycle could leave behind, counted so that a before/after comparison shows a leak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Census {
    /// `kiln` and `kiln-vmm` processes alive.
    pub vm_processes: usize,
    /// Open file descriptors of this process.
    pub own_fds: usize,
    /// Threads of this process.
    pub own_threads: usize,
    /// Entries in the temporary directory whose name starts with `kiln-` (kiln run's VM folders
    /// and kept console logs).
    pub kiln_temp_entries: usize,
}

impl Census {
    /// Counts now.
    pub fn take() -> Census {
        let count = |dir: &str| std::fs::read_dir(dir).map_or(0, |d| d.count());
        let kiln_temp_entries = std::fs::read_dir(std::env::temp_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                // kiln run's own folders and logs (`kiln-<pid>-<nanos>`, `kiln-console-<pid>.log`);
                // the tests' scratch folders are `kiln-<name>-<pid>` with a non-numeric name.
                name.strip_prefix("kiln-").is_some_and(|rest| {
                    rest.starts_with("console-")
                        || rest
                            .split('-')
                            .next()
                            .is_some_and(|p| p.parse::<u32>().is_ok())
                })
            })
            .count();
        Census {
            vm_processes: kiln_pids(&["kiln", "kiln-vmm"]).len(),
            own_fds: count("/proc/self/fd"),
            own_threads: count("/proc/self/task"),
            kiln_temp_entries,
        }
    }
}

/// Memory in use on this machine (L1 in the lab), in MiB: MemTotal - MemAvailable, read after the
/// page cache has been written back and dropped (as root), so that what the cycles leave behind
/// is not hidden by, or mistaken for, cached file pages.
pub fn memory_in_use_mib() -> Result<u64, String> {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| format!("/proc/sys/vm/drop_caches: {e}"))?;
    let meminfo =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    meminfo_in_use_mib(&meminfo).ok_or_else(|| format!("no MemTotal/MemAvailable in {meminfo}"))
}

/// MemTotal - MemAvailable of a `/proc/meminfo` text, in MiB.
fn meminfo_in_use_mib(meminfo: &str) -> Option<u64> {
    let kib = |key: &str| {
        meminfo.lines().find_map(|l| {
            l.strip_prefix(key)?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    Some(kib("MemTotal:")?.saturating_sub(kib("MemAvailable:")?) / 1024)
}

/// Median and 99th percentile of `times`, in milliseconds.
pub fn p50_p99(times: &[Duration]) -> (u128, u128) {
    let mut ms: Vec<u128> = times.iter().map(Duration::as_millis).collect();
    ms.sort_unstable();
    if ms.is_empty() {
        return (0, 0);
    }
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_in_use_from_meminfo() {
        let m = "MemTotal:        4000000 kB\nMemFree:  1 kB\nMemAvailable:    3000000 kB\n";
        assert_eq!(meminfo_in_use_mib(m), Some(976));
        assert_eq!(meminfo_in_use_mib("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn percentiles_of_a_run() {
        let t: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(p50_p99(&t), (51, 99));
        assert_eq!(p50_p99(&[]), (0, 0));
        assert_eq!(p50_p99(&[Duration::from_millis(7)]), (7, 7));
    }

    #[test]
    fn census_counts_this_process() {
        let c = Census::take();
        assert!(c.own_fds >= 3 && c.own_threads >= 1, "{c:?}");
    }
}
