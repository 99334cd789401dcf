//! kiln-vmm on the host's /dev/kvm with a tiny hand-built guest: the vCPU loop, port-I/O and MMIO
//! dispatch, both boot entries (64-bit and PVH), SMP creation, console output to stdout or a file,
//! and the exit status for a guest reset and for a triple fault.

mod common;

use std::time::Duration;

use common::{GREETING, Program, kiln_vmm, scratch, tiny_kernel, write};

const LIMIT: Duration = Duration::from_secs(60);

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn long_mode_guest_prints_and_resets_cleanly() {
    let dir = scratch("long");
    let kernel = write(&dir, "tiny.elf", &tiny_kernel(Program::Hello, false));
    let out = kiln_vmm(
        &["--kernel", kernel.to_str().unwrap(), "--mem-mib", "32"],
        LIMIT,
    );
    assert_eq!(
        stdout(&out),
        format!("{GREETING}mode: long64\nmmio: all-ones\n"),
        "stderr: {}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
}

#[test]
fn pvh_note_selects_32_bit_protected_mode_entry() {
    let dir = scratch("pvh");
    let kernel = write(&dir, "tiny-pvh.elf", &tiny_kernel(Program::Hello, true));
    let out = kiln_vmm(
        &["--kernel", kernel.to_str().unwrap(), "--mem-mib", "32"],
        LIMIT,
    );
    assert_eq!(
        stdout(&out),
        format!("{GREETING}mode: pvh-32\nmmio: all-ones\n"),
        "stderr: {}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn several_vcpus_are_created_and_the_bsp_runs() {
    let dir = scratch("smp");
    let kernel = write(&dir, "tiny.elf", &tiny_kernel(Program::Hello, false));
    for vcpus in ["2", "4"] {
        let out = kiln_vmm(
            &[
                "--kernel",
                kernel.to_str().unwrap(),
                "--mem-mib",
                "64",
                "--vcpus",
                vcpus,
            ],
            LIMIT,
        );
        assert_eq!(
            stdout(&out),
            format!("{GREETING}mode: long64\nmmio: all-ones\n"),
            "vcpus {vcpus}"
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "vcpus {vcpus}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn serial_output_can_go_to_a_file() {
    let dir = scratch("serial-file");
    let kernel = write(&dir, "tiny.elf", &tiny_kernel(Program::Hello, false));
    let log = dir.join("console.log");
    let out = kiln_vmm(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem-mib",
            "32",
            "--serial-out",
            log.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        format!("{GREETING}mode: long64\nmmio: all-ones\n")
    );
}

#[test]
fn config_file_boots_the_same_guest() {
    let dir = scratch("config-file");
    let kernel = write(&dir, "tiny.elf", &tiny_kernel(Program::Hello, false));
    let config = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}},
            "machine-config": {{"vcpu_count": 2, "mem_size_mib": 48}}}}"#,
        kernel.display()
    );
    let file = write(&dir, "vm.json", config.as_bytes());
    let out = kiln_vmm(&["--config-file", file.to_str().unwrap()], LIMIT);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(stdout(&out).starts_with(GREETING));
}

#[test]
fn with_smt_the_guest_sees_two_threads_a_core() {
    let dir = scratch("smt");
    let kernel = write(&dir, "threads.elf", &tiny_kernel(Program::Threads, false));
    for (vcpus, smt, threads) in [
        (2, true, "2"),
        (4, true, "2"),
        (2, false, "1"),
        (1, true, "1"),
    ] {
        let config = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}},
                "machine-config": {{"vcpu_count": {vcpus}, "mem_size_mib": 32, "smt": {smt}}}}}"#,
            kernel.display()
        );
        let file = write(&dir, "vm.json", config.as_bytes());
        let out = kiln_vmm(&["--config-file", file.to_str().unwrap()], LIMIT);
        assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
        assert_eq!(
            stdout(&out),
            format!("{threads}\n"),
            "{vcpus} vCPUs, smt {smt}"
        );
    }
    let config = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}"}},
            "machine-config": {{"vcpu_count": 3, "mem_size_mib": 32, "smt": true}}}}"#,
        kernel.display()
    );
    let file = write(&dir, "vm.json", config.as_bytes());
    let out = kiln_vmm(&["--config-file", file.to_str().unwrap()], LIMIT);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("machine-config.smt is true with vcpu_count 3"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn triple_fault_exits_non_zero_with_a_message() {
    let dir = scratch("triple");
    let kernel = write(&dir, "fault.elf", &tiny_kernel(Program::TripleFault, false));
    let out = kiln_vmm(
        &["--kernel", kernel.to_str().unwrap(), "--mem-mib", "32"],
        LIMIT,
    );
    assert_eq!(stdout(&out), GREETING, "the guest ran up to the fault");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("vCPU 0 triple-faulted"), "stderr: {err}");
    // Where it was: the registers at the fault, read under the vCPU thread's filter.
    assert!(
        err.contains("; guest RIP 0x") && err.contains(" IDT 0x"),
        "stderr: {err}"
    );
}

#[test]
fn console_input_reaches_the_guest() {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};

    let dir = scratch("console-input");
    let kernel = write(&dir, "echo.elf", &tiny_kernel(Program::Echo3, false));
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-vmm"))
        .args(["--kernel", kernel.to_str().unwrap(), "--mem-mib", "32"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"abc").unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < LIMIT, "the guest never echoed its input");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(out, "abc", "stderr: {err}");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
