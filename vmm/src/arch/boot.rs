//! Boot information for the guest kernel: the e820 memory map and either Linux's zero page (64-bit
//! boot protocol) or the PVH `hvm_start_info`, both written with `linux-loader`'s configurators.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

use super::layout::{
    CMDLINE_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, MPTABLE_START, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::memory::GuestMemoryMmap;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// Magic number of `hvm_start_info`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Linux boot-protocol header magic, "HdrS".
const HDR_MAGIC: u32 = 0x5372_6448;
/// Boot-sector signature.
const BOOT_FLAG: u16 = 0xaa55;
/// "Undefined" boot loader id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Kernel alignment reported for an ELF kernel (CONFIG_PHYSICAL_ALIGN's usual value).
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// Errors writing boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The configurator could not write to guest memory.
    #[error("cannot write boot parameters to guest memory: {0}")]
    Write(#[from] linux_loader::configurator::Error),
    /// The map has more entries than the zero page holds.
    #[error("the e820 map has {0} entries; the zero page holds 128")]
    TooManyEntries(usize),
}

/// The guest's memory map for `mem_size` bytes of RAM: low RAM up to the MP table, the MP table and
/// legacy area reserved up to 1 MiB, RAM from 1 MiB to the MMIO gap, and RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let low_end = mem_size.min(MMIO_GAP_START);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: MPTABLE_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: MPTABLE_START,
            size: HIMEM_START - MPTABLE_START,
            kind: E820_RESERVED,
        },
    ];
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

/// What the kernel is told about its initrd and command line.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// Initrd address and size, if any.
    pub initrd: Option<(GuestAddress, u64)>,
    /// Command-line length including the NUL.
    pub cmdline_size: usize,
    /// Guest RAM in bytes.
    pub mem_size: u64,
}

/// Writes Linux's zero page for the 64-bit boot protocol.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    info: &BootInfo,
    header: Option<setup_header>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    } else {
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_size as u32;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(info.mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootError::TooManyEntries(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )?;
    Ok(())
}

/// Writes `hvm_start_info`, the module list (the initrd) and the memory map for PVH boot.
pub fn write_pvh_info(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), BootError> {
    let map = e820_map(info.mem_size);
    let mut start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&hvm_start_info::default(), GuestAddress(PVH_INFO_START));
    if let Some((addr, size)) = info.initrd {
        start.nr_modules = 1;
        start.modlist_paddr = PVH_MODLIST_START;
        let module = hvm_modlist_entry {
            paddr: addr.0,
            size,
            ..Default::default()
        };
        params.add_module(&module, Some(GuestAddress(PVH_MODLIST_START)))?;
    }
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at = (i == 0).then_some(GuestAddress(PVH_MEMMAP_START));
        params.add_section(&entry, at)?;
    }
    params.header = vm_memory::ByteValued::as_slice(&start).to_vec();
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn e820_for_small_memory() {
        assert_eq!(
            e820_map(256 * MIB),
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9_fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9_fc00,
                    size: 0x6_0400,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: MIB,
                    size: 255 * MIB,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn e820_skips_the_mmio_gap() {
        let map = e820_map(6 * GIB);
        assert_eq!(
            map[2],
            E820Entry {
                addr: MIB,
                size: 3 * GIB - MIB,
                kind: E820_RAM
            }
        );
        assert_eq!(
            map[3],
            E820Entry {
                addr: 4 * GIB,
                size: 3 * GIB,
                kind: E820_RAM
            }
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, 6 * GIB - (MIB - 0x9_fc00));
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_map() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let info = BootInfo {
            initrd: Some((GuestAddress(0x300_0000), 0x1234)),
            cmdline_size: 14,
            mem_size: 64 << 20,
        };
        write_zero_page(&mem, &info, None).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.header }, HDR_MAGIC);
        assert_eq!({ p.hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].size }, 63 << 20);
    }

    #[test]
    fn pvh_start_info_points_at_modules_and_map() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let info = BootInfo {
            initrd: Some((GuestAddress(0x300_0000), 0x1234)),
            cmdline_size: 14,
            mem_size: 64 << 20,
        };
        write_pvh_info(&mem, &info).unwrap();
        let s: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(s.magic, XEN_HVM_START_MAGIC);
        assert_eq!(s.nr_modules, 1);
        assert_eq!(s.memmap_entries, 3);
        assert_eq!(s.cmdline_paddr, CMDLINE_START);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(s.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x300_0000, 0x1234));
        let last: hvm_memmap_table_entry =
            mem.read_obj(GuestAddress(s.memmap_paddr + 2 * 24)).unwrap();
        assert_eq!(
            (last.addr, last.size, last.type_),
            (MIB, 63 << 20, E820_RAM)
        );
    }
}
