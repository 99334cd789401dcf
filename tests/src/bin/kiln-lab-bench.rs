//! `kiln-lab-bench`: benchmarks that run inside the nested lab, started by `cargo xtask bench`.
//!
//! `kiln-lab-bench boot [--runs N]` boots the guest kernel and test initramfs N times under kiln-vmm
//! and N times under QEMU `-M microvm` (both on L1's KVM, interleaved so drift hits both alike) and
//! prints min/median/max of "VMM start -> guest init marker" and QEMU's median over Kiln's.
//!
//! `kiln-lab-bench block [--runs N]` measures sequential direct-I/O reads and writes of a 256 MiB
//! drive with `dd` inside the guest, under kiln-vmm's virtio-blk and QEMU's virtio-blk-device.
//!
//! `kiln-lab-bench exec [--runs N]` times agent exec round trips (`true`, `echo`), p50/p99, and
//! `kiln-lab-bench vsock [--runs N]` vsock throughput both ways through the agent, each with the
//! Debian rootfs under kiln-vmm and under QEMU microvm with vhost-vsock.
//!
//! `kiln-lab-bench snapshot [--runs N]` times snapshot creation (Full and Diff) with file sizes,
//! restore to the agent's first reply (p50/p99 over N) against booting under kiln-vmm and QEMU,
//! and the memory of 10 restored clones against 10 booted VMs.
//!
//! `kiln-lab-bench pool [--runs N]` measures kilnd: create -> first result from a warm and a cold
//! pool, creates per second, the memory of 50 idle sandboxes, a fork into 4.
//!
//! `kiln-lab-bench memory [--runs N]` measures host memory of a 512 MiB VM before, during and
//! after a 300 MiB workload, the snapshot taken after it and the restore from it, under kiln-vmm
//! with its balloon and QEMU microvm with virtio-balloon-device and free page reporting.
//!
//! `kiln-lab-bench net [--runs N]` measures TCP throughput both ways and 1-byte round trips
//! through the guest's NIC on a TAP, kiln-vmm's virtio-net against QEMU's virtio-net-device.
//!
//! `kiln-lab-bench cycles [--restores N] [--boots M] [--net K]` runs N restore cycles, M boot
//! cycles and K restore cycles with a sandbox network of `kiln run` in one L1 (500, 200 and 200
//! by default) and prints their p50/p99 and ratio.

use std::process::ExitCode;

#[path = "kiln-lab-bench/block.rs"]
mod block;
#[path = "kiln-lab-bench/boot.rs"]
mod boot;
#[path = "kiln-lab-bench/cycles.rs"]
mod cycles;
#[path = "kiln-lab-bench/exec.rs"]
mod exec;
#[path = "kiln-lab-bench/kvm.rs"]
mod kvm;
#[path = "kiln-lab-bench/memory.rs"]
mod memory;
#[path = "kiln-lab-bench/net.rs"]
mod net;
#[path = "kiln-lab-bench/peer.rs"]
mod peer;
#[path = "kiln-lab-bench/pool.rs"]
mod pool;
#[path = "kiln-lab-bench/qmp.rs"]
mod qmp;
#[path = "kiln-lab-bench/restore.rs"]
mod restore;
#[path = "kiln-lab-bench/snapshot.rs"]
mod snapshot;
#[path = "kiln-lab-bench/vsock.rs"]
mod vsock;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or_default();
    let result = match args.first().map(String::as_str) {
        Some("boot") => runs(rest, 10).and_then(boot::run),
        Some("block") => runs(rest, 3).and_then(block::run),
        Some("exec") => runs(rest, 200).and_then(exec::run),
        Some("vsock") => runs(rest, 3).and_then(vsock::run),
        Some("snapshot") => runs(rest, 50).and_then(snapshot::run),
        Some("cycles") => cycles::run(rest),
        Some("restore") => runs(rest, 20).and_then(restore::run),
        Some("pool") => runs(rest, 20).and_then(pool::run),
        Some("memory") => runs(rest, 2).and_then(memory::run),
        Some("net") => runs(rest, 3).and_then(net::run),
        _ => Err(
            "usage: kiln-lab-bench boot|block|exec|vsock|snapshot|restore|pool|memory|net [--runs N] | cycles [--restores N] [--boots M] [--net K]"
                .to_string(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-lab-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runs(args: &[String], default: usize) -> Result<usize, String> {
    match args {
        [] => Ok(default),
        [flag, n] if flag == "--runs" => match n.parse() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("--runs {n:?} is not a positive number")),
        },
        other => Err(format!("unexpected arguments {other:?}")),
    }
}

/// The median of `v` (sorted in place).
pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_flag_is_checked() {
        assert_eq!(runs(&[], 10), Ok(10));
        assert_eq!(runs(&["--runs".into(), "3".into()], 10), Ok(3));
        assert!(runs(&["--runs".into(), "0".into()], 10).is_err());
        assert!(runs(&["--walks".into()], 10).is_err());
    }
}
