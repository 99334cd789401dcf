//! Boot Kiln's guest kernel with the busybox test initramfs under kiln-vmm, inside the nested lab.
//! The guest's init reports its CPU count and memory and reboots; kiln-vmm must then exit 0. The
//! one-vCPU boot also signals Firecracker's boot timer (`--boot-timer`).

use std::time::Duration;

use kiln_tests::{INIT_MARKER, debian_bzimage, kiln_vmm_boot, kiln_vmm_boot_kernel, run_watching};

const LIMIT: Duration = Duration::from_secs(120);

fn boot_and_check(vcpus: u8, mem_mib: u32) {
    check_boot(kiln_vmm_boot(vcpus, mem_mib, ""), vcpus, mem_mib);
}

fn check_boot(cmd: std::process::Command, vcpus: u8, mem_mib: u32) -> kiln_tests::Run {
    let run = run_watching(cmd, INIT_MARKER, LIMIT)
        .unwrap_or_else(|e| panic!("kiln-vmm with {vcpus} vCPUs: {e}"));
    let context = format!("stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(
        !run.timed_out,
        "kiln-vmm was still running after {LIMIT:?}\n{context}"
    );
    assert!(
        run.marker_after.is_some(),
        "the guest never reached init\n{context}"
    );
    assert_eq!(
        run.report_value::<u32>("cpus"),
        Some(u32::from(vcpus)),
        "{context}"
    );
    let mem_kb: u64 = run
        .report_value("mem_kb")
        .unwrap_or_else(|| panic!("no mem_kb\n{context}"));
    let configured_kb = u64::from(mem_mib) * 1024;
    // MemTotal is RAM less what the kernel keeps for itself (its image, early reservations).
    assert!(
        mem_kb <= configured_kb && mem_kb > configured_kb * 8 / 10,
        "MemTotal {mem_kb} kB for {configured_kb} kB configured\n{context}"
    );
    assert_eq!(
        run.status.code(),
        Some(0),
        "kiln-vmm exits 0 after the guest reboots\n{context}"
    );
    run
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn linux_boots_on_one_vcpu() {
    // With Firecracker's boot timer: init writes 123 to it through /dev/mem, and kiln-vmm logs
    // the line Firecracker's boot-time harnesses parse.
    let mut cmd = kiln_vmm_boot(1, 256, "KILN_BOOT_TIMER=1");
    cmd.arg("--boot-timer");
    let run = check_boot(cmd, 1, 256);
    let line = run
        .stderr
        .lines()
        .find_map(|l| l.split_once("Guest-boot-time = ").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no Guest-boot-time line\nstderr:\n{}", run.stderr));
    let words: Vec<&str> = line.split_whitespace().collect();
    assert!(
        matches!(
            words[..],
            [us, "us", ms, "ms,", cpu_us, "CPU", "us", cpu_ms, "CPU", "ms"]
                if [us, ms, cpu_us, cpu_ms].iter().all(|n| n.parse::<u64>().is_ok())
        ),
        "Firecracker's format: {line:?}"
    );
    let us: u64 = words[0].parse().unwrap();
    assert!(
        us > 0 && us / 1000 == words[2].parse::<u64>().unwrap(),
        "{line:?}"
    );
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn linux_boots_on_two_vcpus() {
    boot_and_check(2, 384);
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn guest_runs_a_command_from_the_kernel_command_line() {
    let run = run_watching(
        kiln_vmm_boot(1, 256, "KILN_RUN=\"echo sum=$((6*7)); uname -s\""),
        INIT_MARKER,
        LIMIT,
    )
    .expect("kiln-vmm runs");
    assert!(
        !run.timed_out,
        "kiln-vmm still running after {LIMIT:?}: {}",
        run.stdout
    );
    assert!(
        run.stdout.contains("sum=42\nLinux\n"),
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(run.status.code(), Some(0));
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn debian_bzimage_boots_through_the_64_bit_entry() {
    // Debian's cloud kernel finds CPUs only through ACPI (no MP-table parsing), so one vCPU.
    let kernel = debian_bzimage();
    check_boot(kiln_vmm_boot_kernel(&kernel, 1, 256, ""), 1, 256);
}
