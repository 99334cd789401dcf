//! The local APIC at boot: LINT0 delivers the PIC's interrupts (ExtINT) and LINT1 delivers NMIs, as
//! on a PC, so the guest can use the legacy PIC before it switches to the IOAPIC.

use kvm_bindings::kvm_lapic_state;

/// Register offsets of LVT LINT0 and LINT1 in the APIC page.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const DELIVERY_MODE_MASK: u32 = 0x700;
const DELIVERY_EXTINT: u32 = 0x7 << 8;
const DELIVERY_NMI: u32 = 0x4 << 8;

fn get_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| state.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        state.regs[offset + i] = b as _;
    }
}

/// Routes LINT0 to ExtINT and LINT1 to NMI in `state`, keeping the other LVT bits.
pub fn set_lint(state: &mut kvm_lapic_state) {
    let lvt0 = get_reg(state, APIC_LVT0);
    set_reg(
        state,
        APIC_LVT0,
        (lvt0 & !DELIVERY_MODE_MASK) | DELIVERY_EXTINT,
    );
    let lvt1 = get_reg(state, APIC_LVT1);
    set_reg(
        state,
        APIC_LVT1,
        (lvt1 & !DELIVERY_MODE_MASK) | DELIVERY_NMI,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut s = kvm_lapic_state::default();
        set_reg(&mut s, APIC_LVT0, 0x0001_0000 | 0x200); // masked, SMI mode
        set_reg(&mut s, APIC_LVT1, 0x0001_0000);
        set_lint(&mut s);
        assert_eq!(get_reg(&s, APIC_LVT0), 0x0001_0700);
        assert_eq!(get_reg(&s, APIC_LVT1), 0x0001_0400);
    }
}
