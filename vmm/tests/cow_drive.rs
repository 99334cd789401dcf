//! A copy-on-write drive on the host's /dev/kvm, under the real seccomp filters: a tiny guest
//! keeps reading the first 4 MiB of its disk. Booted over an empty overlay it reads the base's
//! bytes and the overlay stays empty; the snapshot records both files; a new process restores it
//! with `drive_overrides` pointing at another overlay and the guest then reads that overlay's
//! bytes, while the base is never written. Bad overrides are refused by name.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    ApiVmm, FLOOD_READ, Program, Stream, pause_and_look, scratch, tiny_kernel, wait_for_reads_of,
    write,
};

const LIMIT: Duration = Duration::from_secs(30);

/// kiln-vmm serving `dir/NAME.sock`, its log shown as it comes.
fn start_vmm(dir: &Path, name: &str) -> ApiVmm {
    ApiVmm::options().stderr(Stream::Inherit).start(dir, name)
}

fn data_bytes(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    kiln_snapshot::data_ranges(&f, path)
        .unwrap()
        .iter()
        .map(|r| r.end - r.start)
        .sum()
}

#[test]
fn a_restored_cow_drive_reads_through_its_overridden_overlay() {
    let dir = scratch("cow-drive");
    let kernel = write(&dir, "flood.elf", &tiny_kernel(Program::BlkFlood, false));
    let base = write(&dir, "base.img", &vec![0x5au8; FLOOD_READ as usize]);
    let overlay = write(&dir, "overlay.img", &[]);

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
            r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "cow_overlay_path": "{}"}}"#,
            base.display(),
            overlay.display()
        ),
    );
    first.success("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
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
        "reads over an empty overlay return the base"
    );
    assert_eq!(
        std::fs::metadata(&overlay).unwrap().len(),
        u64::from(FLOOD_READ)
    );
    assert_eq!(
        data_bytes(&overlay),
        0,
        "reads write nothing to the overlay"
    );
    drop(first);

    let described = common::kiln_vmm(
        &["--describe-snapshot", state.to_str().unwrap()],
        Duration::from_secs(10),
    );
    let described = String::from_utf8_lossy(&described.stdout).into_owned();
    assert!(
        described.contains(&format!(
            "drive data: {} under overlay {}",
            base.display(),
            overlay.display()
        )),
        "{described}"
    );

    // The clone's own overlay: as if the clone had written all of it.
    let clone_overlay = write(
        &dir,
        "clone-overlay.img",
        &vec![0xc3u8; FLOOD_READ as usize],
    );
    let load = |vmm: &ApiVmm, overrides: &str| {
        vmm.call(
            "PUT",
            "/snapshot/load",
            &format!(
                r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true, "drive_overrides": {overrides}}}"#,
                state.display(),
                mem.display()
            ),
        )
    };
    let bad = start_vmm(&dir, "bad");
    let (code, text) = load(
        &bad,
        r#"[{"drive_id": "rootfs", "cow_overlay_path": "/x"}]"#,
    );
    assert_eq!(code, 400, "{text}");
    assert!(
        text.contains("the snapshot has no drive \\\"rootfs\\\""),
        "{text}"
    );
    let short = write(&dir, "short.img", &[1u8; 4096]);
    let (code, text) = load(
        &bad,
        &format!(
            r#"[{{"drive_id": "data", "cow_overlay_path": "{}"}}]"#,
            short.display()
        ),
    );
    assert_eq!(code, 400, "{text}");
    assert!(
        text.contains("short.img is 4096 bytes but the base"),
        "{text}"
    );
    drop(bad);

    let clone = start_vmm(&dir, "clone");
    let (code, text) = load(
        &clone,
        &format!(
            r#"[{{"drive_id": "data", "cow_overlay_path": "{}"}}]"#,
            clone_overlay.display()
        ),
    );
    assert_eq!(code, 204, "{text}");
    let config = clone.success("GET", "/vm/config", "");
    assert!(
        config.contains(&format!(
            r#""cow_overlay_path":"{}""#,
            clone_overlay.display()
        )),
        "{config}"
    );
    // The guest re-reads the same 4 MiB forever; once it has served another round of reads
    // after the restore, its buffer holds what the overlay holds.
    let served = wait_for_reads_of(
        &clone,
        &dir,
        0xc3,
        LIMIT,
        "the restored guest never read the override's bytes",
    );
    assert!(
        served.statuses.iter().all(|&s| s == 0),
        "{:?}",
        served.statuses
    );
    assert!(
        std::fs::read(&base).unwrap().iter().all(|&b| b == 0x5a),
        "the base is never written"
    );
    assert_eq!(
        data_bytes(&overlay),
        0,
        "the first VM's overlay is untouched"
    );
}
