//! The MMDS as a guest sees it, inside the nested lab: a Linux guest with a NIC on a TAP (in a
//! namespace of its own) and `mmds/config` naming that NIC, with no route of its own for
//! 169.254.169.254 (its default route takes it), and MMDS V2, asks for a session token (`PUT /latest/api/token`) and reads the metadata the
//! host put with `PUT /mmds`, then a value the host changed with `PATCH /mmds` while it ran; a
//! request without a token is refused (401). Nothing of it reaches the TAP. A snapshot of it,
//! restored in a new kiln-vmm, serves the MMDS again on the same NIC (its configuration comes
//! back with the VM; its data is what the new process is given, as with Firecracker).

use std::time::{Duration, Instant};

use kiln_net::addr::TAP_NAME;
use kiln_tests::nic::Nic;
use kiln_tests::{
    ApiVmm, ScratchDir, TailOnFailure, guest_kernel, kiln_vmm, rootfs, sh, snapshot_create_body,
    snapshot_load_body,
};
use serde_json::json;

const AGENT_WAIT: Duration = Duration::from_secs(120);

/// The guest's fetch of `path` with a V2 token (or none): python3's urllib, as the rootfs has it.
fn fetch_script(path: &str, with_token: bool) -> String {
    let token = if with_token {
        "t = urllib.request.urlopen(urllib.request.Request(b + '/latest/api/token', method='PUT', headers={'X-metadata-token-ttl-seconds': '60'})).read().decode(); h = {'X-metadata-token': t, 'Accept': 'application/json'}"
    } else {
        "h = {'Accept': 'application/json'}"
    };
    format!(
        "python3 -c \"import urllib.request, urllib.error
b = 'http://169.254.169.254'
{token}
try:
    print(urllib.request.urlopen(urllib.request.Request(b + '{path}', headers=h), timeout=10).read().decode())
except urllib.error.HTTPError as e:
    print('status', e.code)\""
    )
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn a_guest_reads_its_metadata_with_a_v2_token_over_its_nic() {
    let dir = ScratchDir::new("mmds");
    let path = |name: &str| dir.path().join(name);
    let nic = Nic::new().expect("a TAP in a namespace");
    let mut cmd = kiln_vmm();
    cmd.arg("--serial-out").arg(path("console"));
    let _console = TailOnFailure("the guest's console", path("console"));
    nic.enter_on_spawn(&mut cmd);
    let vm = ApiVmm::start(cmd, &path("api.sock"));
    let boot_args = format!(
        "console=ttyS0 reboot=k panic=1 init=/usr/sbin/kiln-agent KILN_OVERLAY=tmpfs {}",
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
        "/network-interfaces/eth0",
        &json!({"iface_id": "eth0", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": TAP_NAME})
            .to_string(),
    );
    vm.ok(
        "PUT",
        "/mmds/config",
        r#"{"version": "V2", "network_interfaces": ["eth0"]}"#,
    );
    vm.ok(
        "PUT",
        "/mmds",
        r#"{"latest": {"meta-data": {"ami-id": "ami-87654321", "sandbox": "first"}}}"#,
    );
    let uds = path("v.sock");
    vm.ok(
        "PUT",
        "/vsock",
        &json!({"guest_cid": 3, "uds_path": uds}).to_string(),
    );
    vm.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let client = kiln_agent::client::wait_ready(&uds, Instant::now() + AGENT_WAIT)
        .expect("the guest's agent answers");

    // No route of its own for the MMDS address (the rootfs has no `ip`): the default route
    // takes it to the gateway's MAC, and the NIC's MMDS answers all the same.
    let ami = sh(&client, &fetch_script("/latest/meta-data/ami-id", true));
    assert_eq!(ami.trim(), "\"ami-87654321\"");
    let refused = sh(&client, &fetch_script("/latest/meta-data/ami-id", false));
    assert_eq!(refused.trim(), "status 401", "V2 wants a token");

    vm.ok(
        "PATCH",
        "/mmds",
        r#"{"latest": {"meta-data": {"sandbox": "patched"}}}"#,
    );
    let patched = sh(&client, &fetch_script("/latest/meta-data/sandbox", true));
    assert_eq!(
        patched.trim(),
        "\"patched\"",
        "the guest sees the host's change"
    );

    // Snapshot, end the VM (the TAP is free again), restore it in a new process.
    drop(client);
    vm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (state, mem) = (path("vm.state"), path("vm.mem"));
    vm.ok(
        "PUT",
        "/snapshot/create",
        &snapshot_create_body(&state, &mem, "Full"),
    );
    drop(vm);
    let mut cmd = kiln_vmm();
    cmd.arg("--serial-out").arg(path("restored.console"));
    let _restored_console = TailOnFailure("the restored guest's console", path("restored.console"));
    nic.enter_on_spawn(&mut cmd);
    let restored = ApiVmm::start(cmd, &path("restored.sock"));
    let uds = path("restored.vsock");
    restored.ok(
        "PUT",
        "/snapshot/load",
        &snapshot_load_body(&state, &mem, false, &uds),
    );
    restored.ok(
        "PUT",
        "/mmds",
        r#"{"latest": {"meta-data": {"ami-id": "ami-87654321", "sandbox": "restored"}}}"#,
    );
    let client = kiln_agent::client::wait_ready(&uds, Instant::now() + AGENT_WAIT)
        .expect("the restored guest's agent answers");
    let again = sh(&client, &fetch_script("/latest/meta-data/sandbox", true));
    assert_eq!(
        again.trim(),
        "\"restored\"",
        "the restored NIC answers the MMDS, V2 as configured before the snapshot"
    );
    let refused = sh(&client, &fetch_script("/latest/meta-data/ami-id", false));
    assert_eq!(refused.trim(), "status 401", "still V2 after the restore");
}
