//! x86_64 specifics: the guest's physical layout, boot information (e820, zero page, PVH start
//! info, MP table) and each vCPU's initial CPUID, MSRs, registers and LAPIC.

pub mod boot;
pub mod cpuid;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
