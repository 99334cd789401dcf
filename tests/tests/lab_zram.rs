//! zram swap in the guest, inside the nested lab: the agent sets it up before the first command
//! runs, and it lets a 256 MiB guest hold a 320 MiB compressible working set that, without zram,
//! gets the process OOM-killed.

use std::process::{Command, Output};

/// Runs `kiln run ARGS -- CMD` (stdin closed).
fn kiln_run(args: &[&str], cmd: &[&str]) -> Output {
    Command::new("kiln")
        .arg("run")
        .args(args)
        .arg("--")
        .args(cmd)
        .output()
        .expect("run kiln")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn zram_is_swapped_to_before_the_first_command() {
    let out = kiln_run(
        &["--mem-mib", "256"],
        &[
            "sh",
            "-c",
            "cat /proc/swaps; cat /proc/sys/vm/swappiness /proc/sys/vm/page-cluster \
             /sys/block/zram0/comp_algorithm /sys/block/zram0/disksize",
        ],
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    let swap = lines
        .iter()
        .find(|l| l.starts_with("/dev/zram0"))
        .unwrap_or_else(|| panic!("no zram0 in /proc/swaps:\n{stdout}"));
    eprintln!("{swap}");
    assert!(lines.contains(&"100"), "swappiness 100:\n{stdout}");
    assert!(lines.contains(&"0"), "page-cluster 0:\n{stdout}");
    assert!(stdout.contains("[lz4]"), "lz4 compression:\n{stdout}");
    // Half of MemTotal by default, in whole pages.
    let disksize: u64 = lines.last().unwrap().parse().unwrap();
    assert!(
        (100 << 20..=128 << 20).contains(&disksize),
        "zram of {disksize} bytes for a 256 MiB guest"
    );

    let out = kiln_run(
        &["--mem-mib", "256", "--zram", "off"],
        &["cat", "/proc/swaps"],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(
        !text(&out.stdout).contains("zram0"),
        "{}",
        text(&out.stdout)
    );
    let out = kiln_run(
        &["--mem-mib", "256", "--zram", "64M"],
        &["cat", "/sys/block/zram0/disksize"],
    );
    assert_eq!(text(&out.stdout).trim(), (64u64 << 20).to_string());
}

/// Python holding 320 MiB of compressible pages (each page is bytes 0..255 sixteen times with
/// its index in front: lz4 shrinks it, and no page is one repeated word, which zram would store
/// for free), then writing and checking every page twice more, so the whole set is used, not just
/// written once.
const WORKING_SET: &str = "
pattern = bytes(range(256)) * 16
chunks = []
for i in range(320):
    b = bytearray(pattern * 256)
    for p in range(0, len(b), 4096):
        b[p:p + 8] = (i * 256 + p // 4096).to_bytes(8, 'little')
    chunks.append(b)
for round in range(2):
    for i, b in enumerate(chunks):
        for p in range(0, len(b), 4096):
            assert int.from_bytes(b[p:p + 8], 'little') == i * 256 + p // 4096
            b[p + 8] = round
print('held', len(chunks), 'MiB')
";

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn zram_holds_a_working_set_larger_than_memory() {
    let with = kiln_run(
        &["--mem-mib", "256", "--timeout", "900"],
        &["python3", "-c", WORKING_SET],
    );
    assert_eq!(
        (with.status.code(), text(&with.stdout).trim()),
        (Some(0), "held 320 MiB"),
        "with zram: {}",
        text(&with.stderr)
    );
    let without = kiln_run(
        &["--mem-mib", "256", "--zram", "off", "--timeout", "900"],
        &["python3", "-c", WORKING_SET],
    );
    // SIGKILL from the OOM killer: kiln run exits 128 + 9.
    assert_eq!(
        without.status.code(),
        Some(137),
        "without zram: {}{}",
        text(&without.stdout),
        text(&without.stderr)
    );
}
