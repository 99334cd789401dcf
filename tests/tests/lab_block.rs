//! virtio-blk end to end, inside the nested lab: the guest writes and re-reads a drive and the host
//! checks the image, with each I/O engine (Sync, and Async on an io_uring); a read-only drive refuses writes even when the guest forces its own read-only
//! flag off; the guest sees the drive id.

use std::path::PathBuf;
use std::time::Duration;

use kiln_tests::{INIT_MARKER, file_sha256, kiln_vmm_boot, run_watching};

const LIMIT: Duration = Duration::from_secs(180);

/// A fresh disk image of `mib` MiB filled with `byte`.
fn disk(name: &str, mib: usize, byte: u8) -> PathBuf {
    let path = std::env::temp_dir().join(format!("kiln-lab-{}-{name}.img", std::process::id()));
    std::fs::write(&path, vec![byte; mib << 20]).expect("write disk image");
    path
}

/// Boots with one extra drive and runs `script` in the guest; returns the guest's output.
fn run_with_drive(drive: &str, script: &str) -> String {
    let mut cmd = kiln_vmm_boot(1, 256, &format!("KILN_RUN=\"{script}\""));
    cmd.args(["--drive", drive]);
    let run = run_watching(cmd, INIT_MARKER, LIMIT).expect("kiln-vmm runs");
    let context = format!("stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(
        !run.timed_out,
        "kiln-vmm still running after {LIMIT:?}\n{context}"
    );
    assert_eq!(run.status.code(), Some(0), "{context}");
    assert!(
        run.stdout.contains("KILN-RUN-EXIT 0"),
        "the guest script failed\n{context}"
    );
    run.stdout
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} line in:\n{out}"))
}

/// The guest fills a 64 MiB drive on `engine` with random bytes, syncs, drops its caches and
/// reads it all back; what it read must be what the host's image holds.
fn write_64_mib_and_compare(engine: &str) {
    let img = disk(&format!("rw-{engine}"), 64, 0);
    let out = run_with_drive(
        &format!("id=data,path={},engine={engine}", img.display()),
        "echo sectors=$(cat /sys/block/vda/size); \
         dd if=/dev/urandom of=/dev/vda bs=1M count=64 2>/dev/null; sync; \
         echo 3 > /proc/sys/vm/drop_caches; \
         echo guest-sha=$(dd if=/dev/vda bs=1M 2>/dev/null | sha256sum)",
    );
    assert_eq!(field(&out, "sectors="), "131072");
    let guest = field(&out, "guest-sha=")
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        guest,
        file_sha256(&img),
        "{engine}: what the guest read back is what the host image holds"
    );
    assert_ne!(
        guest,
        file_sha256(&disk("zeros", 64, 0)),
        "{engine}: the guest really wrote"
    );
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn guest_writes_64_mib_and_the_host_reads_the_same_bytes() {
    write_64_mib_and_compare("Sync");
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn guest_writes_64_mib_through_io_uring_and_the_host_reads_the_same_bytes() {
    write_64_mib_and_compare("Async");
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn a_read_only_drive_refuses_writes() {
    let img = disk("ro", 8, 0x5a);
    let before = file_sha256(&img);
    let out = run_with_drive(
        &format!("id=golden,path={},ro", img.display()),
        "echo ro-flag=$(cat /sys/block/vda/ro); blockdev --setrw /dev/vda; \
         if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; \
         then echo write=accepted; else echo write=refused; fi",
    );
    assert_eq!(
        field(&out, "ro-flag="),
        "1",
        "the guest sees VIRTIO_BLK_F_RO"
    );
    assert_eq!(field(&out, "write="), "refused", "the device answers IOERR");
    assert_eq!(file_sha256(&img), before, "the image is unchanged");
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn the_guest_reads_the_drive_id() {
    let img = disk("id", 1, 0);
    let out = run_with_drive(
        &format!("id=scratch-01,path={}", img.display()),
        "echo serial=$(cat /sys/block/vda/serial)",
    );
    assert_eq!(field(&out, "serial="), "scratch-01");
}
