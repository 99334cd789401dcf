//! Firecracker's getting-started guide, replayed against kiln-vmm inside the nested lab: the
//! same requests in the same order (logger, metrics, boot source, root drive, a network
//! interface on a TAP, InstanceStart), then the operations its API docs show on a running VM
//! (describe, config, pause, snapshot, resume, flush metrics, Ctrl-Alt-Del). The guide logs in
//! over SSH; Kiln's rootfs has the agent instead, so the replay adds a vsock device and the
//! agent's address word on the boot args, and checks from inside the guest that the network the
//! guide set up carries traffic to the host's end of the TAP.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use kiln_net::addr::{GATEWAY_IP, TAP_NAME};
use kiln_tests::nic::Nic;
use kiln_tests::{ApiVmm, ScratchDir, TailOnFailure, guest_kernel, kiln_vmm, rootfs, sh};
use serde_json::{Value, json};

const AGENT_WAIT: Duration = Duration::from_secs(120);

fn get(vm: &ApiVmm, path: &str) -> Value {
    let (code, body) = vm.call("GET", path, None);
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn firecrackers_getting_started_sequence_boots_and_the_api_examples_answer() {
    let dir = ScratchDir::new("getting-started");
    let path = |name: &str| dir.path().join(name);
    let nic = Nic::new().expect("a TAP in a namespace");
    let mut cmd = kiln_vmm();
    cmd.arg("--serial-out").arg(path("console"));
    let _console = TailOnFailure("the guest's console", path("console"));
    let _log = TailOnFailure("kiln-vmm's log", path("firecracker.log"));
    nic.enter_on_spawn(&mut cmd);
    let vm = ApiVmm::start(cmd, &path("firecracker.socket"));

    // The guide's requests, in its order.
    vm.ok(
        "PUT",
        "/logger",
        &json!({"log_path": path("firecracker.log"), "level": "Debug",
                "show_level": true, "show_log_origin": true})
        .to_string(),
    );
    vm.ok(
        "PUT",
        "/metrics",
        &json!({"metrics_path": path("metrics.json")}).to_string(),
    );
    // The guide's boot args, plus what stands in for its SSH login: the agent as init over a
    // tmpfs overlay (the image is shared, so read-only) and its address for eth0.
    let boot_args = format!(
        "console=ttyS0 reboot=k panic=1 pci=off init=/usr/sbin/kiln-agent KILN_OVERLAY=tmpfs {}",
        kiln_net::addr::guest_net_spec().to_cmdline()
    );
    vm.ok(
        "PUT",
        "/boot-source",
        &json!({"kernel_image_path": guest_kernel(), "boot_args": boot_args}).to_string(),
    );
    vm.ok(
        "PUT",
        "/drives/rootfs",
        &json!({"drive_id": "rootfs", "path_on_host": rootfs(),
                "is_root_device": true, "is_read_only": true})
        .to_string(),
    );
    vm.ok(
        "PUT",
        "/network-interfaces/net1",
        &json!({"iface_id": "net1", "guest_mac": "06:00:AC:10:00:02",
                "host_dev_name": TAP_NAME})
        .to_string(),
    );
    let uds = path("v.sock");
    vm.ok(
        "PUT",
        "/vsock",
        &json!({"guest_cid": 3, "uds_path": uds}).to_string(),
    );
    // The guide waits 15 ms for the configuration to settle before starting.
    std::thread::sleep(Duration::from_millis(15));
    vm.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);

    let client = kiln_agent::client::wait_ready(&uds, Instant::now() + AGENT_WAIT)
        .expect("the guest's agent answers");
    assert!(
        sh(&client, "cat /proc/cmdline").contains(&boot_args),
        "the guest booted with the boot args it was given"
    );

    // The guide's network: the guest at 172.16.0.2 reaches the host's end of the TAP.
    let listener = nic
        .ns
        .run(|| TcpListener::bind((GATEWAY_IP, 8000)))
        .unwrap()
        .expect("listen on the TAP's address");
    sh(
        &client,
        // bash's /dev/tcp (the rootfs's sh is dash, which has none).
        &format!("bash -c 'echo hello-from-the-guest > /dev/tcp/{GATEWAY_IP}/8000'"),
    );
    let (conn, from) = listener.accept().expect("the guest connects");
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).unwrap();
    assert_eq!(line, "hello-from-the-guest\n");
    assert_eq!(from.ip().to_string(), "172.16.0.2");

    // The API docs' operations on a running VM.
    let info = get(&vm, "/");
    assert_eq!(info["state"], "Running", "{info}");
    let config = get(&vm, "/vm/config");
    assert_eq!(config["drives"][0]["drive_id"], "rootfs", "{config}");
    assert_eq!(
        config["network-interfaces"][0]["iface_id"], "net1",
        "{config}"
    );
    assert_eq!(
        config["network-interfaces"][0]["host_dev_name"], TAP_NAME,
        "{config}"
    );
    assert_eq!(config["machine-config"]["mem_size_mib"], 128, "{config}");
    vm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(get(&vm, "/")["state"], "Paused");
    vm.ok(
        "PUT",
        "/snapshot/create",
        &json!({"snapshot_type": "Full", "snapshot_path": path("snap.state"),
                "mem_file_path": path("snap.mem")})
        .to_string(),
    );
    vm.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    // As in Firecracker, creating a snapshot resets the guest's vsock connections (the guest is
    // sent VIRTIO_VSOCK_EVENT_TRANSPORT_RESET): the old one is gone, a new one reaches the agent
    // of the resumed VM.
    assert!(
        client.ping().is_err(),
        "a vsock connection survived a snapshot"
    );
    drop(client);
    let client = kiln_agent::client::wait_ready(&uds, Instant::now() + AGENT_WAIT)
        .expect("the resumed guest's agent answers a new connection");
    assert_eq!(sh(&client, "echo still here"), "still here\n");
    vm.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let metrics = std::fs::read_to_string(path("metrics.json")).expect("the metrics file");
    let last: Value = serde_json::from_str(metrics.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("metrics line: {e}: {metrics}"));
    assert!(last.get("api_server").is_some(), "{last}");
    let log = std::fs::read_to_string(path("firecracker.log")).expect("the log file");
    // show_level and show_log_origin: `[instance:thread:LEVEL:file.rs:line]`.
    assert!(
        log.lines()
            .any(|l| (l.contains(":DEBUG:") || l.contains(":INFO:")) && l.contains(".rs:")),
        "{log}"
    );
    assert!(std::fs::metadata(path("snap.mem")).unwrap().len() >= 128 << 20);

    vm.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let end = vm.finish(Duration::from_secs(60));
    assert!(!end.timed_out, "kiln-vmm still ran after Ctrl-Alt-Del");
    assert!(end.status.success(), "kiln-vmm ended with {}", end.status);
}
