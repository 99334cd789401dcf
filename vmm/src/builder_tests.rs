//! Tests of the VM builder's pure parts.

use super::*;
use crate::config::{BootSourceConfig, DriveConfig, SerialConfig};

fn config(args: &str, root: Option<bool>) -> VmConfig {
    VmConfig {
        boot_source: BootSourceConfig {
            kernel_image_path: "/k".into(),
            initrd_path: None,
            boot_args: Some(args.into()),
        },
        machine: crate::config::default_machine(),
        serial: SerialConfig::default(),
        drives: root
            .map(|ro| DriveConfig {
                drive_id: "rootfs".into(),
                path_on_host: "/r".into(),
                is_root_device: true,
                is_read_only: ro,
                cow_overlay_path: None,
                partuuid: None,
                cache_type: None,
                io_engine: None,
                rate_limiter: None,
            })
            .into_iter()
            .collect(),
        ..VmConfig::default()
    }
}

#[test]
fn root_and_devices_are_appended_before_init_arguments() {
    let mut devices = MmioDeviceManager::default();
    assert_eq!(
        guest_cmdline(&config("console=ttyS0", None), &devices),
        "console=ttyS0"
    );
    devices.add_cmdline_for_test("virtio_mmio.device=4K@0xd0000000:5");
    assert_eq!(
        guest_cmdline(
            &config("console=ttyS0 init=/bin/sh -- -c \"echo hi\"", Some(true)),
            &devices
        ),
        "console=ttyS0 init=/bin/sh root=/dev/vda ro virtio_mmio.device=4K@0xd0000000:5 -- -c \"echo hi\""
    );
    assert_eq!(
        guest_cmdline(&config("-- arg", Some(false)), &devices),
        "root=/dev/vda rw virtio_mmio.device=4K@0xd0000000:5 -- arg"
    );
}
