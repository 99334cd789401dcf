//! Checking a state file's contents before anything is built from them. The CRC only says the
//! file is what was written; a crafted or corrupted-then-rehashed file must still not size an
//! allocation, overflow an address or pick a vCPU count. Everything a boot would validate is
//! validated here too (vCPUs, memory, SMT, through the same [`validate_machine`]), plus what only
//! a snapshot has: that the state agrees with its own configuration, and where devices sit.

use std::collections::HashSet;
use std::path::Path;

use kiln_devices::virtio::mmio::MMIO_LEN;

use super::{MicrovmState, PersistError};
use crate::arch::layout::{IOAPIC_PINS, MMIO_GAP_END};
use crate::config::validate_machine;
use crate::config::{MAX_VIRTIO_DEVICES, VmConfig};
use crate::device_manager::{FIRST_DEVICE_IRQ, MMIO_DEVICES_START};

/// The saved configuration of `state`, once everything in the state file is found consistent
/// and within the limits a boot has. `path` names the file in errors.
pub fn validate(state: &MicrovmState, path: &Path) -> Result<VmConfig, PersistError> {
    let refused = |what: String| PersistError::Refused(format!("{}: {what}", path.display()));
    let config: VmConfig = serde_json::from_str(&state.config_json)
        .map_err(|e| refused(format!("the saved configuration is unreadable: {e}")))?;
    validate_machine(&config.machine)
        .map_err(|e| refused(format!("the saved configuration: {e}")))?;
    let vcpus = usize::from(config.machine.vcpu_count);
    if state.vcpus.len() != vcpus {
        return Err(refused(format!(
            "the snapshot has {} vCPU states for a {vcpus}-vCPU configuration",
            state.vcpus.len()
        )));
    }
    let mem_size = (config.machine.mem_size_mib as u64)
        .checked_mul(1 << 20)
        .ok_or_else(|| refused("the saved memory size overflows".into()))?;
    if state.mem_size != mem_size {
        return Err(refused(format!(
            "the snapshot says {} bytes of memory for a {} MiB configuration",
            state.mem_size, config.machine.mem_size_mib
        )));
    }
    if state.devices.len() > MAX_VIRTIO_DEVICES {
        return Err(refused(format!(
            "the snapshot has {} devices; at most {MAX_VIRTIO_DEVICES} fit",
            state.devices.len()
        )));
    }
    let (mut addrs, mut irqs) = (HashSet::new(), HashSet::new());
    for (i, d) in state.devices.iter().enumerate() {
        let in_window = d.addr >= MMIO_DEVICES_START
            && d.addr.is_multiple_of(MMIO_LEN)
            && d.addr
                .checked_add(MMIO_LEN)
                .is_some_and(|end| end <= MMIO_GAP_END);
        if !in_window {
            return Err(refused(format!(
                "device {i} sits at {:#x}, outside the device window {MMIO_DEVICES_START:#x}..\
                 {MMIO_GAP_END:#x} or not on a {MMIO_LEN:#x} boundary",
                d.addr
            )));
        }
        if !(FIRST_DEVICE_IRQ..u32::from(IOAPIC_PINS)).contains(&d.irq) {
            return Err(refused(format!(
                "device {i} has interrupt line {}, outside {FIRST_DEVICE_IRQ}..{IOAPIC_PINS}",
                d.irq
            )));
        }
        if !addrs.insert(d.addr) || !irqs.insert(d.irq) {
            return Err(refused(format!(
                "device {i} shares its address {:#x} or interrupt line {} with another",
                d.addr, d.irq
            )));
        }
    }
    Ok(config)
}

/// Decodes a state file whose payload is `payload` (its header and CRC made right) and validates
/// it: what the restore path does before touching KVM. For fuzzing and tests.
pub fn check_payload(payload: &[u8]) -> Result<VmConfig, PersistError> {
    let path = Path::new("<crafted state file>");
    let bytes = kiln_snapshot::frame_payload(payload);
    let state: MicrovmState =
        kiln_snapshot::from_bytes(&bytes).map_err(|err| PersistError::State {
            path: path.into(),
            err,
        })?;
    validate(&state, path)
}
