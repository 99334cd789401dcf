//! The VM-wide state KVM holds: the two PICs, the IOAPIC, the PIT and the kvmclock. Saved for
//! snapshots; the clock alone is also kept across a pause so the guest does not see the paused
//! time pass.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip,
    kvm_pit_state2,
};
use serde::{Deserialize, Serialize};

use super::vm::{Vm, VmError};

/// The in-kernel devices' state.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// The kvmclock.
    pub clock: kvm_clock_data,
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Ioctl { what, err }
}

impl Vm {
    fn irqchip(&self, chip_id: u32) -> Result<kvm_irqchip, VmError> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.fd()
            .get_irqchip(&mut chip)
            .map_err(ioctl("KVM_GET_IRQCHIP"))?;
        Ok(chip)
    }

    /// Reads the kvmclock.
    pub fn clock(&self) -> Result<kvm_clock_data, VmError> {
        self.fd().get_clock().map_err(ioctl("KVM_GET_CLOCK"))
    }

    /// Sets the kvmclock to `clock` as saved, without advancing it by the time since (flags that
    /// ask KVM to correct for elapsed host time are cleared).
    pub fn set_clock(&self, clock: &kvm_clock_data) -> Result<(), VmError> {
        let clock = kvm_clock_data {
            clock: clock.clock,
            ..Default::default()
        };
        self.fd().set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))
    }

    /// Sets the kvmclock to `clock` advanced by the wall-clock time since it was read
    /// (`KVM_CLOCK_REALTIME`, `clock_realtime` on snapshot load); `clock` must carry the
    /// realtime stamp KVM adds when the host's TSC is stable.
    pub fn set_clock_realtime(&self, clock: &kvm_clock_data) -> Result<(), VmError> {
        let clock = kvm_clock_data {
            clock: clock.clock,
            realtime: clock.realtime,
            flags: kvm_bindings::KVM_CLOCK_REALTIME,
            ..Default::default()
        };
        self.fd().set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))
    }

    /// Saves the in-kernel devices; the vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        Ok(VmState {
            pic_master: self.irqchip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: self.irqchip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: self.irqchip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd().get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
            clock: self.clock()?,
        })
    }

    /// Puts saved in-kernel device state into a VM whose irqchip and PIT exist.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        self.fd()
            .set_pit2(&state.pit)
            .map_err(ioctl("KVM_SET_PIT2"))?;
        self.set_clock(&state.clock)?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd()
                .set_irqchip(chip)
                .map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}
