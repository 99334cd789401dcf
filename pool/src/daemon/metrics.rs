//! `GET /metrics`: Prometheus text for the host (sandboxes by state, warm VMs per template, VMs
//! and guest memory in use against the limits) and each running sandbox (its VMM's CPU time,
//! RSS and PSS, uptime, commands run), read from /proc.

use std::fmt::Write;

use super::{Daemon, now_s};
use crate::types::SandboxState;

/// CPU seconds (user + system) of `pid`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// RSS and PSS of `pid`, bytes, from smaps_rollup.
fn memory(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some((field("Rss:")?, field("Pss:")?))
}

/// Escapes a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Daemon {
    /// The metrics page.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        let all = self.all_sandboxes();
        let running = all
            .iter()
            .filter(|s| s.live().state == SandboxState::Running)
            .count();
        let (vms, mib) = self.in_use();
        let _ = writeln!(
            out,
            "# HELP kiln_sandboxes Sandboxes by state.\n# TYPE kiln_sandboxes gauge\n\
             kiln_sandboxes{{state=\"running\"}} {running}\nkiln_sandboxes{{state=\"paused\"}} {}",
            all.len() - running
        );
        let _ = writeln!(
            out,
            "# HELP kiln_vms VMs alive (sandboxes and warm).\n# TYPE kiln_vms gauge\nkiln_vms {vms}\n\
             # HELP kiln_vms_limit Most VMs at once (0: none).\n# TYPE kiln_vms_limit gauge\nkiln_vms_limit {}\n\
             # HELP kiln_guest_memory_bytes Guest memory of the VMs alive.\n# TYPE kiln_guest_memory_bytes gauge\n\
             kiln_guest_memory_bytes {}\n\
             # HELP kiln_guest_memory_limit_bytes Most guest memory at once (0: none).\n# TYPE kiln_guest_memory_limit_bytes gauge\n\
             kiln_guest_memory_limit_bytes {}",
            self.cfg.max_vms,
            mib << 20,
            self.cfg.max_memory_mib << 20
        );
        let _ = writeln!(
            out,
            "# HELP kiln_pool_ready Warm VMs ready per template.\n# TYPE kiln_pool_ready gauge"
        );
        if let Ok(templates) = self.templates() {
            for t in templates {
                let _ = writeln!(
                    out,
                    "kiln_pool_ready{{template=\"{}\"}} {}",
                    label(&t.name),
                    t.ready
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP kiln_sandbox_cpu_seconds_total CPU time of a sandbox's VMM.\n# TYPE kiln_sandbox_cpu_seconds_total counter\n\
             # HELP kiln_sandbox_rss_bytes Resident memory of a sandbox's VMM (guest memory included).\n# TYPE kiln_sandbox_rss_bytes gauge\n\
             # HELP kiln_sandbox_pss_bytes Proportional memory of a sandbox's VMM (shared snapshot pages split between clones).\n# TYPE kiln_sandbox_pss_bytes gauge\n\
             # HELP kiln_sandbox_uptime_seconds Time since the sandbox was created.\n# TYPE kiln_sandbox_uptime_seconds gauge\n\
             # HELP kiln_sandbox_execs_total Commands run in the sandbox.\n# TYPE kiln_sandbox_execs_total counter"
        );
        let now = now_s();
        for s in all {
            let (pid, execs) = {
                let live = s.live();
                (live.vm.as_ref().map(|v| v.pid()), live.exec_count)
            };
            let l = format!(
                "sandbox=\"{}\",template=\"{}\"",
                label(&s.id),
                label(&s.template_name)
            );
            let _ = writeln!(
                out,
                "kiln_sandbox_uptime_seconds{{{l}}} {}",
                now.saturating_sub(s.created_at)
            );
            let _ = writeln!(out, "kiln_sandbox_execs_total{{{l}}} {execs}");
            if let Some(pid) = pid {
                if let Some(cpu) = cpu_seconds(pid) {
                    let _ = writeln!(out, "kiln_sandbox_cpu_seconds_total{{{l}}} {cpu:.3}");
                }
                if let Some((rss, pss)) = memory(pid) {
                    let _ = writeln!(out, "kiln_sandbox_rss_bytes{{{l}}} {rss}");
                    let _ = writeln!(out, "kiln_sandbox_pss_bytes{{{l}}} {pss}");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).is_some());
        let (rss, pss) = memory(pid).unwrap();
        assert!(rss > 0 && pss > 0);
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
