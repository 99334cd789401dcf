//! One vCPU: its boot configuration (CPUID, MSRs, registers, FPU, LAPIC) and the thread that runs it.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use super::exit::{ExitReason, ExitSignal, IoBuses, VcpuAction, handle_exit};
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
        mem: &GuestMemoryMmap,
        entry: &BootEntry,
    ) -> Result<(), VcpuError> {
        let vcpu = self.id;
        let filtered = cpuid::filter(supported.as_slice(), host, vcpu, vcpu_count);
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

    /// Starts the thread that runs this vCPU until the VM stops.
    pub fn start(
        self,
        io: Arc<IoBuses>,
        signal: Arc<ExitSignal>,
    ) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("kiln_vcpu{}", self.id))
            .spawn(move || self.run(&io, &signal))
    }

    fn run(mut self, io: &IoBuses, signal: &ExitSignal) {
        let vcpu = self.id;
        while !signal.is_stopping() {
            let action = match self.fd.run() {
                Ok(exit) => handle_exit(exit, io, vcpu),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    VcpuAction::Continue
                }
                Err(e) => {
                    VcpuAction::Stop(ExitReason::Vmm(format!("vCPU {vcpu}: KVM_RUN failed: {e}")))
                }
            };
            if let VcpuAction::Stop(reason) = action {
                signal.request(self.describe(reason));
                return;
            }
        }
    }

    /// Adds the guest's RIP and KVM's sub-error to an internal error, which KVM reports bare.
    fn describe(&mut self, reason: ExitReason) -> ExitReason {
        let ExitReason::InternalError { vcpu, .. } = reason else {
            return reason;
        };
        let suberror = self.fd.get_kvm_run().exit_reason;
        // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit the `internal` member of the run union is valid.
        let sub = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let rip = self
            .fd
            .get_regs()
            .map(|r| format!("{:#x}", r.rip))
            .unwrap_or_else(|_| "unknown".into());
        let what = match sub {
            1 => "emulation failure",
            2 => "simultaneous exceptions",
            3 => "delivery event",
            _ => "unknown",
        };
        ExitReason::InternalError {
            vcpu,
            detail: format!("{what} (exit {suberror}, suberror {sub}) at guest RIP {rip}"),
        }
    }
}
