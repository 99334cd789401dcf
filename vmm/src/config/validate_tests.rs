//! Tests of the configuration checks: each refusal names the field and the value.

use super::*;
use crate::config::{BootSourceConfig, SerialConfig};
use std::io::Write;

/// A file that passes for an x86_64 ELF kernel loaded at 16 MiB, 4 MiB long; a new file per
/// call, since tests run in parallel.
fn fake_kernel() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kiln-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("vmlinux-{n}"));
    let mut b = vec![0u8; 64 + 56];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[0x12] = 62;
    b[0x20] = 64;
    b[0x36] = 56;
    b[0x38] = 1;
    b[64] = 1; // PT_LOAD
    b[64 + 0x18..64 + 0x20].copy_from_slice(&0x100_0000u64.to_le_bytes());
    b[64 + 0x28..64 + 0x30].copy_from_slice(&0x40_0000u64.to_le_bytes());
    std::fs::File::create(&path).unwrap().write_all(&b).unwrap();
    path
}

fn config() -> VmConfig {
    VmConfig {
        boot_source: BootSourceConfig {
            kernel_image_path: fake_kernel(),
            initrd_path: None,
            boot_args: None,
        },
        machine: crate::config::default_machine(),
        serial: SerialConfig::default(),
        drives: Vec::new(),
        vsock: None,
        ..VmConfig::default()
    }
}

impl VmConfig {
    fn boot_args_for_test(&mut self, args: &str) {
        self.boot_source.boot_args = Some(args.into());
    }
}

fn err(f: impl FnOnce(&mut VmConfig)) -> String {
    let mut c = config();
    f(&mut c);
    c.validate().unwrap_err().to_string()
}

#[test]
fn a_sound_config_passes() {
    config().validate().unwrap();
}

#[test]
fn each_bad_value_is_named() {
    assert_eq!(
        err(|c| c.machine.vcpu_count = 0),
        "machine-config.vcpu_count is 0; it must be between 1 and 32"
    );
    assert_eq!(
        err(|c| c.machine.vcpu_count = 33),
        "machine-config.vcpu_count is 33; it must be between 1 and 32"
    );
    assert!(err(|c| c.machine.mem_size_mib = 0).starts_with("machine-config.mem_size_mib is 0;"));
    assert_eq!(
        err(|c| {
            c.machine.smt = true;
            c.machine.vcpu_count = 3;
        }),
        "machine-config.smt is true with vcpu_count 3: with two threads a core, vcpu_count must be 1 or even"
    );
    for n in [1, 2, 4] {
        let mut c = config();
        c.machine.smt = true;
        c.machine.vcpu_count = n;
        assert!(c.validate().is_ok(), "smt with {n} vCPUs");
    }
    let e = err(|c| c.machine.mem_size_mib = 16);
    assert!(
        e.starts_with("machine-config.mem_size_mib 16 is too small for kernel "),
        "{e}"
    );
    assert!(e.ends_with("it needs at least 28 MiB"), "{e}");
    let e = err(|c| c.boot_source.initrd_path = Some("/nonexistent/initrd".into()));
    assert!(e.starts_with("initrd /nonexistent/initrd: "), "{e}");
    let e = err(|c| c.boot_source.initrd_path = Some(std::env::temp_dir()));
    assert!(e.ends_with("not a regular file"), "{e}");
    let e = err(|c| c.boot_source.kernel_image_path = "/nonexistent/vmlinux".into());
    assert!(e.starts_with("kernel image /nonexistent/vmlinux: "), "{e}");
    let e = err(|c| c.boot_source.boot_args = Some("a".repeat(3000)));
    assert_eq!(
        e,
        "boot-source.boot_args is 3000 bytes long; Linux takes at most 2047"
    );
    let e = err(|c| c.boot_args_for_test("console=ttyS0\ninit=/x"));
    assert_eq!(
        e,
        "boot-source.boot_args is holding '\\n'; the kernel command line takes printable ASCII only"
    );
    let e = err(|c| c.serial.serial_out_path = Some("/nonexistent/dir/console.log".into()));
    assert_eq!(
        e,
        "serial output /nonexistent/dir/console.log: its directory does not exist"
    );
}

#[test]
fn balloon_mistakes_are_named() {
    let balloon = |amount_mib, free_page_hinting| crate::config::BalloonConfig {
        amount_mib,
        deflate_on_oom: true,
        stats_polling_interval_s: 0,
        free_page_hinting,
        free_page_reporting: true,
    };
    let mut c = config();
    c.balloon = Some(balloon(128, false));
    c.validate().unwrap();
    c.balloon = Some(balloon(129, false));
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "balloon: amount_mib 129 is larger than machine-config.mem_size_mib 128"
    );
    c.balloon = Some(balloon(0, true));
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "balloon: free_page_hinting is not supported; use free_page_reporting"
    );
}

#[test]
fn drive_mistakes_are_named() {
    let disk = fake_kernel(); // any existing file will do as a disk
    let drive = |id: &str, root: bool| crate::config::DriveConfig {
        drive_id: id.into(),
        path_on_host: disk.clone(),
        is_root_device: root,
        is_read_only: false,
        cow_overlay_path: None,
        partuuid: None,
        cache_type: None,
        io_engine: None,
        rate_limiter: None,
    };
    let mut c = config();
    c.drives = vec![drive("rootfs", true), drive("data", false)];
    c.validate().unwrap();
    c.drives = vec![drive("rootfs", true), drive("rootfs", false)];
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "drives[1] (\"rootfs\"): drive_id is used twice"
    );
    c.drives = vec![drive("a", true), drive("b", true)];
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("a second root device")
    );
    c.drives = vec![drive("bad id", false)];
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("drive_id must be")
    );
    let mut missing = drive("x", false);
    missing.path_on_host = "/nonexistent/disk.img".into();
    c.drives = vec![missing];
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "drives[0] (\"x\"): path_on_host /nonexistent/disk.img: No such file or directory (os error 2)"
    );
    let overlay = std::env::temp_dir().join(format!("kiln-ovl-{}", std::process::id()));
    std::fs::write(&overlay, [0u8; 3]).unwrap();
    let mut cow = drive("x", true);
    cow.cow_overlay_path = Some(overlay.clone());
    c.drives = vec![cow.clone()];
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.starts_with("drives[0] (\"x\"): cow_overlay_path ")
            && e.contains(" is 3 bytes but path_on_host "),
        "{e}"
    );
    std::fs::write(&overlay, []).unwrap();
    c.validate().unwrap();
    cow.is_read_only = true;
    c.drives = vec![cow.clone()];
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("is_read_only with cow_overlay_path"),
    );
    cow.is_read_only = false;
    let mut other = cow.clone();
    other.drive_id = "y".into();
    other.is_root_device = false;
    c.drives = vec![cow.clone(), other];
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("is another drive's file"),
    );
    cow.cow_overlay_path = Some(cow.path_on_host.clone());
    c.drives = vec![cow];
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("is the base path_on_host itself"),
    );
    let mut engine = drive("x", false);
    engine.io_engine = Some(IoEngine::Async);
    c.drives = vec![engine.clone()];
    assert!(c.validate().is_ok(), "io_engine Async is taken");
    engine.cow_overlay_path = Some(overlay.clone());
    c.drives = vec![engine];
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("io_engine Async cannot be used with a cow_overlay_path")
    );
    std::fs::remove_file(&overlay).unwrap();
    c.drives = (0..20).map(|i| drive(&format!("d{i}"), false)).collect();
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .starts_with("20 virtio devices")
    );
}

#[test]
fn vsock_mistakes_are_named() {
    let dir = std::env::temp_dir();
    let v = |cid: u32, uds: PathBuf| crate::config::VsockConfig {
        guest_cid: cid,
        uds_path: uds,
        vsock_id: None,
    };
    let mut c = config();
    c.vsock = Some(v(
        3,
        dir.join(format!("kiln-v-{}.sock", std::process::id())),
    ));
    c.validate().unwrap();
    c.vsock = Some(v(2, dir.join("x.sock")));
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .starts_with("vsock: guest_cid 2 is reserved")
    );
    c.vsock = Some(v(3, fake_kernel()));
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .ends_with("already exists")
    );
    c.vsock = Some(v(3, "/nonexistent/dir/v.sock".into()));
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .ends_with("its directory does not exist")
    );
}

#[test]
fn network_interface_mistakes_are_named() {
    let n = |id: &str, tap: &str, mac: Option<&str>| crate::config::NetworkInterfaceConfig {
        iface_id: id.into(),
        host_dev_name: tap.into(),
        guest_mac: mac.map(str::to_string),
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    };
    let mut c = config();
    c.network_interfaces = vec![
        n("eth0", "tap0", Some("06:00:ac:10:00:02")),
        n("eth1", "tap1", None),
    ];
    c.validate().unwrap();
    let err = |c: &VmConfig| c.validate().unwrap_err().to_string();
    c.network_interfaces[1] = n("eth0", "tap1", None);
    assert_eq!(
        err(&c),
        "network-interfaces[1] (\"eth0\"): iface_id is used twice"
    );
    c.network_interfaces[1] = n("eth1", "tap0", None);
    assert_eq!(
        err(&c),
        "network-interfaces[1] (\"eth1\"): host_dev_name tap0 is used by another interface"
    );
    c.network_interfaces[1] = n("eth1", "tap1", Some("06:00:AC:10:00:02"));
    assert_eq!(
        err(&c),
        "network-interfaces[1] (\"eth1\"): guest_mac 06:00:AC:10:00:02 is used by another interface"
    );
    c.network_interfaces[1] = n("eth1", "tap/1", None);
    assert!(err(&c).contains("host_dev_name \"tap/1\" is not an interface name"));
    c.network_interfaces = (0..20)
        .map(|i| n(&format!("e{i}"), &format!("t{i}"), None))
        .collect();
    assert!(err(&c).starts_with("20 virtio devices configured"));
}
