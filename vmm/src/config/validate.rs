//! Checks that span fields or touch the filesystem, run after parsing and before any KVM work.

use std::path::PathBuf;

use kiln_api::requests::drives::IoEngine;
use kiln_api::requests::machine_config::{CpuTemplate, HugePages};

use super::{
    BalloonConfig, DriveConfig, MAX_MEM_MIB, MAX_VCPUS, MachineConfig, SerialConfig, VmConfig,
};
use crate::arch::layout::CMDLINE_MAX_SIZE;
use crate::loader::{LoaderError, inspect_kernel};
use crate::memory::low_ram_end;

/// A configuration that parses but cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    /// vcpu_count is out of range.
    #[error("machine-config.vcpu_count is {0}; it must be between 1 and {MAX_VCPUS}")]
    VcpuCount(u8),
    /// mem_size_mib is out of range.
    #[error("machine-config.mem_size_mib is {0}; it must be between 1 and {MAX_MEM_MIB}")]
    MemSize(usize),
    /// SMT with an odd number of vCPUs, which cannot pair up as the threads of cores.
    #[error(
        "machine-config.smt is true with vcpu_count {0}: with two threads a core, vcpu_count must be 1 or even"
    )]
    SmtOddCount(u8),
    /// 2 MiB pages need memory in whole pages.
    #[error("machine-config.mem_size_mib {0} is not a multiple of 2, as huge_pages \"2M\" needs")]
    HugePageMultiple(usize),
    /// A static CPU template other than None.
    #[error(
        "machine-config.cpu_template {0:?}: Kiln has no CPU templates; its vCPUs see the host's CPU as KVM supports it (use \"None\")"
    )]
    CpuTemplate(CpuTemplate),
    /// A Firecracker device Kiln does not have, in a config file.
    #[error("{key}: Kiln has no {what}: it offers only block, vsock, net and balloon devices")]
    NotInKiln {
        /// The config file key.
        key: &'static str,
        /// The device.
        what: &'static str,
    },
    /// The kernel is missing, unreadable or not a kernel.
    #[error("{0}")]
    Kernel(#[from] LoaderError),
    /// The initrd is missing or unreadable.
    #[error("initrd {path}: {err}")]
    Initrd {
        /// The initrd path.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// Kernel and initrd do not fit in the guest's memory.
    #[error(
        "machine-config.mem_size_mib {mem_mib} is too small for kernel {kernel}: it needs at least {need_mib} MiB"
    )]
    TooSmall {
        /// Configured memory.
        mem_mib: usize,
        /// The kernel path.
        kernel: PathBuf,
        /// Memory needed for kernel and initrd.
        need_mib: u64,
    },
    /// The command line is too long or holds a NUL.
    #[error("boot-source.boot_args is {0}")]
    BootArgs(String),
    /// The serial output file cannot be created there.
    #[error("serial output {0}: its directory does not exist")]
    SerialOut(PathBuf),
    /// A drive's settings are wrong.
    #[error("drives[{index}] ({id:?}): {what}")]
    Drive {
        /// Position in the drives list.
        index: usize,
        /// Its drive_id.
        id: String,
        /// What is wrong.
        what: String,
    },
    /// The vsock settings are wrong.
    #[error("vsock: {0}")]
    Vsock(String),
    /// A network interface's settings are wrong.
    #[error("network-interfaces[{index}] ({id:?}): {what}")]
    NetworkInterface {
        /// Position in the list.
        index: usize,
        /// Its iface_id.
        id: String,
        /// What is wrong.
        what: String,
    },
    /// The balloon settings are wrong.
    #[error("balloon: {0}")]
    Balloon(String),
    /// More devices than interrupt lines.
    #[error("{0} virtio devices configured; Kiln has interrupt lines for {MAX_VIRTIO_DEVICES}")]
    TooManyDevices(usize),
}

/// Virtio-mmio devices a VM can have (IOAPIC pins 5 to 23).
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// Room the kernel needs above its image for early page tables, the decompressor's heap and its
/// first allocations; a guest with less does not get to init anyway.
const BOOT_HEADROOM: u64 = 8 << 20;

impl VmConfig {
    /// Checks everything that can be checked before building the VM.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let m = &self.machine;
        validate_machine(m)?;
        let args = super::boot_args(&self.boot_source);
        if args.len() >= CMDLINE_MAX_SIZE {
            return Err(ValidationError::BootArgs(format!(
                "{} bytes long; Linux takes at most {}",
                args.len(),
                CMDLINE_MAX_SIZE - 1
            )));
        }
        if let Some(c) = args.chars().find(|c| !(' '..='~').contains(c)) {
            return Err(ValidationError::BootArgs(format!(
                "holding {c:?}; the kernel command line takes printable ASCII only"
            )));
        }

        let kernel = &self.boot_source.kernel_image_path;
        let info = inspect_kernel(kernel)?;
        let initrd_size = match &self.boot_source.initrd_path {
            Some(path) => std::fs::metadata(path)
                .and_then(|md| {
                    if md.is_file() {
                        Ok(md.len())
                    } else {
                        Err(std::io::Error::other("not a regular file"))
                    }
                })
                .map_err(|err| ValidationError::Initrd {
                    path: path.clone(),
                    err,
                })?,
            None => 0,
        };
        let need = info
            .end
            .saturating_add(initrd_size)
            .saturating_add(BOOT_HEADROOM);
        let have = low_ram_end((m.mem_size_mib as u64) << 20);
        if need > have {
            return Err(ValidationError::TooSmall {
                mem_mib: m.mem_size_mib,
                kernel: kernel.clone(),
                need_mib: need.div_ceil(1 << 20),
            });
        }

        self.validate_drives()?;
        if let Some(vsock) = &self.vsock {
            validate_vsock(vsock)?;
        }
        self.validate_network_interfaces()?;
        if let Some(balloon) = &self.balloon {
            validate_balloon(balloon, m)?;
        }
        for (given, key, what) in [
            (
                self.entropy.as_ref().is_some_and(|v| !v.is_null()),
                "entropy",
                "entropy device",
            ),
            (!self.pmem.is_empty(), "pmem", "pmem devices"),
            (
                self.memory_hotplug.as_ref().is_some_and(|v| !v.is_null()),
                "memory-hotplug",
                "memory hotplug (virtio-mem)",
            ),
            (
                self.cpu_config.as_ref().is_some_and(|v| !v.is_null()),
                "cpu-config",
                "custom CPU templates",
            ),
        ] {
            if given {
                return Err(ValidationError::NotInKiln { key, what });
            }
        }
        let devices = self.drives.len()
            + usize::from(self.vsock.is_some())
            + self.network_interfaces.len()
            + usize::from(self.balloon.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ValidationError::TooManyDevices(devices));
        }
        validate_serial(&self.serial)
    }
}

/// Checks the balloon against the machine (the API checks it when it is set).
pub fn validate_balloon(b: &BalloonConfig, m: &MachineConfig) -> Result<(), ValidationError> {
    if b.free_page_hinting {
        return Err(ValidationError::Balloon(
            "free_page_hinting is not supported; use free_page_reporting".into(),
        ));
    }
    if b.amount_mib as usize > m.mem_size_mib {
        return Err(ValidationError::Balloon(format!(
            "amount_mib {} is larger than machine-config.mem_size_mib {}",
            b.amount_mib, m.mem_size_mib
        )));
    }
    Ok(())
}

/// Checks the serial console's output file can be created where it is asked for.
pub fn validate_serial(s: &SerialConfig) -> Result<(), ValidationError> {
    if let Some(path) = &s.serial_out_path {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => std::path::Path::new("."),
        };
        if !dir.is_dir() {
            return Err(ValidationError::SerialOut(path.clone()));
        }
    }
    Ok(())
}

/// Checks vCPUs, memory and SMT on their own (the API checks them when they are set).
pub fn validate_machine(m: &MachineConfig) -> Result<(), ValidationError> {
    if m.vcpu_count == 0 || m.vcpu_count > MAX_VCPUS {
        return Err(ValidationError::VcpuCount(m.vcpu_count));
    }
    if m.mem_size_mib == 0 || m.mem_size_mib > MAX_MEM_MIB {
        return Err(ValidationError::MemSize(m.mem_size_mib));
    }
    if m.smt && m.vcpu_count > 1 && !m.vcpu_count.is_multiple_of(2) {
        return Err(ValidationError::SmtOddCount(m.vcpu_count));
    }
    if m.huge_pages == HugePages::Hugetlbfs2M && !m.mem_size_mib.is_multiple_of(2) {
        return Err(ValidationError::HugePageMultiple(m.mem_size_mib));
    }
    if let Some(t) = m.cpu_template.filter(|t| *t != CpuTemplate::None) {
        return Err(ValidationError::CpuTemplate(t));
    }
    Ok(())
}

/// Checks one drive on its own (`PUT /drives` checks it at once; [`VmConfig::validate`] checks
/// each and the rules between them): its id, its file and overlay, its engine and partition
/// UUID.
pub fn validate_drive(d: &DriveConfig) -> Result<(), String> {
    let id_ok = !d.drive_id.is_empty()
        && d.drive_id.len() <= 64
        && d.drive_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !id_ok {
        return Err("drive_id must be 1 to 64 letters, digits, '_' or '-'".into());
    }
    let md = std::fs::metadata(&d.path_on_host)
        .map_err(|e| format!("path_on_host {}: {e}", d.path_on_host.display()))?;
    if md.is_dir() {
        return Err(format!(
            "path_on_host {} is a directory",
            d.path_on_host.display()
        ));
    }
    if let Some(overlay) = &d.cow_overlay_path {
        validate_overlay(d, overlay, md.len())?;
    }
    if d.io_engine == Some(IoEngine::Async) && d.cow_overlay_path.is_some() {
        return Err(kiln_devices::virtio::block::ASYNC_OVERLAY.into());
    }
    if let Some(uuid) = &d.partuuid {
        if !d.is_root_device {
            return Err("partuuid is only meaningful on the root device".into());
        }
        if uuid.is_empty() || !uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(format!("partuuid {uuid:?} is not a partition UUID"));
        }
    }
    Ok(())
}

/// A drive's copy-on-write overlay: writable, an existing regular file other than the base,
/// empty or the base's length (the device extends an empty one).
fn validate_overlay(
    d: &DriveConfig,
    overlay: &std::path::Path,
    base_len: u64,
) -> Result<(), String> {
    if d.is_read_only {
        return Err(format!(
            "is_read_only with cow_overlay_path {}: a drive with an overlay is writable (its base \
             is never written); drop one of them",
            overlay.display()
        ));
    }
    let md = std::fs::metadata(overlay)
        .map_err(|e| format!("cow_overlay_path {}: {e}", overlay.display()))?;
    if !md.is_file() {
        return Err(format!(
            "cow_overlay_path {} is not a regular file",
            overlay.display()
        ));
    }
    let base = std::fs::metadata(&d.path_on_host)
        .map_err(|e| format!("path_on_host {}: {e}", d.path_on_host.display()))?;
    {
        use std::os::unix::fs::MetadataExt;
        if (md.dev(), md.ino()) == (base.dev(), base.ino()) {
            return Err(format!(
                "cow_overlay_path {} is the base path_on_host itself",
                overlay.display()
            ));
        }
    }
    if md.len() != 0 && md.len() != base_len {
        return Err(format!(
            "cow_overlay_path {} is {} bytes but path_on_host {} is {base_len}; an overlay must \
             be empty or the base's length",
            overlay.display(),
            md.len(),
            d.path_on_host.display()
        ));
    }
    Ok(())
}

impl VmConfig {
    fn validate_drives(&self) -> Result<(), ValidationError> {
        let mut roots = 0;
        for (index, d) in self.drives.iter().enumerate() {
            let err = |what: String| ValidationError::Drive {
                index,
                id: d.drive_id.clone(),
                what,
            };
            validate_drive(d).map_err(err)?;
            if self.drives[..index]
                .iter()
                .any(|o| o.drive_id == d.drive_id)
            {
                return Err(err("drive_id is used twice".into()));
            }
            if let Some(overlay) = &d.cow_overlay_path
                && self.drives[..index].iter().any(|o| {
                    o.cow_overlay_path.as_ref() == Some(overlay) || &o.path_on_host == overlay
                })
            {
                return Err(err(format!(
                    "cow_overlay_path {} is another drive's file",
                    overlay.display()
                )));
            }
            if d.is_root_device {
                roots += 1;
                if roots > 1 {
                    return Err(err(
                        "a second root device; only one drive may be the root".into()
                    ));
                }
            }
        }
        Ok(())
    }
}

impl VmConfig {
    fn validate_network_interfaces(&self) -> Result<(), ValidationError> {
        for (index, n) in self.network_interfaces.iter().enumerate() {
            let err = |what: String| ValidationError::NetworkInterface {
                index,
                id: n.iface_id.clone(),
                what,
            };
            super::net::check_interface(n).map_err(err)?;
            let before = &self.network_interfaces[..index];
            if before.iter().any(|o| o.iface_id == n.iface_id) {
                return Err(err("iface_id is used twice".into()));
            }
            if before.iter().any(|o| o.host_dev_name == n.host_dev_name) {
                return Err(err(format!(
                    "host_dev_name {} is used by another interface",
                    n.host_dev_name
                )));
            }
            if let Some(mac) = &n.guest_mac
                && before.iter().any(|o| {
                    o.guest_mac.as_deref().map(str::to_ascii_lowercase)
                        == Some(mac.to_ascii_lowercase())
                })
            {
                return Err(err(format!("guest_mac {mac} is used by another interface")));
            }
        }
        Ok(())
    }
}

/// Checks the vsock device: its CID is not reserved (0 to 2, and `u32::MAX`), its socket path
/// is free and its folder exists.
pub fn validate_vsock(v: &super::VsockConfig) -> Result<(), ValidationError> {
    if v.guest_cid < 3 || v.guest_cid == u32::MAX {
        return Err(ValidationError::Vsock(format!(
            "guest_cid {} is reserved; use 3 to {}",
            v.guest_cid,
            u32::MAX - 1
        )));
    }
    let path = &v.uds_path;
    if path.as_os_str().is_empty() {
        return Err(ValidationError::Vsock("uds_path is empty".into()));
    }
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(ValidationError::Vsock(format!(
            "uds_path {} already exists",
            path.display()
        )));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    if !dir.is_dir() {
        return Err(ValidationError::Vsock(format!(
            "uds_path {}: its directory does not exist",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
