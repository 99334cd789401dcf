//! Working sets on the host's /dev/kvm, under kiln-vmm's seccomp filters, with the counting tiny
//! guest: a VM loaded from a snapshot records what it touched (`PUT /snapshot/working-set`), a
//! later load of the same snapshot with `working_set_path` has those pages in its memory before
//! the guest runs (read from the VMM's page map) and the guest counts on; a working set that
//! is not there, belongs to another snapshot or comes with a page-fault handler is refused by
//! name, and the VMM then takes a good load.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{ApiVmm, COUNTER_ADDR, CounterVmm, boot_counter, counter, scratch, start_vmm};

const PAGE: u64 = 4096;

/// Loads `state`/`mem` into `vmm` with the working set `ws` (or none); the status and body.
fn load(vmm: &ApiVmm, state: &Path, mem: &Path, ws: Option<&Path>, resume: bool) -> (u16, String) {
    let ws = ws.map_or(String::new(), |p| {
        format!(r#", "working_set_path": "{}""#, p.display())
    });
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": {resume}{ws}}}"#,
        state.display(),
        mem.display()
    );
    vmm.call("PUT", "/snapshot/load", &body)
}

/// Whether the counter's page is a private copy in `vmm`'s guest memory (a private mapping of
/// `mem`, found in its /proc maps), read from its page map.
fn counter_page_is_a_private_copy(vmm: &ApiVmm, mem: &Path) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", vmm.pid())).unwrap();
    let name = mem.display().to_string();
    let line = maps
        .lines()
        .find(|l| l.ends_with(&name) && l.split_whitespace().nth(2) == Some("00000000"))
        .unwrap_or_else(|| panic!("no mapping of {name} at offset 0 in:\n{maps}"));
    let start = u64::from_str_radix(line.split('-').next().unwrap(), 16).unwrap();
    let mut entry = [0u8; 8];
    std::fs::File::open(format!("/proc/{}/pagemap", vmm.pid()))
        .unwrap()
        .read_exact_at(&mut entry, (start + u64::from(COUNTER_ADDR)) / PAGE * 8)
        .unwrap();
    let entry = u64::from_le_bytes(entry);
    let (present, file) = (entry >> 63 & 1 == 1, entry >> 61 & 1 == 1);
    present && !file
}

#[test]
fn a_recorded_working_set_is_in_memory_before_the_next_load_runs_and_the_guest_counts_on() {
    let dir = scratch("working-set");
    let vmm = boot_counter(&dir, 1);
    vmm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (state, mem) = vmm.snapshot(&dir, "a", "Full");
    let count_a = counter(&mem);
    drop(vmm);
    let ws = dir.join("a.ws");

    // Recording: nothing to record against before a load; after one, what the guest touched.
    let first = start_vmm(&dir, "first");
    let fault = first.fault("PUT", "/snapshot/working-set", r#"{"path": "/nowhere"}"#);
    assert!(fault.contains("no snapshot was loaded"), "{fault}");
    let (code, text) = load(&first, &state, &mem, None, true);
    assert_eq!(code, 204, "{text}");
    first.wait_dots(2);
    let body = format!(r#"{{"path": "{}"}}"#, ws.display());
    first.ok("PUT", "/snapshot/working-set", &body);
    drop(first);
    let set: serde_json::Value = serde_json::from_slice(&std::fs::read(&ws).unwrap()).unwrap();
    assert_eq!(set["kiln_working_set"], 1);
    assert_eq!(set["mem_size"], 32 << 20);
    let covers = |kind: &str, addr: u64| {
        set[kind].as_array().unwrap().iter().any(|r| {
            let (s, l) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
            (s..s + l).contains(&addr)
        })
    };
    assert!(covers("written", u64::from(COUNTER_ADDR)), "{set}");
    assert!(
        !set["read"].as_array().unwrap().is_empty(),
        "the guest's code was read: {set}"
    );

    // A load without it: the counter's page is not in memory until the guest touches it.
    let plain = start_vmm(&dir, "plain");
    let (code, text) = load(&plain, &state, &mem, None, false);
    assert_eq!(code, 204, "{text}");
    assert!(!counter_page_is_a_private_copy(&plain, &mem));
    drop(plain);

    // With it: the page is a private copy before the guest has run, and the guest counts on.
    let warm = start_vmm(&dir, "warm");
    let (code, text) = load(&warm, &state, &mem, Some(&ws), false);
    assert_eq!(code, 204, "{text}");
    assert!(counter_page_is_a_private_copy(&warm, &mem));
    warm.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    warm.wait_dots(2);
    warm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (_, b_mem) = warm.snapshot(&dir, "b", "Full");
    assert!(counter(&b_mem) > count_a, "the guest counted on");
    assert!(
        counter(&b_mem) < count_a + 10_000_000,
        "and did not start over"
    );
}

#[test]
fn a_missing_foreign_or_uffd_working_set_is_refused_by_name_and_a_good_load_follows() {
    let dir = scratch("working-set-bad");
    let vmm = boot_counter(&dir, 1);
    vmm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (a_state, a_mem) = vmm.snapshot(&dir, "a", "Full");
    let (b_state, b_mem) = vmm.snapshot(&dir, "b", "Full");
    drop(vmm);
    let a_ws = dir.join("a.ws");
    let first = start_vmm(&dir, "first");
    assert_eq!(load(&first, &a_state, &a_mem, None, true).0, 204);
    first.wait_dots(1);
    first.ok(
        "PUT",
        "/snapshot/working-set",
        &format!(r#"{{"path": "{}"}}"#, a_ws.display()),
    );
    drop(first);

    let target = start_vmm(&dir, "target");
    let missing = dir.join("missing.ws");
    let (code, fault) = load(&target, &a_state, &a_mem, Some(&missing), true);
    assert_eq!(code, 400, "{fault}");
    assert!(
        fault.contains(&format!("working_set_path {}", missing.display())),
        "{fault}"
    );
    let (code, fault) = load(&target, &b_state, &b_mem, Some(&a_ws), true);
    assert_eq!(code, 400, "{fault}");
    assert!(fault.contains("it was recorded on snapshot"), "{fault}");
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "Uffd", "backend_path": "{}"}}, "working_set_path": "{}"}}"#,
        a_state.display(),
        dir.join("uffd.sock").display(),
        a_ws.display()
    );
    let fault = target.fault("PUT", "/snapshot/load", &body);
    assert!(
        fault.contains("working_set_path: a working set is mapped in"),
        "{fault}"
    );

    let (code, text) = load(&target, &a_state, &a_mem, Some(&a_ws), true);
    assert_eq!(code, 204, "{text}");
    target.wait_dots(2);
}
