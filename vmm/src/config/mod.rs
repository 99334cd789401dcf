//! The VM's configuration: typed values, how they are parsed from the command line or from a
//! Firecracker-shaped JSON file, and the checks that span fields.
//!
//! Parsing turns text into these types and rejects unknown keys; [`VmConfig::validate`] then checks
//! the rules that need more than one field or the filesystem (the kernel exists and is a kernel, it
//! fits in memory, ...). Every error names the value at fault.

mod cli;
mod device_args;
mod file;
mod validate;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use cli::{Command, USAGE, parse_args};
pub use file::parse_config_file;
pub use validate::ValidationError;

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
}

/// Firecracker's `drives` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Unique id: letters, digits, `_` and `-`; also what GET_ID answers.
    pub drive_id: String,
    /// The backing file.
    pub path_on_host: PathBuf,
    /// Boot from this drive: it becomes /dev/vda and the kernel gets `root=/dev/vda`.
    #[serde(default)]
    pub is_root_device: bool,
    /// Refuse writes.
    #[serde(default)]
    pub is_read_only: bool,
    /// Root partition by PARTUUID instead of the whole disk.
    #[serde(default)]
    pub partuuid: Option<String>,
    /// Firecracker's cache type ("Unsafe" or "Writeback"); Kiln always honours FLUSH.
    #[serde(default)]
    pub cache_type: Option<String>,
    /// Firecracker's I/O engine; Kiln has "Sync".
    #[serde(default)]
    pub io_engine: Option<String>,
}

/// Firecracker's `vsock` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The host-side Unix socket; guest connections to host port P go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
    /// Firecracker's deprecated device id; accepted and ignored.
    #[serde(default)]
    pub vsock_id: Option<String>,
}

/// Firecracker's `boot-source` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    /// Uncompressed ELF vmlinux or bzImage.
    pub kernel_image_path: PathBuf,
    /// Optional initramfs.
    #[serde(default)]
    pub initrd_path: Option<PathBuf>,
    /// Kernel command line; [`DEFAULT_BOOT_ARGS`] when absent.
    #[serde(default)]
    pub boot_args: Option<String>,
}

impl BootSourceConfig {
    /// The command line the guest gets.
    pub fn boot_args(&self) -> &str {
        self.boot_args.as_deref().unwrap_or(DEFAULT_BOOT_ARGS)
    }
}

/// Firecracker's `machine-config` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1 to [`MAX_VCPUS`].
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: usize,
    /// Simultaneous multithreading; Kiln gives each vCPU its own core, so only `false` is accepted.
    #[serde(default)]
    pub smt: bool,
    /// Track dirty pages for diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: DEFAULT_MEM_MIB,
            smt: false,
            track_dirty_pages: false,
        }
    }
}

/// Where the guest's serial console output goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// A file to write the console to (created or truncated); stdout when absent.
    #[serde(default)]
    pub serial_out_path: Option<PathBuf>,
}
