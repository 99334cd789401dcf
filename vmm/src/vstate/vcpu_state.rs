//! A vCPU's full state for snapshots: what KVM_GET_* returns, saved in the order Firecracker uses
//! and put back in an order where each step sees what it depends on (CPUID first, so MSRs and
//! XSAVE are checked against the guest's features; MP state before events).

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, Msrs, kvm_debugregs, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::vcpu::VcpuError;

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the guest saw.
    pub cpuid: CpuId,
    /// Every MSR KVM lists as saveable that this vCPU could read.
    pub msrs: Msrs,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Running, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The guest's TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

fn ioctl(vcpu: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |err| VcpuError::Ioctl { vcpu, what, err }
}

/// The MSRs KVM says a VMM should save.
pub fn saveable_msrs(kvm: &Kvm) -> Result<Vec<u32>, kvm_ioctls::Error> {
    Ok(kvm.get_msr_index_list()?.as_slice().to_vec())
}

/// Reads `indices`, leaving out any this vCPU refuses (KVM stops at the first MSR it cannot
/// read; that one is skipped and the rest read on).
fn read_msrs(fd: &VcpuFd, vcpu: u8, indices: &[u32]) -> Result<Msrs, VcpuError> {
    let mut read = Vec::with_capacity(indices.len());
    let mut pos = 0;
    while pos < indices.len() {
        let chunk = &indices[pos..(pos + KVM_MAX_MSR_ENTRIES).min(indices.len())];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|err| VcpuError::Fam {
            vcpu,
            what: "MSR",
            err,
        })?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(ioctl(vcpu, "KVM_GET_MSRS"))?;
        read.extend_from_slice(&msrs.as_slice()[..n]);
        if n < chunk.len() {
            log::debug!(
                "vCPU {vcpu}: MSR {:#x} is not readable; not saved",
                chunk[n]
            );
            pos += n + 1;
        } else {
            pos += n;
        }
    }
    Msrs::from_entries(&read).map_err(|err| VcpuError::Fam {
        vcpu,
        what: "MSR",
        err,
    })
}

/// Saves vCPU `vcpu`'s state. The vCPU must not be running, and any I/O it exited for must be
/// complete (see `VcpuThread::complete_pending_io`).
pub fn save(fd: &VcpuFd, vcpu: u8, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
    let mp_state = fd.get_mp_state().map_err(ioctl(vcpu, "KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(ioctl(vcpu, "KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(ioctl(vcpu, "KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(ioctl(vcpu, "KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(ioctl(vcpu, "KVM_GET_XCRS"))?;
    let debug_regs = fd
        .get_debug_regs()
        .map_err(ioctl(vcpu, "KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(ioctl(vcpu, "KVM_GET_LAPIC"))?;
    let msrs = read_msrs(fd, vcpu, msr_indices)?;
    let events = fd
        .get_vcpu_events()
        .map_err(ioctl(vcpu, "KVM_GET_VCPU_EVENTS"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl(vcpu, "KVM_GET_CPUID2"))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    Ok(VcpuState {
        cpuid,
        msrs,
        regs,
        sregs,
        xsave,
        xcrs,
        lapic,
        mp_state,
        events,
        debug_regs,
        tsc_khz,
    })
}

/// Puts `state` into a freshly created vCPU.
pub fn restore(fd: &VcpuFd, vcpu: u8, state: &VcpuState) -> Result<(), VcpuError> {
    if let Some(khz) = state.tsc_khz
        && fd.get_tsc_khz().ok() != Some(khz)
    {
        fd.set_tsc_khz(khz).map_err(ioctl(
            vcpu,
            "KVM_SET_TSC_KHZ (the snapshot's TSC frequency)",
        ))?;
    }
    fd.set_cpuid2(&state.cpuid)
        .map_err(ioctl(vcpu, "KVM_SET_CPUID2"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(ioctl(vcpu, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs)
        .map_err(ioctl(vcpu, "KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs)
        .map_err(ioctl(vcpu, "KVM_SET_SREGS"))?;
    // SAFETY: the buffer is a kvm_xsave read from KVM_GET_XSAVE (the legacy 4 KiB form, which is
    // all KVM_SET_XSAVE reads).
    unsafe { fd.set_xsave(&state.xsave) }.map_err(ioctl(vcpu, "KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs)
        .map_err(ioctl(vcpu, "KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(ioctl(vcpu, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic)
        .map_err(ioctl(vcpu, "KVM_SET_LAPIC"))?;
    let set = fd
        .set_msrs(&state.msrs)
        .map_err(ioctl(vcpu, "KVM_SET_MSRS"))?;
    let wanted = state.msrs.as_slice();
    if set != wanted.len() {
        return Err(VcpuError::Msr {
            vcpu,
            index: wanted[set].index,
            set,
            wanted: wanted.len(),
        });
    }
    fd.set_vcpu_events(&state.events)
        .map_err(ioctl(vcpu, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}
