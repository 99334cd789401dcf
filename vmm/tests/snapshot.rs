//! Pause, resume, snapshots and restores on the host's /dev/kvm with a tiny guest that counts in
//! memory: a paused guest does not count, a snapshot's memory file holds the count, a new process
//! restored from it counts on from there, diffs hold only what changed and merge into their base,
//! and bad snapshot files are refused by name while the VMM waits for a good one.

mod common;

use std::time::Duration;

use common::{
    CounterVmm, boot_counter, boot_counter_with, counter, data_bytes, scratch, start_vmm, write,
};

#[test]
fn pause_snapshot_restore_diff_and_merge() {
    let dir = scratch("snapshot");
    let vmm = boot_counter(&dir, 1);

    let (code, fault) = vmm.call(
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_path": "{0}/x.state", "mem_file_path": "{0}/x.mem"}}"#,
            dir.display()
        ),
    );
    assert_eq!(code, 400);
    assert!(fault.contains("pause it first"), "{fault}");

    vmm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert!(vmm.call("GET", "/", "").1.contains("\"state\":\"Paused\""));
    let (a_state, a_mem) = vmm.snapshot(&dir, "a", "Full");
    let count_a = counter(&a_mem);
    assert!(count_a >= 2 * 0x4000, "the guest had counted: {count_a}");
    let dots = vmm.dots();
    std::thread::sleep(Duration::from_millis(300));
    let (_, b_mem) = vmm.snapshot(&dir, "b", "Full");
    assert_eq!(counter(&b_mem), count_a, "a paused guest does not count");
    assert_eq!(vmm.dots(), dots, "nor print");
    assert!(
        data_bytes(&a_mem) < 1 << 20,
        "a full snapshot of a tiny guest is sparse: {} bytes of data",
        data_bytes(&a_mem)
    );

    vmm.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    vmm.wait_dots(2);
    vmm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (d_state, d_mem) = vmm.snapshot(&dir, "d", "Diff");
    let count_d = counter(&d_mem);
    assert!(count_d > count_a, "{count_d} after {count_a}");
    assert!(
        data_bytes(&d_mem) <= 4 * 4096,
        "the diff holds the counter page and the trailer, not all memory: {} bytes",
        data_bytes(&d_mem)
    );
    drop(vmm);

    // A new process continues from the full snapshot.
    let restored = start_vmm(&dir, "restored");
    let (code, text) = restored.load(&a_state, &a_mem, true);
    assert_eq!(code, 204, "{text}");
    assert!(
        restored
            .call("GET", "/", "")
            .1
            .contains("\"state\":\"Running\"")
    );
    assert!(
        restored
            .call("GET", "/vm/config", "")
            .1
            .contains("\"mem_size_mib\":32")
    );
    restored.wait_dots(2);
    restored.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (_, e_mem) = restored.snapshot(&dir, "e", "Full");
    assert!(
        counter(&e_mem) > count_a,
        "the restored guest counted on from {count_a}"
    );
    assert!(
        counter(&e_mem) < count_a + 10_000_000,
        "and did not start over"
    );
    drop(restored);

    // The diff's state needs its memory merged into the base first.
    let merged = dir.join("merged.mem");
    std::fs::copy(&a_mem, &merged).unwrap();
    let third = start_vmm(&dir, "third");
    let (code, fault) = third.load(&d_state, &a_mem, false);
    assert_eq!(code, 400);
    assert!(
        fault.contains("merge its memory into the base first"),
        "{fault}"
    );
    kiln_snapshot::merge(&merged, std::slice::from_ref(&d_mem)).unwrap();
    let (code, text) = third.load(&d_state, &merged, false);
    assert_eq!(code, 204, "{text}");
    assert!(
        third
            .call("GET", "/", "")
            .1
            .contains("\"state\":\"Paused\"")
    );
    let (_, f_mem) = third.snapshot(&dir, "f", "Full");
    assert_eq!(
        counter(&f_mem),
        count_d,
        "base + diff is the VM at the diff"
    );
}

#[test]
fn bad_snapshot_files_are_refused_by_name_and_the_vmm_waits() {
    // Two vCPUs: the second waits for a SIPI that never comes, a state that must survive too.
    let dir = scratch("snapshot-bad");
    let vmm = boot_counter(&dir, 2);
    vmm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (state, mem) = vmm.snapshot(&dir, "good", "Full");
    drop(vmm);

    let target = start_vmm(&dir, "target");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    let flipped = write(&dir, "flipped.state", &bytes);
    let (code, fault) = target.load(&flipped, &mem, true);
    assert_eq!(code, 400);
    assert!(
        fault.contains("flipped.state") && fault.to_lowercase().contains("crc"),
        "{fault}"
    );
    let (code, fault) = target.load(&dir.join("missing.state"), &mem, true);
    assert_eq!(code, 400);
    assert!(fault.contains("missing.state"), "{fault}");
    let short = dir.join("short.mem");
    std::fs::copy(&mem, &short).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&short)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (code, fault) = target.load(&state, &short, true);
    assert_eq!(code, 400);
    assert!(
        fault.contains("short.mem") && fault.contains("truncated"),
        "{fault}"
    );

    // The VMM is still waiting; the good snapshot loads and runs.
    let (code, text) = target.load(&state, &mem, true);
    assert_eq!(code, 204, "{text}");
    target.wait_dots(1);
    let (code, fault) = target.load(&state, &mem, true);
    assert_eq!(code, 400);
    assert!(fault.contains("already started"), "{fault}");

    // A snapshot that fails after its memory file was written removes that file's temporary
    // (under the VMM's seccomp filter) and the VM carries on.
    target.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (code, fault) = target.call(
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_path": "{0}/missing/x.state", "mem_file_path": "{0}/x.mem"}}"#,
            dir.display()
        ),
    );
    assert_eq!(code, 400);
    assert!(fault.contains("missing/x.state"), "{fault}");
    let stray = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .any(|e| kiln_snapshot::is_temporary_name(&e.file_name()));
    assert!(!stray, "the memory file's temporary was removed");
    target.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    target.wait_dots(1);
}

#[test]
fn crafted_state_files_with_a_right_crc_are_validated_by_name() {
    use kiln_vmm::persist::MicrovmState;
    let dir = scratch("snapshot-crafted");
    let disk = write(&dir, "data.img", &[0u8; 4096]);
    let vmm = boot_counter_with(&dir, 2, |vmm| {
        vmm.ok(
            "PUT",
            "/drives/data",
            &format!(
                r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": true}}"#,
                disk.display()
            ),
        )
    });
    vmm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (state_path, mem) = vmm.snapshot(&dir, "good", "Full");
    drop(vmm);

    let target = start_vmm(&dir, "target");
    type Craft = Box<dyn Fn(&mut MicrovmState)>;
    let cases: Vec<(&str, Craft, &str)> = vec![
        (
            "huge-mem",
            Box::new(|s| s.mem_size = u64::MAX - 100),
            "bytes of memory",
        ),
        ("no-vcpus", Box::new(|s| s.vcpus.clear()), "vCPU states"),
        (
            "vcpu-count",
            Box::new(|s| {
                s.config_json = s
                    .config_json
                    .replace("\"vcpu_count\":2", "\"vcpu_count\":200")
            }),
            "vcpu_count is 200",
        ),
        (
            "device-addr",
            Box::new(|s| s.devices.iter_mut().for_each(|d| d.addr = u64::MAX - 0x10)),
            "outside the device window",
        ),
        (
            "device-irq",
            Box::new(|s| s.devices.iter_mut().for_each(|d| d.irq = 99)),
            "interrupt line 99",
        ),
    ];
    for (name, craft, expect) in cases {
        let mut state: MicrovmState = kiln_snapshot::load_state(&state_path).unwrap();
        craft(&mut state);
        let path = dir.join(format!("{name}.state"));
        kiln_snapshot::save_state(&path, &state).unwrap();
        let (code, fault) = target.load(&path, &mem, true);
        assert_eq!(code, 400, "{name}: {fault}");
        assert!(
            fault.contains(&format!("{name}.state")) && fault.contains(expect),
            "{name}: {fault}"
        );
    }
    // Still waiting: the good one loads and runs.
    let (code, text) = target.load(&state_path, &mem, true);
    assert_eq!(code, 204, "{text}");
    target.wait_dots(1);
}
