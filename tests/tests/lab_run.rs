//! `kiln run` and the agent end to end, inside the nested lab: a real Kiln VM booted from the Debian
//! rootfs, commands run through the guest agent over vsock, results checked byte for byte.

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_agent::client::{WriteOptions, wait_ready};
use kiln_agent::protocol::{ExecSpec, ExitStatus};
use kiln_tests::{file_sha256, kiln_vmm_rootfs, rootfs};
use sha2::{Digest, Sha256};

/// Runs `kiln run ARGS -- CMD` with `stdin` piped in.
fn kiln_run(args: &[&str], cmd: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new("kiln")
        .arg("run")
        .args(args)
        .arg("--")
        .args(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln");
    let mut input = child.stdin.take().expect("stdin pipe");
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait for kiln");
    let _ = feeder.join();
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn python_prints_42() {
    let out = kiln_run(&[], &["python3", "-c", "print(6*7)"], b"");
    assert_eq!(text(&out.stdout), "42\n", "stderr: {}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn exit_codes_come_back() {
    let out = kiln_run(&[], &["sh", "-c", "echo out; echo err >&2; exit 3"], b"");
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert!(
        text(&out.stderr).contains("err\n"),
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn a_command_past_its_timeout_is_killed_and_reported() {
    let out = kiln_run(
        &["--timeout", "2"],
        &["sh", "-c", "echo started; sleep 60; echo never"],
        b"",
    );
    assert_eq!(
        out.status.code(),
        Some(124),
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "started\n");
    assert!(
        text(&out.stderr).to_lowercase().contains("timed out"),
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn stdin_is_echoed_byte_for_byte() {
    let input: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let out = kiln_run(&[], &["cat"], &input);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(out.stdout.len(), input.len());
    assert_eq!(sha256(&out.stdout), sha256(&input));
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn twenty_mib_of_output_arrives_intact() {
    let script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 81920)";
    let out = kiln_run(&[], &["python3", "-c", script], b"");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let expected: Vec<u8> = (0..81920).flat_map(|_| 0..=255u8).collect();
    assert_eq!(out.stdout.len(), 20 << 20);
    assert_eq!(sha256(&out.stdout), sha256(&expected));
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn json_reports_output_status_and_timings() {
    let out = kiln_run(
        &["--json", "--env", "GREETING=hi"],
        &["sh", "-c", "echo $GREETING; exit 5"],
        b"",
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(v["stdout"], "hi\n");
    assert_eq!(v["exit_code"], 5);
    assert_eq!(v["timed_out"], false);
    assert!(
        v["timings"]["boot_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{v}"
    );
    assert!(v["timings"]["exec_ms"].as_u64().is_some(), "{v}");
    assert_eq!(out.status.code(), Some(5));
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn a_50_mib_file_round_trips_with_matching_checksums() {
    let dir = std::env::temp_dir().join(format!("kiln-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let disk = dir.join("rootfs.ext4");
    std::fs::copy(rootfs(), &disk).expect("copy the rootfs");
    let agent_init = "console=ttyS0 reboot=k panic=-1 quiet init=/usr/sbin/kiln-agent";
    let mut vmm = kiln_vmm_rootfs(&disk, false, &uds, 512, agent_init)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start kiln-vmm");
    let client =
        wait_ready(&uds, Instant::now() + Duration::from_secs(120)).expect("the agent answers");

    let data: Vec<u8> = (0..50u32 << 20).map(|i| (i ^ (i >> 11)) as u8).collect();
    let written = client
        .write_file("/tmp/big/file.bin", &data[..], WriteOptions::default())
        .expect("write");
    assert_eq!(written, data.len() as u64);
    let st = client.stat("/tmp/big/file.bin").expect("stat");
    assert_eq!(st.size, data.len() as u64);
    let guest = client
        .run(ExecSpec::new(["sha256sum", "/tmp/big/file.bin"]))
        .expect("sha256sum runs");
    assert_eq!(guest.status, ExitStatus::Exited(0));
    let guest_sum = text(&guest.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(guest_sum, sha256(&data), "the guest holds the same bytes");
    let mut back = Vec::new();
    let n = client
        .read_file("/tmp/big/file.bin", &mut back)
        .expect("read back");
    assert_eq!(n, data.len() as u64);
    assert_eq!(
        sha256(&back),
        sha256(&data),
        "what comes back is what went in"
    );
    client.remove("/tmp/big", true).expect("remove");
    assert!(client.stat("/tmp/big").is_err(), "removed");

    client.shutdown().expect("shutdown");
    let status = vmm.wait().expect("kiln-vmm exits");
    let mut console = String::new();
    vmm.stdout
        .take()
        .map(|mut o| o.read_to_string(&mut console));
    assert_eq!(status.code(), Some(0), "console:\n{console}");
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn each_run_starts_from_the_image_and_leaves_it_unchanged() {
    let before = file_sha256(&rootfs());
    let first = kiln_run(
        &[],
        &["sh", "-c", "echo mine > /root/marker && cat /root/marker"],
        b"",
    );
    assert_eq!(
        text(&first.stdout),
        "mine\n",
        "the root is writable: {}",
        text(&first.stderr)
    );
    let second = kiln_run(
        &[],
        &[
            "sh",
            "-c",
            "test -e /root/marker && echo leaked || echo clean",
        ],
        b"",
    );
    assert_eq!(
        text(&second.stdout),
        "clean\n",
        "the next run does not see the first run's file"
    );
    assert_eq!(
        file_sha256(&rootfs()),
        before,
        "the rootfs image is unchanged"
    );
}
