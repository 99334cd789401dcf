//! The balloon's API on the host's /dev/kvm, under kiln-vmm's seccomp filters, with a tiny guest
//! that counts (it has no balloon driver, so the device stays unused): configured before boot,
//! changed and queried after, refused where Firecracker refuses, and carried through a snapshot
//! into a new process, whose guest counts on. Reclaim itself needs a Linux guest: the lab tests
//! (`tests/tests/lab_balloon.rs`) cover it.

mod common;

use std::time::Duration;

use common::{ApiVmm, Program, scratch, tiny_kernel, write};

#[test]
fn the_balloon_api_before_and_after_boot_and_through_a_snapshot() {
    let dir = scratch("balloon");
    let kernel = write(&dir, "counter.elf", &tiny_kernel(Program::Counter, true));
    let mut vmm = ApiVmm::start(&dir, "boot");
    assert!(
        vmm.fault("GET", "/balloon", "")
            .contains("no balloon device")
    );
    vmm.ok(
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display()),
    );
    vmm.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 32}"#,
    );
    assert_eq!(
        vmm.fault(
            "PUT",
            "/balloon",
            r#"{"amount_mib": 33, "deflate_on_oom": true}"#
        ),
        "balloon: amount_mib 33 is larger than machine-config.mem_size_mib 32"
    );
    vmm.ok(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 4, "deflate_on_oom": true, "stats_polling_interval_s": 1, "free_page_reporting": true}"#,
    );
    vmm.ok("PATCH", "/balloon", r#"{"amount_mib": 8}"#);
    assert_eq!(vmm.json("/balloon")["amount_mib"], 8);
    vmm.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    vmm.assert_alive("started");

    let config = vmm.json("/balloon");
    assert_eq!(
        config,
        serde_json::json!({"amount_mib": 8, "deflate_on_oom": true, "stats_polling_interval_s": 1,
                           "free_page_hinting": false, "free_page_reporting": true})
    );
    assert!(
        vmm.fault(
            "PUT",
            "/balloon",
            r#"{"amount_mib": 1, "deflate_on_oom": true}"#
        )
        .contains("cannot be changed after the instance started")
    );
    vmm.ok("PATCH", "/balloon", r#"{"amount_mib": 16}"#);
    assert_eq!(
        vmm.fault("PATCH", "/balloon", r#"{"amount_mib": 33}"#),
        "balloon amount_mib 33 is larger than guest memory (32 MiB)"
    );
    let stats = vmm.json("/balloon/statistics");
    assert_eq!(
        stats,
        serde_json::json!({"target_pages": 4096, "actual_pages": 0, "target_mib": 16,
                           "actual_mib": 0}),
        "no driver: no guest numbers yet"
    );
    assert!(
        vmm.fault(
            "PATCH",
            "/balloon/statistics",
            r#"{"stats_polling_interval_s": 0}"#
        )
        .contains("cannot turn them off")
    );
    vmm.ok(
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s": 3}"#,
    );
    let full = vmm.json("/vm/config");
    assert_eq!(full["balloon"]["amount_mib"], 16);
    assert_eq!(full["balloon"]["stats_polling_interval_s"], 3);

    // Full snapshot under the VMM thread's filter and a restore into a new process.
    vmm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (state, mem) = vmm.snapshot(&dir, "b", "Full");
    vmm.assert_alive("snapshot taken");
    drop(vmm);

    let mut restored = ApiVmm::start(&dir, "restored");
    restored.ok(
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
            state.display(),
            mem.display()
        ),
    );
    assert_eq!(restored.json("/balloon")["amount_mib"], 16);
    assert_eq!(restored.json("/balloon")["stats_polling_interval_s"], 3);
    assert_eq!(restored.json("/balloon/statistics")["target_pages"], 4096);
    restored.ok("PATCH", "/balloon", r#"{"amount_mib": 2}"#);
    assert_eq!(restored.json("/balloon/statistics")["target_mib"], 2);
    std::thread::sleep(Duration::from_millis(300));
    restored.assert_alive("restored");
}
