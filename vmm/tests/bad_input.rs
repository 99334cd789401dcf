//! Every bad input to kiln-vmm gets one line on stderr naming the value, exit status 2, and no panic.
//! These need no KVM: validation happens before any VM is built.

mod common;

use std::time::Duration;

use common::{Program, kiln_vmm, scratch, tiny_kernel, write};

/// Runs kiln-vmm and returns its single stderr line, asserting exit status 2 and nothing on stdout.
fn rejected(args: &[&str]) -> String {
    let out = kiln_vmm(args, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "args {args:?}: stderr {err}");
    assert!(out.stdout.is_empty(), "args {args:?}");
    assert_eq!(err.lines().count(), 1, "one line for {args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err.trim_end().to_string()
}

#[test]
fn bad_command_lines_and_files_are_named() {
    let dir = scratch("bad-input");
    let kernel = write(&dir, "tiny.elf", &tiny_kernel(Program::Hello, false));
    let k = kernel.to_str().unwrap();
    let text = write(&dir, "notes.txt", b"certainly not a kernel");
    let t = text.to_str().unwrap();

    assert_eq!(
        rejected(&[]),
        "kiln-vmm: --kernel PATH or --config-file FILE is required"
    );
    assert_eq!(
        rejected(&["--kernel", k, "--bogus"]),
        "kiln-vmm: unknown option --bogus"
    );
    assert_eq!(
        rejected(&["--kernel", "/nonexistent/vmlinux"]),
        "kiln-vmm: kernel image /nonexistent/vmlinux: No such file or directory (os error 2)"
    );
    assert_eq!(
        rejected(&["--kernel", t]),
        format!("kiln-vmm: kernel image {t} is not an ELF or bzImage")
    );
    assert_eq!(
        rejected(&["--kernel", k, "--vcpus", "0"]),
        "kiln-vmm: machine-config.vcpu_count is 0; it must be between 1 and 32"
    );
    assert_eq!(
        rejected(&["--kernel", k, "--vcpus", "33"]),
        "kiln-vmm: machine-config.vcpu_count is 33; it must be between 1 and 32"
    );
    assert_eq!(
        rejected(&["--kernel", k, "--mem-mib", "4"]),
        format!(
            "kiln-vmm: machine-config.mem_size_mib 4 is too small for kernel {k}: it needs at least 10 MiB"
        )
    );
    assert_eq!(
        rejected(&["--kernel", k, "--initrd", "/nonexistent/initrd"]),
        "kiln-vmm: initrd /nonexistent/initrd: No such file or directory (os error 2)"
    );
}

#[test]
fn bad_config_files_are_named() {
    let dir = scratch("bad-config");
    let kernel = write(&dir, "tiny.elf", &tiny_kernel(Program::Hello, false));
    let unknown = write(
        &dir,
        "unknown.json",
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 32, "vcpu_cnt": 2}}}}"#,
            kernel.display()
        )
        .as_bytes(),
    );
    let err = rejected(&["--config-file", unknown.to_str().unwrap()]);
    assert!(
        err.starts_with(&format!(
            "kiln-vmm: config file {}: unknown field `vcpu_cnt`",
            unknown.display()
        )),
        "{err}"
    );
    let zero = write(
        &dir,
        "zero.json",
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}},
                "machine-config": {{"vcpu_count": 0, "mem_size_mib": 32}}}}"#,
            kernel.display()
        )
        .as_bytes(),
    );
    assert_eq!(
        rejected(&["--config-file", zero.to_str().unwrap()]),
        "kiln-vmm: machine-config.vcpu_count is 0; it must be between 1 and 32"
    );
    assert_eq!(
        rejected(&["--config-file", "/nonexistent/vm.json"]),
        "kiln-vmm: config file /nonexistent/vm.json: No such file or directory (os error 2)"
    );
}
