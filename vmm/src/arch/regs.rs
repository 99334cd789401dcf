//! Registers at boot: general-purpose registers, segments, the boot GDT and identity-mapped page
//! tables, and the FPU. Two entry states: the 64-bit Linux boot protocol (long mode, paging on) and
//! PVH (32-bit protected mode, paging off).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};
use crate::loader::BootEntry;
use crate::memory::GuestMemoryMmap;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Page-table entry bits: present, writable, and (in a page directory) a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_2MIB: u64 = 0x80;
/// Page directories in the identity map: four of them cover 4 GiB (RAM and the MMIO gap).
const PAGE_DIRECTORIES: u64 = 4;
// The tables must end below the command line, the next thing in the boot zone.
const _: () = assert!(PDE_START + PAGE_DIRECTORIES * 0x1000 <= super::layout::CMDLINE_START);

/// GDT flags for a 64-bit code segment, flat 32-bit code, flat data, and a busy TSS.
const GDT_CODE64: u16 = 0xa09b;
const GDT_CODE32: u16 = 0xc09b;
const GDT_DATA: u16 = 0xc093;
const GDT_TSS: u16 = 0x808b;

/// Errors writing boot structures to guest memory.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the boot {what} to guest memory: {err}")]
pub struct RegsError {
    what: &'static str,
    err: vm_memory::GuestMemoryError,
}

/// A GDT descriptor from its flags, base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM segment register state a descriptor at GDT slot `index` loads.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let granular = bit(55) == 1;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: if bit(47) == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// The boot GDT for an entry: null, code, data, TSS.
pub fn boot_gdt(entry: &BootEntry) -> [u64; 4] {
    let code = match entry {
        BootEntry::Linux64(_) => GDT_CODE64,
        BootEntry::Pvh(_) => GDT_CODE32,
    };
    [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(GDT_DATA, 0, 0xfffff),
        gdt_entry(GDT_TSS, 0, 0xfffff),
    ]
}

/// General-purpose registers at entry.
pub fn boot_regs(entry: &BootEntry) -> kvm_regs {
    match entry {
        BootEntry::Linux64(rip) => kvm_regs {
            rflags: 0x2,
            rip: rip.0,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        BootEntry::Pvh(rip) => kvm_regs {
            rflags: 0x2,
            rip: rip.0,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    }
}

/// Writes the GDT, an empty IDT and (for 64-bit entry) the identity map, and sets `sregs` to match.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    entry: &BootEntry,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    let gdt = boot_gdt(entry);
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + i as u64 * 8))
            .map_err(|err| RegsError { what: "GDT", err })?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|err| RegsError { what: "IDT", err })?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);

    match entry {
        BootEntry::Linux64(_) => {
            write_identity_map(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootEntry::Pvh(_) => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// The identity map's entries: (address, value) pairs for the PML4, the PDPT and 4 page directories.
pub fn identity_map_entries() -> impl Iterator<Item = (u64, u64)> {
    let pml4 = std::iter::once((PML4_START, PDPTE_START | PTE_PRESENT_RW));
    let pdpt = (0..PAGE_DIRECTORIES).map(|i| {
        (
            PDPTE_START + i * 8,
            (PDE_START + i * 0x1000) | PTE_PRESENT_RW,
        )
    });
    let pds = (0..PAGE_DIRECTORIES * 512)
        .map(|n| (PDE_START + n * 8, (n << 21) | PTE_PRESENT_RW | PDE_2MIB));
    pml4.chain(pdpt).chain(pds)
}

fn write_identity_map(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (addr, value) in identity_map_entries() {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|err| RegsError {
                what: "page tables",
                err,
            })?;
    }
    Ok(())
}

/// FPU state at boot: x87 control word and MXCSR at their reset values.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_encode_as_linux_expects() {
        assert_eq!(gdt_entry(GDT_CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(GDT_DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(GDT_TSS, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(
            gdt_entry(0x0093, 0x1234_5678, 0xabcde),
            0x120a_9334_5678_bcde
        );
    }

    #[test]
    fn segments_decode_from_descriptors() {
        let cs = segment_from_gdt(gdt_entry(GDT_CODE64, 0, 0xfffff), 1);
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.g, cs.present, cs.s),
            (8, 0xb, 1, 0, 1, 1, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(gdt_entry(0x0093, 0x1234_5678, 0xabcde), 2);
        assert_eq!(
            (ds.base, ds.limit, ds.selector, ds.g, ds.unusable),
            (0x1234_5678, 0xabcde, 16, 0, 0)
        );
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn identity_map_covers_four_gib_with_2mib_pages() {
        let entries: Vec<_> = identity_map_entries().collect();
        assert_eq!(entries.len(), 1 + 4 + 2048);
        assert_eq!(entries[0], (PML4_START, PDPTE_START | 3));
        assert_eq!(entries[4], (PDPTE_START + 24, (PDE_START + 0x3000) | 3));
        assert_eq!(entries[5], (PDE_START, 0x83));
        assert_eq!(
            *entries.last().unwrap(),
            (PDE_START + 2047 * 8, (2047 << 21) | 0x83)
        );
    }

    #[test]
    fn entry_states_differ_by_protocol() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut long = kvm_sregs::default();
        setup_sregs(
            &mem,
            &BootEntry::Linux64(GuestAddress(0x100_0000)),
            &mut long,
        )
        .unwrap();
        assert_eq!(long.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(long.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((long.cr3, long.cs.l), (PML4_START, 1));
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PDE_START + 8)).unwrap(),
            (1 << 21) | 0x83
        );

        let mut pvh = kvm_sregs::default();
        setup_sregs(&mem, &BootEntry::Pvh(GuestAddress(0x100_0000)), &mut pvh).unwrap();
        assert_eq!(
            (pvh.cr0 & CR0_PG, pvh.efer, pvh.cs.l, pvh.cs.db),
            (0, 0, 0, 1)
        );
        let r = boot_regs(&BootEntry::Pvh(GuestAddress(0x100_0000)));
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0000, PVH_INFO_START, 2));
        let r = boot_regs(&BootEntry::Linux64(GuestAddress(0x200_0000)));
        assert_eq!(
            (r.rip, r.rsi, r.rsp),
            (0x200_0000, ZERO_PAGE_START, BOOT_STACK_POINTER)
        );
    }
}
