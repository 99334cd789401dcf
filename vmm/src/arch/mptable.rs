//! The Intel MultiProcessor Specification 1.4 table, which tells a guest without ACPI how many CPUs
//! it has and where its IOAPIC is. Built byte by byte: a floating pointer ("_MP_") followed by a
//! configuration table ("PCMP") of processor, bus, IOAPIC, I/O-interrupt and local-interrupt entries.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR, MPTABLE_START};
use crate::memory::GuestMemoryMmap;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6, the signature Linux expects from a modern CPU in an MP table.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
const ALL_LAPICS: u8 = 0xff;

/// Errors writing the table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// The table does not fit below 1 MiB.
    #[error("the MP table for {0} vCPUs does not fit in guest memory: {1}")]
    Write(u8, vm_memory::GuestMemoryError),
}

/// The IOAPIC's id: one past the last CPU's APIC id.
pub fn ioapic_id(vcpus: u8) -> u8 {
    vcpus
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// The full table (floating pointer first) as it is placed at `base`.
pub fn build(base: u64, vcpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION]);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic = ioapic_id(vcpus);
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // Conforming polarity and trigger (flags 0): ISA defaults, edge-triggered, active high.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            ISA_BUS_ID,
            pin,
            ioapic,
            pin,
        ]);
        count += 1;
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[
            ENTRY_LOCAL_INTERRUPT,
            kind,
            0,
            0,
            ISA_BUS_ID,
            0,
            ALL_LAPICS,
            lint,
        ]);
        count += 1;
    }

    let table_addr = base + FLOATING_POINTER_LEN as u64;
    let mut table = Vec::with_capacity(HEADER_LEN + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"KILN    ");
    table.extend_from_slice(b"KILN MICROVM");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(SPEC_REV);
    out.push(0); // checksum, filled below
    out.extend_from_slice(&[0; 5]); // features: a configuration table is present
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    out
}

/// Writes the MP table for `vcpus` CPUs at [`MPTABLE_START`].
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    mem.write_slice(&build(MPTABLE_START, vcpus), GuestAddress(MPTABLE_START))
        .map_err(|e| MptableError::Write(vcpus, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::HIMEM_START;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn floating_pointer_and_table_checksum_to_zero() {
        for vcpus in [1, 2, 32] {
            let t = build(MPTABLE_START, vcpus);
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64,
                MPTABLE_START + 16
            );
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
        }
    }

    #[test]
    fn entries_describe_cpus_bus_ioapic_and_interrupts() {
        let t = build(MPTABLE_START, 2);
        let table = &t[16..];
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 2 + 1 + 1 + 24 + 2);
        let e = &table[HEADER_LEN..];
        // Two processors of 20 bytes: ids 0 and 1, only the first is the BSP.
        assert_eq!(
            &e[..4],
            &[ENTRY_PROCESSOR, 0, APIC_VERSION, CPU_ENABLED | CPU_BSP]
        );
        assert_eq!(&e[20..24], &[ENTRY_PROCESSOR, 1, APIC_VERSION, CPU_ENABLED]);
        assert_eq!(&e[40..48], b"\x01\x00ISA   ");
        assert_eq!(&e[48..52], &[ENTRY_IOAPIC, 2, IOAPIC_VERSION, 1]);
        assert_eq!(&e[52..56], &0xfec0_0000u32.to_le_bytes());
        // Pin 4 (COM1) routes ISA IRQ 4 to IOAPIC pin 4.
        assert_eq!(
            &e[56 + 4 * 8..56 + 5 * 8],
            &[ENTRY_IO_INTERRUPT, 0, 0, 0, 0, 4, 2, 4]
        );
        let local = &e[56 + 24 * 8..];
        assert_eq!(
            local,
            &[4, 3, 0, 0, 0, 0, 0xff, 0, 4, 1, 0, 0, 0, 0, 0xff, 1]
        );
    }

    #[test]
    fn table_for_32_cpus_ends_below_high_memory() {
        assert!(MPTABLE_START + build(MPTABLE_START, 32).len() as u64 <= HIMEM_START);
    }
}
