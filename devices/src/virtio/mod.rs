//! Virtio 1.x devices over the MMIO transport (version 2, modern only).
//!
//! [`mmio::MmioTransport`] is the register file the guest driver talks to; it negotiates features,
//! walks the status state machine, collects queue configuration and, when the driver sets
//! DRIVER_OK, hands the queues to the device ([`VirtioDevice::activate`]). From then on only the
//! device's event handler (an `event-manager` subscriber on the VMM thread) touches the queues.
//! Each device is a folder with the same files: `mod.rs`, `device.rs`, `event_handler.rs`,
//! `request.rs` (or `packet.rs`) and their tests.

pub mod balloon;
pub mod block;
pub mod budget;
pub mod chain;
pub mod device;
mod log_once;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod used;
pub mod vsock;

pub use budget::Budget;
pub use device::{ActivateError, Interrupt, VirtioDevice};
pub use log_once::LogOnce;
pub use mmio::MmioTransport;

/// Device ID of a block device.
pub const TYPE_BLOCK: u32 = 2;
/// Device ID of a network device.
pub const TYPE_NET: u32 = 1;
/// Device ID of a memory balloon.
pub const TYPE_BALLOON: u32 = 5;
/// Device ID of a vsock device.
pub const TYPE_VSOCK: u32 = 19;

/// Feature bit: the device complies with virtio 1.x (required: Kiln is modern-only).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: the used/avail event index notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// Feature bit: a descriptor may point to a table of descriptors (offered by the network device
/// only, whose transmit chains are many pieces each).
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Interrupt status bits (MMIO InterruptStatus register).
pub mod interrupt_status {
    /// The device used a buffer.
    pub const USED_RING: u32 = 1;
    /// The device's configuration (or status) changed.
    pub const CONFIG_CHANGED: u32 = 2;
}

/// Guest memory as devices see it.
pub type GuestMemoryMmap = crate::GuestMemoryMmap;

/// The queue type devices receive at activation.
pub type Queue = virtio_queue::Queue;
