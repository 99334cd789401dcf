//! Kiln's devices: everything a guest can touch.
//!
//! This crate owns the port-I/O and MMIO [`bus`] that routes a vCPU's exits to a device, and the
//! devices themselves: [`legacy`] (the 16550 UART and the i8042) and [`virtio`] (the virtio-mmio
//! transport and the virtio devices). It may call the rust-vmm
//! device crates (`vm-superio`) and `vmm-sys-util`; it never touches KVM. The `kiln-vmm` crate builds
//! the devices, places them on a bus and calls into them from its vCPU threads.
//!
//! A guest is hostile by assumption: nothing a guest writes here may panic the VMM.

pub mod bus;
pub mod legacy;
pub mod metrics;
pub mod pseudo;
pub mod rate_limiter;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, BusRange};

/// Guest memory as the VMM and its devices share it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
