//! Checks that span fields or touch the filesystem, run after parsing and before any KVM work.

use std::path::PathBuf;

use super::{MAX_MEM_MIB, MAX_VCPUS, VmConfig};
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
    /// SMT was asked for.
    #[error("machine-config.smt is true, but Kiln gives every vCPU its own core; set it to false")]
    Smt,
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
}

/// Room the kernel needs above its image for early page tables, the decompressor's heap and its
/// first allocations; a guest with less does not get to init anyway.
const BOOT_HEADROOM: u64 = 8 << 20;

impl VmConfig {
    /// Checks everything that can be checked before building the VM.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let m = &self.machine;
        if m.vcpu_count == 0 || m.vcpu_count > MAX_VCPUS {
            return Err(ValidationError::VcpuCount(m.vcpu_count));
        }
        if m.mem_size_mib == 0 || m.mem_size_mib > MAX_MEM_MIB {
            return Err(ValidationError::MemSize(m.mem_size_mib));
        }
        if m.smt {
            return Err(ValidationError::Smt);
        }
        let args = self.boot_source.boot_args();
        if args.len() >= CMDLINE_MAX_SIZE {
            return Err(ValidationError::BootArgs(format!(
                "{} bytes long; Linux takes at most {}",
                args.len(),
                CMDLINE_MAX_SIZE - 1
            )));
        }
        if args.contains('\0') {
            return Err(ValidationError::BootArgs("holding a NUL byte".into()));
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

        if let Some(path) = &self.serial.serial_out_path {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BootSourceConfig, MachineConfig, SerialConfig};
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
            machine: MachineConfig::default(),
            serial: SerialConfig::default(),
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
        assert!(
            err(|c| c.machine.mem_size_mib = 0).starts_with("machine-config.mem_size_mib is 0;")
        );
        assert!(err(|c| c.machine.smt = true).starts_with("machine-config.smt is true"));
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
        let e = err(|c| c.serial.serial_out_path = Some("/nonexistent/dir/console.log".into()));
        assert_eq!(
            e,
            "serial output /nonexistent/dir/console.log: its directory does not exist"
        );
    }
}
