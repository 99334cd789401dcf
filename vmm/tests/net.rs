//! Network interfaces on the host: a missing TAP is refused by name, and with real TAPs (in a
//! network namespace of the test's own, so nothing touches the host's interfaces) the API
//! attaches an interface, reports it, changes its rate limiters after boot, refuses what cannot
//! change, and a snapshot restores onto another TAP through `network_overrides`. The frames
//! themselves are tested in the device's unit tests and in the lab with Linux guests.

mod common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use common::{ApiVmm, Program, kiln_vmm, scratch, tiny_kernel, write};

#[test]
fn a_missing_tap_is_refused_by_name() {
    let dir = scratch("net-missing");
    let kernel = write(&dir, "tiny.elf", &tiny_kernel(Program::Hello, false));
    let out = kiln_vmm(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--net",
            "id=eth0,tap=kiln-nope0",
        ],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "network interface eth0: TAP kiln-nope0 does not exist in this network namespace"
        ),
        "{err}"
    );
    let out = kiln_vmm(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--net",
            "id=eth0,tap=t0,mac=01:02:03:04:05:06",
        ],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("guest_mac 01:02:03:04:05:06 is a multicast address"),
        "{err}"
    );
}

/// Moves the calling thread into a new network namespace holding persistent TAPs `names`; they
/// go away with the namespace once the thread and the processes it starts are gone.
fn netns_with_taps(names: &[&str]) {
    // SAFETY: geteuid has no arguments and no failure.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this test makes TAPs in a network namespace of its own: run it as root (CAP_NET_ADMIN)"
    );
    // A file table of its own too: a TAP's creating descriptor that a child forked by another
    // test copied would still hold the TAP when the VMM attaches it (EBUSY).
    // SAFETY: unshare with constant flags; it affects only this thread's network namespace and
    // file table.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_FILES) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET | CLONE_FILES): {}",
        std::io::Error::last_os_error()
    );
    for name in names {
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("open /dev/net/tun");
        // SAFETY: ifreq is plain data; all-zero is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads the valid ifreq; TUNSETPERSIST takes an int by value.
        unsafe {
            assert_eq!(
                libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &req),
                0,
                "TUNSETIFF {name}"
            );
            assert_eq!(
                libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1),
                0,
                "TUNSETPERSIST {name}"
            );
        }
    }
}

#[test]
fn interfaces_are_configured_patched_snapshotted_and_moved_to_another_tap() {
    netns_with_taps(&["kt0", "kt1"]);
    let dir = scratch("net-api");
    let kernel = write(&dir, "counter.elf", &tiny_kernel(Program::Counter, true));
    let metrics = dir.join("metrics.json");
    let vmm = ApiVmm::options()
        .arg("--metrics-path")
        .arg(&metrics)
        .start(&dir, "boot");
    vmm.ok(
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display()),
    );
    vmm.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 32}"#,
    );
    assert!(
        vmm.fault(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "kt0", "guest_mac": "zz:00:00:00:00:00"}"#
        )
        .contains("guest_mac \"zz:00:00:00:00:00\" is not a MAC address")
    );
    vmm.ok(
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "kt0", "guest_mac": "06:00:ac:10:00:02",
            "tx_rate_limiter": {"bandwidth": {"size": 1000000, "refill_time": 100}}}"#,
    );
    assert!(
        vmm.fault(
            "PUT",
            "/network-interfaces/eth1",
            r#"{"iface_id": "eth1", "host_dev_name": "kt0"}"#
        )
        .contains("host_dev_name kt0 is used by interface eth0")
    );
    assert!(
        vmm.fault(
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "rx_rate_limiter": {}}"#
        )
        .contains("before boot, PUT the interface again")
    );
    vmm.ok(
        "PUT",
        "/mmds/config",
        r#"{"version": "V2", "network_interfaces": ["eth0"], "ipv4_address": "169.254.170.2"}"#,
    );
    vmm.ok("PUT", "/mmds", r#"{"latest": {"sandbox": "original"}}"#);
    vmm.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);

    // The metrics file has Firecracker's `net` group, and one for the interface.
    vmm.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    for group in ["net", "net_eth0"] {
        for key in ["rx_packets_count", "tx_bytes_count", "tx_malformed_frames"] {
            assert!(line[group][key].is_u64(), "{group}.{key} in {line}");
        }
    }
    let cfg = vmm.json("/vm/config");
    let eth0 = &cfg["network-interfaces"][0];
    assert_eq!(eth0["host_dev_name"], "kt0");
    assert_eq!(eth0["tx_rate_limiter"]["bandwidth"]["size"], 1_000_000);
    vmm.ok(
        "PATCH",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 100, "refill_time": 1000}},
            "tx_rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}}"#,
    );
    let cfg = vmm.json("/vm/config");
    let eth0 = &cfg["network-interfaces"][0];
    assert_eq!(eth0["rx_rate_limiter"]["ops"]["size"], 100);
    assert!(
        eth0.get("tx_rate_limiter").is_none(),
        "the limit was lifted: {eth0}"
    );
    assert_eq!(
        vmm.fault(
            "PATCH",
            "/network-interfaces/eth9",
            r#"{"iface_id": "eth9", "rx_rate_limiter": {}}"#
        ),
        "network-interfaces/eth9: no such network interface"
    );
    assert!(
        vmm.fault(
            "PUT",
            "/network-interfaces/eth1",
            r#"{"iface_id": "eth1", "host_dev_name": "kt1"}"#
        )
        .contains("cannot be changed after the instance started")
    );

    vmm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (state, mem) = (dir.join("s.state"), dir.join("s.mem"));
    vmm.ok(
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            mem.display()
        ),
    );
    let load = |overrides: &str| {
        format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}},
                "resume_vm": true, "network_overrides": [{overrides}]}}"#,
            state.display(),
            mem.display()
        )
    };

    // The original still holds kt0: a clone must be moved to its own TAP.
    let clone = ApiVmm::start(&dir, "clone-a");
    let f = clone.fault("PUT", "/snapshot/load", &load(""));
    assert!(
        f.contains("cannot attach TAP kt0") && f.contains("pass network_overrides"),
        "{f}"
    );
    drop(clone);
    let clone = ApiVmm::start(&dir, "clone-b");
    let f = clone.fault(
        "PUT",
        "/snapshot/load",
        &load(r#"{"iface_id": "eth7", "host_dev_name": "kt1"}"#),
    );
    assert!(
        f.contains("the snapshot has no network interface \"eth7\" (it has [\"eth0\"])"),
        "{f}"
    );
    drop(clone);
    let mut clone = ApiVmm::start(&dir, "clone-c");
    clone.ok(
        "PUT",
        "/snapshot/load",
        &load(r#"{"iface_id": "eth0", "host_dev_name": "kt1"}"#),
    );
    let cfg = clone.json("/vm/config");
    let eth0 = &cfg["network-interfaces"][0];
    assert_eq!(eth0["host_dev_name"], "kt1");
    assert_eq!(eth0["guest_mac"], "06:00:ac:10:00:02");
    assert_eq!(
        eth0["rx_rate_limiter"]["ops"]["size"], 100,
        "the patched limiter is in the snapshot"
    );
    let (code, info) = clone.call("GET", "/", "");
    assert_eq!(code, 200);
    assert!(info.contains("\"Running\""), "{info}");
    // The MMDS's configuration comes back with the VM, its data does not (as with Firecracker).
    let mmds = &cfg["mmds-config"];
    assert_eq!(mmds["version"], "V2", "{cfg}");
    assert_eq!(mmds["network_interfaces"][0], "eth0", "{cfg}");
    assert_eq!(mmds["ipv4_address"], "169.254.170.2", "{cfg}");
    let (code, body) = clone.call("GET", "/mmds", "");
    assert_eq!(code, 404, "the data store is not in the snapshot: {body}");
    clone.ok("PUT", "/mmds", r#"{"latest": {"sandbox": "clone"}}"#);
    assert_eq!(clone.json("/mmds")["latest"]["sandbox"], "clone");
    clone.kill();
    let err = clone.stderr();
    assert!(!err.contains("panicked"), "{err}");
    drop(vmm);
}
