//! Between the API's JSON bodies (`kiln-api`) and the VMM's configuration types.

use kiln_api::requests::boot_source::BootSource;
use kiln_api::requests::drives::{CacheType, Drive, IoEngine};
use kiln_api::requests::instance::FullVmConfig;
use kiln_api::requests::machine_config::MachineConfig as ApiMachine;
use kiln_api::requests::vsock::Vsock;

use crate::config::{BootSourceConfig, DriveConfig, MachineConfig, VmConfig, VsockConfig};

pub fn boot_source(b: BootSource) -> BootSourceConfig {
    BootSourceConfig {
        kernel_image_path: b.kernel_image_path,
        initrd_path: b.initrd_path,
        boot_args: b.boot_args,
    }
}

pub fn machine(m: ApiMachine) -> MachineConfig {
    MachineConfig {
        vcpu_count: m.vcpu_count,
        mem_size_mib: m.mem_size_mib,
        smt: m.smt,
        track_dirty_pages: m.track_dirty_pages,
    }
}

pub fn api_machine(m: &MachineConfig) -> ApiMachine {
    ApiMachine {
        vcpu_count: m.vcpu_count,
        mem_size_mib: m.mem_size_mib,
        smt: m.smt,
        track_dirty_pages: m.track_dirty_pages,
    }
}

pub fn drive(d: Drive) -> DriveConfig {
    DriveConfig {
        drive_id: d.drive_id,
        path_on_host: d.path_on_host,
        is_root_device: d.is_root_device,
        is_read_only: d.is_read_only,
        partuuid: d.partuuid,
        cache_type: d.cache_type.map(|c| format!("{c:?}")),
        io_engine: d.io_engine.map(|e| format!("{e:?}")),
    }
}

fn api_drive(d: &DriveConfig) -> Drive {
    Drive {
        drive_id: d.drive_id.clone(),
        path_on_host: d.path_on_host.clone(),
        is_root_device: d.is_root_device,
        is_read_only: d.is_read_only,
        partuuid: d.partuuid.clone(),
        cache_type: d.cache_type.as_deref().map(|c| {
            if c == "Writeback" {
                CacheType::Writeback
            } else {
                CacheType::Unsafe
            }
        }),
        io_engine: d.io_engine.as_deref().map(|e| {
            if e == "Async" {
                IoEngine::Async
            } else {
                IoEngine::Sync
            }
        }),
    }
}

pub fn vsock(v: Vsock) -> VsockConfig {
    VsockConfig {
        guest_cid: u64::from(v.guest_cid),
        uds_path: v.uds_path,
        vsock_id: v.vsock_id,
    }
}

fn api_vsock(v: &VsockConfig) -> Vsock {
    Vsock {
        guest_cid: v.guest_cid as u32,
        uds_path: v.uds_path.clone(),
        vsock_id: v.vsock_id.clone(),
    }
}

/// The whole configuration as `GET /vm/config` shows it.
pub fn full(
    boot: Option<&BootSourceConfig>,
    machine: &MachineConfig,
    drives: &[DriveConfig],
    vsock: Option<&VsockConfig>,
) -> FullVmConfig {
    FullVmConfig {
        boot_source: boot.map(|b| BootSource {
            kernel_image_path: b.kernel_image_path.clone(),
            boot_args: b.boot_args.clone(),
            initrd_path: b.initrd_path.clone(),
        }),
        machine_config: Some(api_machine(machine)),
        drives: drives.iter().map(api_drive).collect(),
        vsock: vsock.map(api_vsock),
    }
}

/// `GET /vm/config` of a running VM.
pub fn full_of(config: &VmConfig) -> FullVmConfig {
    full(
        Some(&config.boot_source),
        &config.machine,
        &config.drives,
        config.vsock.as_ref(),
    )
}
