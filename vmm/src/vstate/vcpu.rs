//! One vCPU: its boot configuration (CPUID, MSRs, registers, FPU, LAPIC) and the thread that runs it.

use kvm_bindings::{CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use super::vm::Vm;
use crate::arch::{cpuid, interrupts, msr, regs};
use crate::loader::BootEntry;
use crate::memory::GuestMemoryMmap;

/// Errors configuring a vCPU; each names the vCPU and the step.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {vcpu}: {what} failed: {err}")]
    Ioctl {
        /// The vCPU.
        vcpu: u8,
        /// The step.
        what: &'static str,
        /// KVM's error.
        err: kvm_ioctls::Error,
    },
    /// KVM accepted only some of the boot MSRs.
    #[error("vCPU {vcpu}: KVM refused MSR {index:#x} ({set} of {wanted} boot MSRs set)")]
    Msr {
        /// The vCPU.
        vcpu: u8,
        /// The first MSR not set.
        index: u32,
        /// How many were set.
        set: usize,
        /// How many were asked for.
        wanted: usize,
    },
    /// A CPUID or MSR list could not be built.
    #[error("vCPU {vcpu}: cannot build the {what} list: {err:?}")]
    Fam {
        /// The vCPU.
        vcpu: u8,
        /// Which list.
        what: &'static str,
        /// Why.
        err: vmm_sys_util::fam::Error,
    },
    /// Boot structures could not be written.
    #[error("vCPU {vcpu}: {err}")]
    Boot {
        /// The vCPU.
        vcpu: u8,
        /// Why.
        err: regs::RegsError,
    },
}

/// A created vCPU.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `id` in `vm`.
    pub fn new(vm: &Vm, id: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|err| VcpuError::Ioctl {
                vcpu: id,
                what: "KVM_CREATE_VCPU",
                err,
            })?;
        Ok(Self { id, fd })
    }

    fn ioctl(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let vcpu = self.id;
        move |err| VcpuError::Ioctl { vcpu, what, err }
    }

    /// Sets CPUID (filtered from KVM's `supported` set), MSRs, registers, FPU and LAPIC for boot.
    pub fn configure(
        &self,
        supported: &CpuId,
        host: cpuid::HostCaps,
        vcpu_count: u8,
        smt: bool,
        mem: &GuestMemoryMmap,
        entry: &BootEntry,
    ) -> Result<(), VcpuError> {
        let vcpu = self.id;
        let filtered = cpuid::filter(supported.as_slice(), host, vcpu, vcpu_count, smt);
        let cpuid = CpuId::from_entries(&filtered).map_err(|err| VcpuError::Fam {
            vcpu,
            what: "CPUID",
            err,
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.ioctl("KVM_SET_CPUID2"))?;

        let wanted = msr::boot_msrs();
        let msrs = Msrs::from_entries(&wanted).map_err(|err| VcpuError::Fam {
            vcpu,
            what: "MSR",
            err,
        })?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.ioctl("KVM_SET_MSRS"))?;
        if set != wanted.len() {
            return Err(VcpuError::Msr {
                vcpu,
                index: wanted[set].index,
                set,
                wanted: wanted.len(),
            });
        }

        self.fd
            .set_regs(&regs::boot_regs(entry))
            .map_err(self.ioctl("KVM_SET_REGS"))?;
        let mut sregs = self.fd.get_sregs().map_err(self.ioctl("KVM_GET_SREGS"))?;
        regs::setup_sregs(mem, entry, &mut sregs).map_err(|err| VcpuError::Boot { vcpu, err })?;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.ioctl("KVM_SET_SREGS"))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.ioctl("KVM_SET_FPU"))?;

        let mut lapic = self.fd.get_lapic().map_err(self.ioctl("KVM_GET_LAPIC"))?;
        interrupts::set_lint(&mut lapic);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.ioctl("KVM_SET_LAPIC"))?;
        Ok(())
    }

    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The KVM vCPU descriptor.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Splits the vCPU into its index and descriptor (for the thread that runs it).
    pub(super) fn into_parts(self) -> (u8, VcpuFd) {
        (self.id, self.fd)
    }
}
