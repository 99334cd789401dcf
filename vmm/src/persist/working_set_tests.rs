use std::io::Write;

use vm_memory::Bytes;

use super::*;
use crate::memory::map_snapshot;

const MEM: u64 = 64 * PAGE;
const SNAP: LoadedSnapshot = LoadedSnapshot {
    snapshot_id: 0x1234,
    mem_size: MEM,
};

/// A memory file of `MEM` bytes, page `i` filled with byte `i`, unlinked.
fn memory_file() -> std::fs::File {
    let mut f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    for i in 0..MEM / PAGE {
        f.write_all(&[i as u8; PAGE as usize]).unwrap();
    }
    f
}

/// Which pages of `mem` are private copies and which are otherwise mapped.
fn residency(mem: &GuestMemoryMmap) -> (Vec<u64>, Vec<u64>) {
    let (mut copies, mut mapped) = (Vec::new(), Vec::new());
    let region = mem.iter().next().unwrap();
    Pagemap::open()
        .unwrap()
        .entries(region.as_ptr() as u64, MEM / PAGE, |i, e| {
            if is_private_copy(e) {
                copies.push(i);
            } else if is_mapped(e) {
                mapped.push(i);
            }
        })
        .unwrap();
    (copies, mapped)
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-ws-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("set.json")
}

#[test]
fn a_recorded_set_is_what_the_guest_touched_and_a_new_mapping_gets_it_ahead() {
    let file = memory_file();
    let mem = map_snapshot(&file, MEM).unwrap();
    // Pages 3-5 written, 10 and 11 read, 20 written; the rest untouched.
    for page in [3u64, 4, 5, 20] {
        mem.write_obj(0xAAu8, GuestAddress(page * PAGE + 7))
            .unwrap();
    }
    for page in [10u64, 11] {
        let b: u8 = mem.read_obj(GuestAddress(page * PAGE)).unwrap();
        assert_eq!(b, page as u8);
    }
    let set = WorkingSet::record(&mem, SNAP).unwrap();
    assert_eq!(set.written, [[3 * PAGE, 3 * PAGE], [20 * PAGE, PAGE]]);
    // Reads may map a few neighbours too (the kernel's fault-around), never fewer.
    for page in [10u64, 11] {
        assert!(
            set.read
                .iter()
                .any(|&[s, l]| (s..s + l).contains(&(page * PAGE))),
            "{:?}",
            set.read
        );
    }
    let path = scratch("roundtrip");
    set.save(&path).unwrap();

    // A fresh clone of the same snapshot: nothing mapped until the prefault.
    let clone = map_snapshot(&file, MEM).unwrap();
    assert_eq!(residency(&clone), (vec![], vec![]));
    let loaded = WorkingSet::load(&path, SNAP, &clone).unwrap();
    assert_eq!(loaded, set);
    let done = loaded.prefault(&clone).unwrap();
    assert_eq!(done.written, 4);
    let (copies, mapped) = residency(&clone);
    assert_eq!(copies, [3, 4, 5, 20]);
    assert!(mapped.contains(&10) && mapped.contains(&11), "{mapped:?}");
    // Prefaulting changed no byte: the clone still reads the snapshot's content.
    for page in [3u64, 10, 20, 30] {
        let b: u8 = clone.read_obj(GuestAddress(page * PAGE + 7)).unwrap();
        assert_eq!(b, page as u8);
    }
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[test]
fn a_set_of_another_snapshot_or_out_of_range_or_not_json_is_refused_by_name() {
    let file = memory_file();
    let mem = map_snapshot(&file, MEM).unwrap();
    let path = scratch("refused");
    let refusal = |set: &WorkingSet| {
        set.save(&path).unwrap();
        WorkingSet::load(&path, SNAP, &mem).unwrap_err().to_string()
    };
    let good = WorkingSet {
        kiln_working_set: VERSION,
        snapshot_id: SNAP.snapshot_id,
        mem_size: MEM,
        written: vec![[0, PAGE]],
        read: vec![[PAGE, 2 * PAGE]],
    };
    let e = refusal(&WorkingSet {
        snapshot_id: 0x99,
        ..good.clone()
    });
    assert!(e.contains("recorded on snapshot 0000000000000099"), "{e}");
    assert!(e.contains(&path.display().to_string()), "{e}");
    let e = refusal(&WorkingSet {
        read: vec![[MEM - PAGE, 2 * PAGE]],
        ..good.clone()
    });
    assert!(e.contains("runs past the end"), "{e}");
    let e = refusal(&WorkingSet {
        written: vec![[MEM + PAGE, PAGE]],
        ..good.clone()
    });
    assert!(e.contains("outside guest memory"), "{e}");
    let e = refusal(&WorkingSet {
        written: vec![[100, PAGE]],
        ..good.clone()
    });
    assert!(e.contains("not whole pages"), "{e}");
    let e = refusal(&WorkingSet {
        kiln_working_set: 2,
        ..good.clone()
    });
    assert!(e.contains("format version 2"), "{e}");
    std::fs::write(&path, b"{\"pages\": []}").unwrap();
    let e = WorkingSet::load(&path, SNAP, &mem).unwrap_err().to_string();
    assert!(e.contains("not a working set"), "{e}");
    let missing = path.with_file_name("absent.json");
    let e = WorkingSet::load(&missing, SNAP, &mem)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("absent.json") && e.contains("No such file"),
        "{e}"
    );
    good.save(&path).unwrap();
    assert_eq!(WorkingSet::load(&path, SNAP, &mem).unwrap(), good);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[test]
fn the_pre_fault_request_is_linuxs() {
    // _IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory): read-write, 64 bytes, type 0xae.
    assert_eq!(ioctls::KVM_PRE_FAULT_MEMORY(), 0xc040_aed5);
}
