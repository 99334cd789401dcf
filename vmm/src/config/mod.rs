//! The VM's configuration: typed values, how they are parsed from the command line or from a
//! Firecracker-shaped JSON file, and the checks that span fields.
//!
//! Parsing turns text into these types and rejects unknown keys; [`VmConfig::validate`] then checks
//! the rules that need more than one field or the filesystem (the kernel exists and is a kernel, it
//! fits in memory, ...). Every error names the value at fault.

mod cli;
mod device_args;
pub mod drive;
mod file;
pub mod net;
pub mod rate_limiter;
mod validate;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use cli::{Command, ProcessOptions, USAGE, parse_args};
pub use file::parse_config_file;
pub use validate::{
    MAX_VIRTIO_DEVICES, ValidationError, validate_balloon, validate_drive, validate_machine,
    validate_serial, validate_vsock,
};

/// Most vCPUs a Kiln VM may have.
pub const MAX_VCPUS: u8 = 32;
/// Guest memory when none is asked for (Firecracker's default too).
pub const DEFAULT_MEM_MIB: usize = 128;
/// Largest guest memory accepted, 1 TiB: beyond any real use here, and far from overflow.
pub const MAX_MEM_MIB: usize = 1 << 20;
/// Kernel command line used when none is given.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1";

/// Everything needed to build a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The kernel, initrd and command line (`boot-source`).
    #[serde(rename = "boot-source")]
    pub boot_source: BootSourceConfig,
    /// vCPUs and memory (`machine-config`).
    #[serde(rename = "machine-config")]
    pub machine: MachineConfig,
    /// Where the serial console goes (`serial`); stdout when absent.
    #[serde(default)]
    pub serial: SerialConfig,
    /// Block devices (`drives`), in the order the guest sees them (the root device is vda).
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// The vsock device (`vsock`), if any.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Network interfaces (`network-interfaces`), in the order the guest sees them (eth0 first).
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
    /// The memory balloon (`balloon`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// The log file (`logger`), as `PUT /logger`.
    #[serde(default)]
    pub logger: Option<kiln_api::requests::logger::Logger>,
    /// The metrics file (`metrics`), as `PUT /metrics`.
    #[serde(default)]
    pub metrics: Option<kiln_api::requests::metrics::Metrics>,
    /// The MMDS configuration (`mmds-config`), as `PUT /mmds/config`.
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<kiln_api::requests::mmds::MmdsConfig>,
    /// Firecracker keys for devices Kiln does not have (`entropy`, `pmem`, `memory-hotplug`,
    /// `cpu-config`): taken when `null` or empty, as `GET /vm/config` writes them, and refused
    /// by name otherwise.
    #[serde(default)]
    pub entropy: Option<serde_json::Value>,
    /// See `entropy`.
    #[serde(default)]
    pub pmem: Vec<serde_json::Value>,
    /// See `entropy`.
    #[serde(rename = "memory-hotplug", default)]
    pub memory_hotplug: Option<serde_json::Value>,
    /// See `entropy`.
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<serde_json::Value>,
}

impl Default for VmConfig {
    /// No kernel yet, [`default_machine`], no devices: the start of a configuration.
    fn default() -> Self {
        Self {
            boot_source: BootSourceConfig {
                kernel_image_path: PathBuf::new(),
                boot_args: None,
                initrd_path: None,
            },
            machine: default_machine(),
            serial: SerialConfig::default(),
            drives: Vec::new(),
            vsock: None,
            network_interfaces: Vec::new(),
            balloon: None,
            logger: None,
            metrics: None,
            mmds_config: None,
            entropy: None,
            pmem: Vec::new(),
            memory_hotplug: None,
            cpu_config: None,
        }
    }
}

/// Firecracker's `balloon` object.
pub use kiln_api::requests::balloon::Balloon as BalloonConfig;
/// Firecracker's `boot-source` object.
pub use kiln_api::requests::boot_source::BootSource as BootSourceConfig;
/// Firecracker's `drives` entry: the API's type, so the config file and `PUT /drives` agree.
pub use kiln_api::requests::drives::Drive as DriveConfig;
/// Firecracker's `machine-config` object.
pub use kiln_api::requests::machine_config::MachineConfig;
/// Firecracker's `network-interfaces` entry: the API's type, so the config file and
/// `PUT /network-interfaces` agree.
pub use kiln_api::requests::network_interfaces::NetworkInterface as NetworkInterfaceConfig;
/// Firecracker's `vsock` object.
pub use kiln_api::requests::vsock::Vsock as VsockConfig;

/// The command line the guest gets: the configured one, or [`DEFAULT_BOOT_ARGS`].
pub fn boot_args(boot: &BootSourceConfig) -> &str {
    boot.boot_args.as_deref().unwrap_or(DEFAULT_BOOT_ARGS)
}

/// A VM with nothing asked for: one vCPU and [`DEFAULT_MEM_MIB`] (Firecracker's defaults too).
pub fn default_machine() -> MachineConfig {
    MachineConfig {
        vcpu_count: 1,
        mem_size_mib: DEFAULT_MEM_MIB,
        smt: false,
        track_dirty_pages: false,
        huge_pages: kiln_api::requests::machine_config::HugePages::None,
        cpu_template: None,
    }
}

/// Where the guest's serial console output goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// A file to write the console to (created or truncated); stdout when absent.
    #[serde(default)]
    pub serial_out_path: Option<PathBuf>,
    /// Bytes of console output per refill period; what is over budget is dropped and counted.
    #[serde(default)]
    pub rate_limiter: Option<kiln_api::requests::rate_limiter::TokenBucket>,
}
