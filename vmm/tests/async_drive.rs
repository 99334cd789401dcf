//! A drive with `io_engine: "Async"` (io_uring) on the host's /dev/kvm, under the real seccomp
//! filters: a tiny guest keeps 64 to 96 reads of 4 MiB outstanding; every finished read returns
//! the disk's bytes with status OK, `GET /vm/config` shows the engine, a snapshot taken while
//! reads are in flight loses none of them, and a new process restores it (the engine comes from
//! the saved configuration) and serves the guest's reads from another disk.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    ApiVmm, FLOOD_READ, Program, Stream, pause_and_look, scratch, tiny_kernel, wait_for_reads_of,
    write,
};

const LIMIT: Duration = Duration::from_secs(30);

fn start_vmm(dir: &Path, name: &str) -> ApiVmm {
    ApiVmm::options().stderr(Stream::Inherit).start(dir, name)
}

#[test]
fn an_async_drive_serves_a_flood_of_reads_and_survives_a_snapshot() {
    let dir = scratch("async-drive");
    let kernel = write(&dir, "flood.elf", &tiny_kernel(Program::BlkFlood, false));
    let disk = write(&dir, "disk.img", &vec![0x5au8; FLOOD_READ as usize]);

    let first = start_vmm(&dir, "first");
    first.success(
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display()),
    );
    first.success(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 32}"#,
    );
    first.success(
        "PUT",
        "/drives/data",
        &format!(
            r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "io_engine": "Async"}}"#,
            disk.display()
        ),
    );
    first.success("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let config = first.success("GET", "/vm/config", "");
    assert!(config.contains(r#""io_engine":"Async""#), "{config}");
    std::thread::sleep(Duration::from_millis(300));
    let (state, mem, served) = pause_and_look(&first, &dir, "first");
    assert!(served.used >= 64, "the device served {} reads", served.used);
    assert!(
        served.statuses.iter().all(|&s| s == 0),
        "{:?}",
        served.statuses
    );
    assert!(
        served.buffer.iter().all(|&b| b == 0x5a),
        "reads return the disk's bytes"
    );
    drop(first);

    // The clone reads another disk of the same size; once a round of reads has finished after
    // the restore, the buffer holds its bytes.
    let other = write(&dir, "other.img", &vec![0xc3u8; FLOOD_READ as usize]);
    let clone = start_vmm(&dir, "clone");
    clone.success(
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true, "drive_overrides": [{{"drive_id": "data", "path_on_host": "{}"}}]}}"#,
            state.display(),
            mem.display(),
            other.display()
        ),
    );
    let config = clone.success("GET", "/vm/config", "");
    assert!(config.contains(r#""io_engine":"Async""#), "{config}");
    let served = wait_for_reads_of(
        &clone,
        &dir,
        0xc3,
        LIMIT,
        "the restored guest never read the other disk's bytes",
    );
    assert!(
        served.statuses.iter().all(|&s| s == 0),
        "{:?}",
        served.statuses
    );
    assert!(
        std::fs::read(&disk).unwrap().iter().all(|&b| b == 0x5a),
        "reads write nothing"
    );
}
