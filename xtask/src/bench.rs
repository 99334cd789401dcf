//! `cargo xtask bench <name>`: benchmarks that print figures and a ratio against a peer measured in
//! the same run. They run inside the lab (`kiln-lab-bench`, built from the tests crate), with QEMU
//! in the image as the peer.

use crate::guest_images;
use crate::lab::{self, LabRun};
use crate::util::Result;

const USAGE: &str =
    "usage: cargo xtask bench boot|block|exec|vsock|snapshot|restore|pool|memory|net|e2b [--runs N]
       cargo xtask bench cycles [--restores N] [--boots M] [--net K]";

/// Benchmarks `kiln-lab-bench` knows.
const BENCHMARKS: &[&str] = &[
    "boot", "block", "exec", "vsock", "snapshot", "restore", "cycles", "pool", "memory", "net",
];

/// `cargo xtask bench NAME [OPTIONS]` (see USAGE)
pub fn main(args: &[String]) -> Result<u8> {
    let Some((name, rest)) = args.split_first() else {
        return Err(USAGE.into());
    };
    if name == "e2b" {
        // Driven from the host, with E2B's SDK, against kilnd in the lab.
        return crate::e2b::run_bench(rest);
    }
    if !BENCHMARKS.contains(&name.as_str()) {
        return Err(format!("unknown benchmark {name:?}\n{USAGE}"));
    }
    let mut cmd = vec!["kiln-lab-bench".to_string(), name.clone()];
    cmd.extend(rest.iter().cloned());
    let outcome = lab::run(&LabRun {
        files: vec![(
            guest_images::test_initramfs()?,
            "test-initramfs.cpio".into(),
        )],
        with_qemu: true,
        // The pool benchmark builds kilnd's python template.
        with_python: name == "pool",
        cmd,
        // A full cycles run (1000s of VM lifecycles) outlasts the default half hour; each cycle
        // has its own deadline and the lab's heartbeat watchdog catches a stuck L1.
        timeout: match name.as_str() {
            "cycles" => std::time::Duration::from_secs(4 * 3600),
            _ => LabRun::default().timeout,
        },
        // Network throughput needs the L2 guest's vCPU, its VMM's device thread and L1's TCP
        // end to run at once: on one L1 vCPU they take turns and both VMMs fall to ~2 MB/s guest
        // -> host (Kiln 1.6-2.4, QEMU 1.7), which measures L1's scheduler, not the device. Two
        // risk the rare L1 death that made one the default (see lab::L1_CPUS); a benchmark
        // may take that risk, the tests do not.
        cpus: match name.as_str() {
            "net" => 2,
            _ => crate::lab::L1_CPUS,
        },
        ..LabRun::default()
    })?;
    outcome.exit_status("benchmark")
}
