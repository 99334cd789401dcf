//! kiln-vmm driven over its API socket, as a Firecracker client would: configure, start, query and
//! get refusals with fault messages, on the host's /dev/kvm with a tiny guest that waits for
//! console input (so it is still running while the API is asked about it).

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Program, scratch, tiny_kernel, write};
use kiln_api::client::request;

const LIMIT: Duration = Duration::from_secs(60);

fn wait_for_socket(path: &std::path::Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < LIMIT, "the API socket never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_vm_is_configured_started_and_queried_over_the_api() {
    let dir = scratch("api");
    let kernel = write(&dir, "echo.elf", &tiny_kernel(Program::Echo3, false));
    let sock = dir.join("api.sock");
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_kiln-vmm"))
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln-vmm");
    wait_for_socket(&sock);
    let call = |method: &str, path: &str, body: Option<&str>| {
        request(&sock, method, path, body).expect("API call")
    };

    let (code, info) = call("GET", "/", None);
    assert_eq!(code, 200);
    assert!(info.contains("\"state\":\"Not started\""), "{info}");

    let (code, fault) = call(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#),
    );
    assert_eq!(code, 400);
    assert!(
        fault.contains("/nonexistent/vmlinux"),
        "the fault names the path: {fault}"
    );
    let (code, fault) = call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 0, "mem_size_mib": 32}"#),
    );
    assert_eq!(code, 400);
    assert!(fault.contains("vcpu_count is 0"), "{fault}");
    let (code, fault) = call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(code, 400);
    assert!(fault.contains("boot-source is not set"), "{fault}");

    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
    assert_eq!(call("PUT", "/boot-source", Some(&boot)).0, 204);
    assert_eq!(
        call(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 48}"#)
        )
        .0,
        204
    );
    let (code, config) = call("GET", "/vm/config", None);
    assert_eq!(code, 200);
    assert!(
        config.contains("\"mem_size_mib\":48") && config.contains("echo.elf"),
        "{config}"
    );
    assert_eq!(
        call(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        )
        .0,
        204
    );

    let (code, info) = call("GET", "/", None);
    assert_eq!(code, 200);
    assert!(info.contains("\"state\":\"Running\""), "{info}");
    let (code, fault) = call("PUT", "/boot-source", Some(&boot));
    assert_eq!(code, 400);
    assert!(
        fault.contains("boot-source cannot be changed after the instance started"),
        "{fault}"
    );
    let (code, fault) = call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(code, 400);
    assert!(fault.contains("already running"), "{fault}");

    // The guest echoes three bytes of console input and resets: kiln-vmm exits 0.
    vmm.stdin.take().unwrap().write_all(b"xyz").unwrap();
    let start = Instant::now();
    while vmm.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < LIMIT, "the guest never finished");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut out = String::new();
    vmm.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert_eq!(out, "xyz");
    assert_eq!(vmm.wait().unwrap().code(), Some(0));
}

#[test]
fn ctrl_alt_del_reaches_the_guest_keyboard() {
    let dir = scratch("api-cad");
    let kernel = write(&dir, "keys.elf", &tiny_kernel(Program::Keys, false));
    let sock = dir.join("api.sock");
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_kiln-vmm"))
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln-vmm");
    wait_for_socket(&sock);
    let call = |method: &str, path: &str, body: &str| {
        request(&sock, method, path, Some(body)).expect("API call")
    };
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    let (code, fault) = call("PUT", "/actions", cad);
    assert_eq!(code, 400);
    assert!(fault.contains("has not started"), "{fault}");
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    assert_eq!(call("PUT", "/boot-source", &boot).0, 204);
    let machine = r#"{"vcpu_count": 1, "mem_size_mib": 32}"#;
    assert_eq!(call("PUT", "/machine-config", machine).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call("PUT", "/actions", start).0, 204);
    let (code, text) = call("PUT", "/actions", cad);
    assert_eq!(code, 204, "{text}");

    // The guest copies the scan codes to its console and resets: kiln-vmm exits 0.
    let started = Instant::now();
    while vmm.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < LIMIT, "the guest never saw the keys");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut out = Vec::new();
    vmm.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    let mut err = String::new();
    vmm.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(
        out,
        [
            0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14
        ],
        "Ctrl, Alt, Delete down then up, in scan code set 2; stderr: {err}"
    );
    assert_eq!(vmm.wait().unwrap().code(), Some(0));
}

#[test]
fn an_existing_socket_path_is_refused() {
    let dir = scratch("api-exists");
    let sock = write(&dir, "taken.sock", b"");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-vmm"))
        .arg("--api-sock")
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&sock.display().to_string()), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
