//! Where things live in a Kiln guest's physical address space (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT              0x0000_9000  PML4, then PDPT, then 4 page directories (4 GiB)
//! 0x0000_0520  IDT (empty)      0x0002_0000  kernel command line
//! 0x0000_6000  PVH start info   0x0009_fc00  MP table (reserved up to 1 MiB)
//! 0x0000_7000  zero page        0x0010_0000  kernel (ELF p_paddr, bzImage protected-mode part)
//! 0x0000_8ff0  boot stack top   0xc000_0000  32-bit MMIO gap up to 4 GiB (IOAPIC, LAPIC, virtio)
//! ```
//! RAM beyond 3 GiB continues at 4 GiB.

/// Global descriptor table used for boot.
pub const GDT_START: u64 = 0x500;
/// Interrupt descriptor table used for boot (empty; the kernel installs its own).
pub const IDT_START: u64 = 0x520;
/// `hvm_start_info` for PVH boot.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH module list (the initrd), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// The PVH memory map, after the module list.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Linux's `boot_params` ("zero page") for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4 of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories mapping 4 GiB with 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line Linux x86 accepts, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP floating pointer and configuration table; also where the EBDA would be.
pub const MPTABLE_START: u64 = 0x9_fc00;
/// Start of high memory: kernels are loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (3 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Every LAPIC's MMIO base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) sits just below the identity-map page, at the top of the MMIO gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page for real-mode emulation on Intel.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Number of IOAPIC pins (and ISA + PCI-style IRQ lines) the guest sees.
pub const IOAPIC_PINS: u8 = 24;
