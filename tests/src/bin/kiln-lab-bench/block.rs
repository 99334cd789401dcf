//! Sequential block throughput: `dd` with O_DIRECT inside the guest against a 256 MiB drive in L1's
//! tmpfs, under kiln-vmm (virtio-blk) and QEMU microvm (virtio-blk-device), interleaved. Both go
//! through L1's page cache (Kiln opens drives buffered; QEMU runs with cache=writeback).

use std::process::Command;
use std::time::Duration;

use kiln_tests::{INIT_MARKER, kiln_vmm_boot, qemu_microvm_boot, run_watching};

use super::median;

const DISK_MIB: usize = 256;
const LIMIT: Duration = Duration::from_secs(300);

/// The guest script: write then read the whole drive, 1 MiB blocks, bypassing the page cache.
/// Debian's busybox `dd` prints no rate, so the guest brackets each copy with its uptime.
const SCRIPT: &str = "u() { cut -d' ' -f1 /proc/uptime; }; \
    a=$(u); dd if=/dev/zero of=/dev/vda bs=1M count=256 oflag=direct 2>/dev/null; b=$(u); \
    dd if=/dev/vda of=/dev/null bs=1M count=256 iflag=direct 2>/dev/null; c=$(u); \
    echo write: $a $b; echo read: $b $c";

/// MB/s (decimal megabytes) from a guest line `PREFIX START END` of uptimes in seconds.
fn rate(out: &str, prefix: &str) -> Option<f64> {
    let line = out.lines().find_map(|l| l.strip_prefix(prefix))?;
    let mut t = line.split_whitespace().map(|v| v.parse::<f64>().ok());
    let (start, end) = (t.next()??, t.next()??);
    (end > start).then(|| (DISK_MIB as f64 * 1_048_576.0 / 1e6) / (end - start))
}

fn measure(name: &str, cmd: Command) -> Result<(f64, f64), String> {
    let run = run_watching(cmd, INIT_MARKER, LIMIT).map_err(|e| format!("{name}: {e}"))?;
    let context = format!("{name}\nstdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    if run.timed_out {
        return Err(format!("still running after {LIMIT:?}: {context}"));
    }
    match (rate(&run.stdout, "write:"), rate(&run.stdout, "read:")) {
        (Some(w), Some(r)) => Ok((w, r)),
        _ => Err(format!("no dd figures in the guest output: {context}")),
    }
}

/// Runs the benchmark `runs` times per VMM and prints medians and ratios.
pub fn run(runs: usize) -> Result<(), String> {
    let img = std::env::temp_dir().join("kiln-bench-block.img");
    std::fs::write(&img, vec![0u8; DISK_MIB << 20])
        .map_err(|e| format!("{}: {e}", img.display()))?;
    let run_arg = format!("KILN_RUN=\"{SCRIPT}\"");
    let (mut kw, mut kr, mut qw, mut qr) = (vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        let mut kiln = kiln_vmm_boot(1, 256, &run_arg);
        kiln.arg("--drive")
            .arg(format!("id=bench,path={}", img.display()));
        let (w, r) = measure("kiln-vmm", kiln)?;
        kw.push(w);
        kr.push(r);
        let mut qemu = qemu_microvm_boot(1, 256, &run_arg);
        qemu.arg("-drive")
            .arg(format!(
                "id=d0,file={},format=raw,if=none,cache=writeback",
                img.display()
            ))
            .args(["-device", "virtio-blk-device,drive=d0"]);
        let (w2, r2) = measure("qemu microvm", qemu)?;
        qw.push(w2);
        qr.push(r2);
        eprintln!(
            "run {}/{runs}: kiln write {w:.0} read {r:.0} MB/s; qemu write {w2:.0} read {r2:.0} MB/s",
            i + 1
        );
    }
    let (kw, kr, qw, qr) = (
        median(&mut kw),
        median(&mut kr),
        median(&mut qw),
        median(&mut qr),
    );
    println!(
        "block: sequential O_DIRECT dd of a {DISK_MIB} MiB drive in L1 tmpfs, 1 MiB blocks, median of {runs}"
    );
    println!("{:<14}{:>12}{:>12}", "", "write MB/s", "read MB/s");
    println!("{:<14}{kw:>12.1}{kr:>12.1}", "kiln-vmm");
    println!("{:<14}{qw:>12.1}{qr:>12.1}", "qemu microvm");
    println!(
        "ratio (kiln / qemu): write {:.2}x, read {:.2}x",
        kw / qw,
        kr / qr
    );
    let _ = std::fs::remove_file(&img);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_timings_become_rates() {
        let out = "write: 10.00 12.00\nread: 12.00 13.00\n";
        assert!((rate(out, "write:").unwrap() - 134.2).abs() < 0.1);
        assert!((rate(out, "read:").unwrap() - 268.4).abs() < 0.1);
        assert_eq!(rate("nothing", "read:"), None);
        assert_eq!(
            rate("read: 5.00 5.00", "read:"),
            None,
            "no time elapsed: no figure"
        );
    }
}
