//! The configuration as `GET /vm/config` shows it, in Firecracker's full shape. The VMM's
//! configuration is made of the API's own types (`kiln-api`), so this only assembles them.

use kiln_api::requests::instance::FullVmConfig;

use crate::config::{
    BalloonConfig, BootSourceConfig, DriveConfig, MachineConfig, NetworkInterfaceConfig, VmConfig,
    VsockConfig,
};
use crate::instance::Instance;

/// The whole configuration so far (before `InstanceStart` the boot source may be missing).
pub fn full(
    instance: &Instance,
    boot: Option<&BootSourceConfig>,
    machine: &MachineConfig,
    drives: &[DriveConfig],
    vsock: Option<&VsockConfig>,
    nets: &[NetworkInterfaceConfig],
    balloon: Option<&BalloonConfig>,
) -> FullVmConfig {
    FullVmConfig {
        boot_source: boot.cloned(),
        machine_config: Some(machine.clone()),
        drives: drives.to_vec(),
        vsock: vsock.cloned(),
        network_interfaces: nets.to_vec(),
        balloon: balloon.cloned(),
        logger: instance.logger.clone(),
        metrics: instance.metrics_config.clone(),
        mmds_config: instance.mmds_config.clone(),
        ..FullVmConfig::default()
    }
}

/// `GET /vm/config` of a running VM.
pub fn full_of(instance: &Instance, config: &VmConfig) -> FullVmConfig {
    full(
        instance,
        Some(&config.boot_source),
        &config.machine,
        &config.drives,
        config.vsock.as_ref(),
        &config.network_interfaces,
        config.balloon.as_ref(),
    )
}
