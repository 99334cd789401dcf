//! The KVM VM: guest memory slots, the in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT, irqfds.

use kvm_bindings::{
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::memory::GuestMemoryMmap;

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// KVM lacks a capability Kiln needs.
    #[error("this host's KVM lacks {0}, which Kiln needs")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("{what} failed: {err}")]
    Ioctl {
        /// The step.
        what: &'static str,
        /// KVM's error.
        err: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Ioctl { what, err }
}

/// A VM file descriptor and the KVM handle that made it.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens /dev/kvm, checks the capabilities Kiln relies on, and creates a VM.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        Ok(Self { kvm, fd })
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// What this host's KVM offers beyond its supported CPUID.
    pub fn host_caps(&self) -> crate::arch::cpuid::HostCaps {
        crate::arch::cpuid::HostCaps {
            tsc_deadline_timer: self.kvm.check_extension(Cap::TscDeadlineTimer),
        }
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers every region of `mem` as a KVM memory slot, in order; with `track_dirty` KVM logs
    /// the pages the guest writes (for diff snapshots).
    pub fn register_memory(&self, mem: &GuestMemoryMmap, track_dirty: bool) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| VmError::Ioctl {
                    what: "finding a guest region's mapping",
                    err: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
            let slot_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: if track_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
            };
            // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned by `mem`,
            // which the VMM keeps alive (in `Vmm`) for as long as the VM exists.
            unsafe { self.fd.set_user_memory_region(slot_region) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Places KVM's TSS and identity-map pages in the MMIO gap and creates the irqchip and PIT.
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        self.fd
            .create_irq_chip()
            .map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        // A dummy speaker port so the guest's PC-speaker pokes do not exit to userspace.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        Ok(())
    }

    /// The pages the guest wrote in each slot since the last call (KVM clears its log as it is
    /// read); one bit per 4 KiB page, 64 pages a word. Needs `track_dirty` at registration.
    pub fn dirty_log(&self, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, VmError> {
        mem.iter()
            .enumerate()
            .map(|(slot, region)| {
                self.fd
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(ioctl("KVM_GET_DIRTY_LOG"))
            })
            .collect()
    }

    /// A reader of KVM's dirty log for `mem`'s slots (registered with `track_dirty`), for the
    /// free-page record ([`crate::memory::free_pages`]), which lives beside this `Vm` and not in
    /// it: it reads through its own duplicate of the VM descriptor.
    pub fn dirty_log_reader(
        &self,
        mem: &GuestMemoryMmap,
    ) -> Result<crate::memory::free_pages::DirtyLog, VmError> {
        use std::os::fd::AsRawFd;
        // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor this VM owns; the result is checked.
        let fd = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(VmError::Ioctl {
                what: "duplicating the VM descriptor",
                err: kvm_ioctls::Error::last(),
            });
        }
        // SAFETY: `fd` is a fresh duplicate of a KVM VM descriptor, owned by nothing else.
        let vm = unsafe { self.kvm.create_vmfd_from_rawfd(fd) }
            .map_err(ioctl("KVM_GET_VCPU_MMAP_SIZE"))?;
        let sizes: Vec<usize> = mem.iter().map(|r| r.len() as usize).collect();
        Ok(Box::new(move || {
            sizes
                .iter()
                .enumerate()
                .map(|(slot, &len)| {
                    vm.get_dirty_log(slot as u32, len)
                        .map_err(|e| format!("KVM_GET_DIRTY_LOG of slot {slot}: {e}"))
                })
                .collect()
        }))
    }

    /// Makes writes to `evt` raise guest interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(ioctl("KVM_IRQFD"))
    }
}
