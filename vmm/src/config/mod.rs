//! The VM's configuration: typed values, how they are parsed from the command line or from a
//! Firecracker-shaped JSON file, and the checks that span fields.
//!
//! Parsing turns text into these types and rejects unknown keys; [`VmConfig::validate`] then checks
//! the rules that need more than one field or the filesystem (the kernel exists and is a kernel, it
//! fits in memory, ...). Every error names the value at fault.

mod cli;
mod file;
mod validate;

use std::path::PathBuf;

use serde::Deserialize;

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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
}

/// Firecracker's `boot-source` object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// A file to write the console to (created or truncated); stdout when absent.
    #[serde(default)]
    pub serial_out_path: Option<PathBuf>,
}
