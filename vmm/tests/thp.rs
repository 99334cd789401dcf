//! Transparent huge pages are off for kiln-vmm's own memory (a thread's 2 MiB stack must not
//! become a 2 MiB huge page) and back on when the guest's memory asks for them
//! (`huge_pages: "Transparent"`), as the process's status line `THP_enabled` shows.

mod common;

use common::{ApiVmm, Program, scratch, tiny_kernel, write};

fn thp_enabled(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no THP_enabled in:\n{status}"))
}

#[test]
fn thp_is_off_for_the_vmm_and_on_for_transparent_guest_memory() {
    let dir = scratch("thp");
    let kernel = write(&dir, "counter.elf", &tiny_kernel(Program::Counter, false));
    let boot = |name: &str, machine: &str| {
        let vm = ApiVmm::start(&dir, name);
        assert_eq!(thp_enabled(vm.pid()), "0", "off from the start");
        vm.success(
            "PUT",
            "/boot-source",
            &format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display()),
        );
        vm.success("PUT", "/machine-config", machine);
        vm.success("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
        vm
    };
    let plain = boot("plain", r#"{"vcpu_count": 1, "mem_size_mib": 32}"#);
    assert_eq!(
        thp_enabled(plain.pid()),
        "0",
        "a running VM's VMM keeps it off"
    );
    let huge = boot(
        "huge",
        r#"{"vcpu_count": 1, "mem_size_mib": 32, "huge_pages": "Transparent"}"#,
    );
    assert_eq!(
        thp_enabled(huge.pid()),
        "1",
        "Transparent guest memory turns it on"
    );
}
