//! `kiln-lab-bench boot [--runs N]`: where a boot's time goes, against QEMU in the same run.
//!
//! - The guest kernel with the test initramfs, N times under kiln-vmm and under QEMU `-M
//!   microvm`, interleaved: VMM start -> the guest's init marker (min, median, max) and the ratio,
//!   and Kiln's `--boot-timer` figure (`Guest-boot-time`, as Firecracker logs it) for the same boots.
//! - Kiln's own phases for those boots, read off its log (`KILN_LOG=info` timestamps): process
//!   start to the KVM VM with memory, the kernel and boot tables loaded, vCPUs configured, vCPUs
//!   running, and the guest's kernel until init.
//! - The guest kernel with the Debian rootfs and the agent as init: start -> the agent's first
//!   reply, under both VMMs.
//! - kiln-vmm's own memory once that VM runs: RSS minus the guest memory's share of it.

use std::process::Command;
use std::time::{Duration, Instant};

use kiln_tests::{INIT_MARKER, kiln_vmm_boot, qemu_microvm_boot, run_watching};

use crate::median;
use crate::peer::{Peer, Vm};

const LIMIT: Duration = Duration::from_secs(30);
const MEM_MIB: u32 = 256;

/// Kiln's log lines that end each phase, and the phase's name.
const PHASES: [(&str, &str); 4] = [
    ("VM created", "memory and the KVM VM"),
    (
        "kernel, initrd and boot tables loaded",
        "kernel, initrd, boot tables",
    ),
    ("vCPUs configured", "vCPU setup"),
    ("vCPUs started", "vCPU threads running"),
];

/// One boot's outcome: time to the init marker, and (kiln-vmm only) the phase ends in ms since
/// its logger started.
struct Booted {
    to_init: Duration,
    phase_ends: Vec<f64>,
    /// `Guest-boot-time` as `--boot-timer` logged it, in ms.
    boot_timer: Option<f64>,
}

/// Time from spawn to the init marker, checking that the VMM then exits 0.
fn time_boot(name: &str, cmd: Command) -> Result<Booted, String> {
    let run = run_watching(cmd, INIT_MARKER, LIMIT).map_err(|e| format!("{name}: {e}"))?;
    if run.timed_out {
        return Err(format!(
            "{name} still running after {LIMIT:?}\nstdout:\n{}\nstderr:\n{}",
            run.stdout, run.stderr
        ));
    }
    let after = run.marker_after.ok_or_else(|| {
        format!(
            "{name}: the guest never printed {INIT_MARKER}\n{}\n{}",
            run.stdout, run.stderr
        )
    })?;
    if !run.status.success() {
        return Err(format!(
            "{name} exited with {} after the guest rebooted: {}",
            run.status, run.stderr
        ));
    }
    Ok(Booted {
        to_init: after,
        phase_ends: phase_ends(&run.stderr),
        boot_timer: boot_timer_ms(&run.stderr),
    })
}

/// The `Guest-boot-time = N us M ms, ...` line Firecracker's harnesses parse, as ms.
fn boot_timer_ms(log: &str) -> Option<f64> {
    let rest = log
        .lines()
        .find_map(|l| l.split_once("Guest-boot-time = "))?
        .1;
    let us: f64 = rest.split_whitespace().next()?.parse().ok()?;
    Some(us / 1000.0)
}

/// The logger timestamps (ms) of the lines that end each of [`PHASES`], where all are found.
fn phase_ends(log: &str) -> Vec<f64> {
    let stamp = |what: &str| {
        log.lines().find(|l| l.contains(what)).and_then(|l| {
            let inside = l.split_once('[')?.1.split_once(" ms]")?.0;
            inside.trim().parse::<f64>().ok()
        })
    };
    PHASES
        .iter()
        .map(|(line, _)| stamp(line))
        .collect::<Option<Vec<_>>>()
        .unwrap_or_default()
}

/// (min, median, max) of `samples` in milliseconds.
fn stats(samples: &[Duration]) -> (f64, f64, f64) {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    let med = median(&mut ms);
    (ms[0], med, ms[ms.len() - 1])
}

/// RSS of process `pid` and the share of it that is guest memory (the memfd mapping), in KiB.
fn rss_split(pid: u32) -> Result<(u64, u64), String> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let (mut total, mut guest, mut in_guest) = (0, 0, false);
    for line in text.lines() {
        if line
            .split_whitespace()
            .next()
            .is_some_and(|w| w.contains('-'))
            && !line.ends_with(':')
        {
            in_guest = line.contains("kiln-guest-mem");
        } else if let Some(v) = line.strip_prefix("Rss:") {
            let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            total += kib;
            if in_guest {
                guest += kib;
            }
        }
    }
    Ok((total, guest))
}

/// Runs the benchmark with `runs` boots per VMM.
pub fn run(runs: usize) -> Result<(), String> {
    let mut kiln = Vec::with_capacity(runs);
    let mut qemu = Vec::with_capacity(runs);
    let mut phases: Vec<Vec<f64>> = vec![Vec::new(); PHASES.len() + 1];
    let mut timer = Vec::with_capacity(runs);
    for i in 0..runs {
        // The guest's init signals the boot timer just after the marker (a few shell lines).
        let mut cmd = kiln_vmm_boot(1, MEM_MIB, "KILN_BOOT_TIMER=1");
        cmd.env("KILN_LOG", "info").arg("--boot-timer");
        let k = time_boot("kiln-vmm", cmd)?;
        let q = time_boot("qemu microvm", qemu_microvm_boot(1, MEM_MIB, ""))?;
        eprintln!(
            "run {}/{runs}: kiln {:?}, qemu {:?}",
            i + 1,
            k.to_init,
            q.to_init
        );
        if k.phase_ends.len() == PHASES.len() {
            let mut last = 0.0;
            for (p, end) in k.phase_ends.iter().enumerate() {
                phases[p].push(end - last);
                last = *end;
            }
            phases[PHASES.len()].push(k.to_init.as_secs_f64() * 1000.0 - last);
        }
        timer.extend(k.boot_timer);
        kiln.push(k.to_init);
        qemu.push(q.to_init);
    }
    let (kmin, kmed, kmax) = stats(&kiln);
    let (qmin, qmed, qmax) = stats(&qemu);
    println!(
        "boot: VMM start -> guest init marker, {runs} runs each, 1 vCPU, {MEM_MIB} MiB, same kernel and initramfs"
    );
    println!("  | | min | median | max |");
    println!("  |---|---|---|---|");
    println!("  | kiln-vmm | {kmin:.0} ms | {kmed:.0} ms | {kmax:.0} ms |");
    println!("  | qemu microvm | {qmin:.0} ms | {qmed:.0} ms | {qmax:.0} ms |");
    println!("  ratio (qemu median / kiln median): {:.2}x", qmed / kmed);
    if timer.len() == runs {
        println!(
            "  kiln-vmm --boot-timer, `Guest-boot-time` (VM build start -> init's write of 123): median {:.0} ms",
            median(&mut timer)
        );
    } else {
        return Err(format!(
            "--boot-timer logged Guest-boot-time in {} of {runs} boots",
            timer.len()
        ));
    }

    println!(
        "\nwhere kiln-vmm's boot goes (medians of {} runs):",
        phases[0].len()
    );
    println!("  | phase | median |");
    println!("  |---|---|");
    let names = PHASES
        .iter()
        .map(|(_, name)| *name)
        .chain(["the guest kernel, to init"]);
    for (name, samples) in names.zip(phases.iter_mut()) {
        if !samples.is_empty() {
            println!("  | {name} | {:.0} ms |", median(samples));
        }
    }

    let rootfs_runs = runs.min(3);
    let mut agent = [Vec::new(), Vec::new()];
    let mut overhead = None;
    for _ in 0..rootfs_runs {
        for (i, peer) in Peer::BOTH.into_iter().enumerate() {
            let start = Instant::now();
            let vm = Vm::start(peer)?;
            agent[i].push(start.elapsed());
            if peer == Peer::Kiln && overhead.is_none() {
                overhead = Some(rss_split(vm.pid())?);
            }
            vm.stop()?;
        }
    }
    println!(
        "\nthe Debian rootfs with the agent as init: VMM start -> the agent's first reply (median of {rootfs_runs}):"
    );
    println!("  | | median |");
    println!("  |---|---|");
    let k = stats(&agent[0]).1;
    let q = stats(&agent[1]).1;
    println!("  | kiln-vmm | {k:.0} ms |");
    println!("  | qemu microvm | {q:.0} ms |");
    println!("  ratio (qemu / kiln): {:.2}x", q / k);
    if let Some((total, guest)) = overhead {
        println!(
            "\nkiln-vmm's memory with that VM up: RSS {:.1} MiB, of which guest memory {:.1} MiB: \
             the VMM's own {:.2} MiB (goal <= 3 MiB)",
            total as f64 / 1024.0,
            guest as f64 / 1024.0,
            (total - guest) as f64 / 1024.0
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_sort_and_take_the_middle() {
        let ms = Duration::from_millis;
        assert_eq!(stats(&[ms(30), ms(10), ms(20)]), (10.0, 20.0, 30.0));
        assert_eq!(stats(&[ms(40), ms(10), ms(20), ms(30)]), (10.0, 25.0, 40.0));
    }

    #[test]
    fn the_boot_timer_line_is_read_as_firecracker_prints_it() {
        let log = "kiln-vmm [ 900.0 ms] info: Guest-boot-time = 812345 us 812 ms,   4100 CPU us 4 CPU ms\n";
        assert_eq!(boot_timer_ms(log), Some(812.345));
        assert_eq!(boot_timer_ms("nothing\n"), None);
    }

    #[test]
    fn phases_come_from_the_log_timestamps() {
        let log = "kiln-vmm [   12.500 ms] info: VM created with 256 MiB of memory\n\
                   kiln-vmm [  100.000 ms] info: kernel, initrd and boot tables loaded; entry\n\
                   kiln-vmm [  110.000 ms] info: 1 vCPUs configured\n\
                   kiln-vmm [  130.250 ms] info: vCPUs started\n";
        assert_eq!(phase_ends(log), vec![12.5, 100.0, 110.0, 130.25]);
        assert!(phase_ends("nothing").is_empty());
    }
}
