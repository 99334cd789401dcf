//! `PUT /snapshot/load` with `mem_backend` `Uffd` on the host's /dev/kvm, under kiln-vmm's
//! seccomp filters, with the counting tiny guest and a page-fault handler thread in the test
//! (`common::UffdHandler`, serving from the snapshot's memory file): the restored guest counts on
//! from its snapshot as after a `File` load, later full and diff snapshots read its memory through
//! the handler, the handler gets Firecracker's JSON and the userfaultfd and keeps its connection
//! until the VMM exits, and a handler socket that is missing or deaf is refused by name while the
//! VMM waits for a good load.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    COUNTER_ADDR, CounterVmm, LIMIT, UffdHandler, boot_counter, counter, data_bytes, scratch,
    start_vmm,
};

const MIB: u64 = 1 << 20;

/// Guest memory of a memory file (holes read as zeros), without its trailer.
fn memory_of(path: &Path) -> Vec<u8> {
    let mut bytes = vec![0u8; (32 * MIB) as usize];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut bytes, 0)
        .unwrap();
    bytes
}

#[test]
fn a_uffd_load_counts_on_and_later_snapshots_read_memory_through_the_handler() {
    let dir = scratch("uffd");
    let vmm = boot_counter(&dir, 1);
    vmm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (a_state, a_mem) = vmm.snapshot(&dir, "a", "Full");
    let count_a = counter(&a_mem);
    drop(vmm);

    let handler = UffdHandler::start(&dir.join("uffd.sock"), &a_mem);
    let restored = start_vmm(&dir, "restored");
    let (code, text) = restored.load_uffd(&a_state, handler.sock(), true);
    assert_eq!(code, 204, "{text}");
    assert!(
        restored
            .call("GET", "/", "")
            .1
            .contains("\"state\":\"Running\"")
    );
    restored.wait_dots(2);
    restored.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);

    // A full snapshot reads all of guest memory, the pages the handler never served included
    // (the VMM's reads fault them in through it), so it is the snapshot it was loaded from with
    // the count moved on: the guest continued, it did not start over.
    let (_, e_mem) = restored.snapshot(&dir, "e", "Full");
    let count_e = counter(&e_mem);
    assert!(count_e > count_a, "the guest counted on from {count_a}");
    assert!(count_e < count_a + 10_000_000, "and did not start over");
    let (a, e) = (memory_of(&a_mem), memory_of(&e_mem));
    let count_page = COUNTER_ADDR as usize / 4096;
    let differ: Vec<usize> = (0..a.len() / 4096)
        .filter(|&p| a[p * 4096..(p + 1) * 4096] != e[p * 4096..(p + 1) * 4096])
        .collect();
    assert_eq!(differ, vec![count_page], "only the count's page changed");
    assert!(
        data_bytes(&e_mem) < MIB,
        "zero pages stay holes: {} bytes of data",
        data_bytes(&e_mem)
    );

    // Dirty pages are tracked in the anonymous memory too: a diff holds what changed since.
    restored.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    restored.wait_dots(2);
    restored.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (_, d_mem) = restored.snapshot(&dir, "d", "Diff");
    assert!(
        data_bytes(&d_mem) <= 4 * 4096,
        "the diff holds the counter page and the trailer: {} bytes",
        data_bytes(&d_mem)
    );
    let merged = dir.join("merged.mem");
    std::fs::copy(&e_mem, &merged).unwrap();
    kiln_snapshot::merge(&merged, std::slice::from_ref(&d_mem)).unwrap();
    assert!(counter(&merged) > count_e);
    assert_eq!(counter(&merged), counter(&d_mem));

    // What the handler was told, in Firecracker's words, and what it did.
    let log = handler.log();
    assert!(log.errors.is_empty(), "{:?}", log.errors);
    let message: serde_json::Value =
        serde_json::from_str(log.message.as_deref().expect("a message")).unwrap();
    let regions = message.as_array().expect("a JSON array");
    let layout = kiln_vmm::memory::file_layout(32 * MIB);
    assert_eq!(regions.len(), layout.len());
    for (r, (_, len, offset)) in regions.iter().zip(&layout) {
        let keys: BTreeSet<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from([
                "base_host_virt_addr",
                "offset",
                "page_size",
                "page_size_kib",
                "size"
            ])
        );
        assert_eq!(r["size"], *len);
        assert_eq!(
            r["offset"], *offset,
            "the region's place in the memory file"
        );
        assert_eq!(r["page_size"], 4096);
        assert_eq!(r["page_size_kib"], 4096, "Firecracker's value: bytes");
        assert!(r["base_host_virt_addr"].as_u64().unwrap() > 0);
    }
    let total: u64 = regions.iter().map(|r| r["size"].as_u64().unwrap()).sum();
    assert_eq!(total, 32 * MIB, "the regions cover guest memory");
    assert!(log.copied > 0, "pages came from the memory file: {log:?}");
    assert_eq!(
        log.faults,
        32 * MIB / 4096,
        "each page was served once (the full snapshot read them all)"
    );
    assert!(
        !log.vmm_closed,
        "the VMM keeps the connection while the VM lives"
    );

    drop(restored);
    let start = Instant::now();
    while !handler.log().vmm_closed {
        assert!(start.elapsed() < LIMIT, "the connection outlived the VMM");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_missing_or_deaf_handler_socket_is_refused_by_name_and_the_vmm_takes_a_good_load() {
    let dir = scratch("uffd-bad");
    let vmm = boot_counter(&dir, 1);
    vmm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (state, mem) = vmm.snapshot(&dir, "good", "Full");
    drop(vmm);

    let target = start_vmm(&dir, "target");
    let missing = dir.join("nobody.sock");
    let (code, fault) = target.load_uffd(&state, &missing, true);
    assert_eq!(code, 400, "{fault}");
    assert!(
        fault.contains(&format!(
            "no page-fault handler socket at {}",
            missing.display()
        )),
        "{fault}"
    );
    // A socket file whose listener is gone: connect is refused.
    let deaf = dir.join("deaf.sock");
    drop(UnixListener::bind(&deaf).unwrap());
    let (code, fault) = target.load_uffd(&state, &deaf, true);
    assert_eq!(code, 400, "{fault}");
    assert!(
        fault.contains(&format!(
            "handler socket {} refused the connection",
            deaf.display()
        )),
        "{fault}"
    );

    // Still waiting: a handler that is there gets guest memory and the guest counts.
    let handler = UffdHandler::start(&dir.join("uffd.sock"), &mem);
    let (code, text) = target.load_uffd(&state, handler.sock(), true);
    assert_eq!(code, 204, "{text}");
    target.wait_dots(2);
    let log = handler.log();
    assert!(log.faults > 0 && log.errors.is_empty(), "{log:?}");
    let (code, fault) = target.load_uffd(&state, handler.sock(), true);
    assert_eq!(code, 400);
    assert!(fault.contains("already started"), "{fault}");
}
