//! Snapshot state shared by every virtio device: queue positions, the transport's registers, and
//! the device-side state common to all devices (features, interrupt status, active queues).
//!
//! A device's own `persist.rs` saves a [`VirtioState`] beside its specific state and restores it
//! with [`restore_virtio`], which re-activates the device through the normal activation path, so a
//! restored device is set up exactly as a live one is.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{QueueState, QueueT};

use super::device::VirtioDevice;
use super::mmio::MmioTransport;
use super::{GuestMemoryMmap, Queue};

/// Why saved virtio state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPersistError {
    /// A saved queue is not a valid queue.
    #[error("queue {index}: {why}")]
    Queue {
        /// The queue.
        index: usize,
        /// What is wrong with it.
        why: String,
    },
    /// The saved queue count does not match the device.
    #[error("the snapshot has {saved} queues; the device has {device}")]
    QueueCount {
        /// Queues in the snapshot.
        saved: usize,
        /// Queues the device has.
        device: usize,
    },
    /// The saved features are not ones the device offers.
    #[error("the snapshot acknowledged features {saved:#x}; the device offers only {offered:#x}")]
    Features {
        /// Acknowledged in the snapshot.
        saved: u64,
        /// Offered by the device now.
        offered: u64,
    },
    /// Re-activating the device failed.
    #[error("cannot re-activate the device: {0}")]
    Activate(String),
}

/// One queue's configuration and ring positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver set QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX is in use.
    pub event_idx: bool,
}

impl From<&Queue> for QueueSnapshot {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

impl QueueSnapshot {
    /// Rebuilds queue `index`; sizes and alignments are checked by `virtio-queue`.
    pub fn to_queue(&self, index: usize) -> Result<Queue, VirtioPersistError> {
        let state = QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(state).map_err(|e| VirtioPersistError::Queue {
            index,
            why: format!("{e:?}"),
        })
    }
}

/// Rebuilds saved queues, checking their count against the device's.
pub fn restore_queues(
    saved: &[QueueSnapshot],
    device_queues: usize,
) -> Result<Vec<Queue>, VirtioPersistError> {
    if saved.len() != device_queues {
        return Err(VirtioPersistError::QueueCount {
            saved: saved.len(),
            device: device_queues,
        });
    }
    saved
        .iter()
        .enumerate()
        .map(|(i, q)| q.to_queue(i))
        .collect()
}

/// What every virtio device saves besides its own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// The features the driver accepted.
    pub acked_features: u64,
    /// The InterruptStatus bits not yet acknowledged.
    pub interrupt_status: u32,
    /// The device had asked for a reset.
    pub needs_reset: bool,
    /// The queues the device owns, when it is active.
    pub active_queues: Option<Vec<QueueSnapshot>>,
}

/// Saves the state common to all virtio devices.
pub fn save_virtio(dev: &dyn VirtioDevice) -> VirtioState {
    VirtioState {
        acked_features: dev.acked_features(),
        interrupt_status: dev.interrupt().status(),
        needs_reset: dev.interrupt().needs_reset(),
        active_queues: dev.is_activated().then(|| {
            dev.active_queues()
                .iter()
                .map(QueueSnapshot::from)
                .collect()
        }),
    }
}

/// Puts a freshly created device back into the saved state: features, interrupt status, and (if it
/// was active) activation with the saved queues, checked against `mem`.
pub fn restore_virtio(
    dev: &mut dyn VirtioDevice,
    mem: &GuestMemoryMmap,
    state: &VirtioState,
) -> Result<(), VirtioPersistError> {
    let offered = dev.avail_features();
    if state.acked_features & !offered != 0 {
        return Err(VirtioPersistError::Features {
            saved: state.acked_features,
            offered,
        });
    }
    dev.set_acked_features(state.acked_features);
    dev.interrupt()
        .restore(state.interrupt_status, state.needs_reset);
    if let Some(saved) = &state.active_queues {
        let queues = restore_queues(saved, dev.queue_max_sizes().len())?;
        for (index, q) in queues.iter().enumerate() {
            if !q.is_valid(mem) {
                return Err(VirtioPersistError::Queue {
                    index,
                    why: "its rings are outside guest memory".into(),
                });
            }
        }
        dev.activate(mem.clone(), queues)
            .map_err(|e| VirtioPersistError::Activate(e.to_string()))?;
    }
    Ok(())
}

/// The virtio-mmio transport's registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The queue configuration the driver wrote (the transport's copy).
    pub queues: Vec<QueueSnapshot>,
    /// A queue was configured with an invalid size.
    pub queue_error: bool,
    /// QueueSel.
    pub queue_select: u32,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// DriverFeatures.
    pub driver_features: u64,
    /// Status (without DEVICE_NEEDS_RESET, which lives in the device's interrupt).
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
}

impl MmioTransport {
    /// Saves the registers.
    pub fn save(&self) -> TransportState {
        let regs = self.registers();
        TransportState {
            queues: self.queues().iter().map(QueueSnapshot::from).collect(),
            queue_error: regs.queue_error,
            queue_select: regs.queue_select,
            device_features_select: regs.device_features_select,
            driver_features_select: regs.driver_features_select,
            driver_features: regs.driver_features,
            status: regs.status,
            config_generation: regs.config_generation,
        }
    }

    /// A transport for `device` (already restored) with the saved registers.
    pub fn restore(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        state: &TransportState,
    ) -> Result<Self, VirtioPersistError> {
        let count = device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue_max_sizes()
            .len();
        let queues = restore_queues(&state.queues, count)?;
        let mut transport = MmioTransport::new(device, mem);
        transport.set_restored(
            queues,
            super::mmio::Registers {
                queue_error: state.queue_error,
                queue_select: state.queue_select,
                device_features_select: state.device_features_select,
                driver_features_select: state.driver_features_select,
                driver_features: state.driver_features,
                status: state.status,
                config_generation: state.config_generation,
            },
        );
        Ok(transport)
    }
}

#[cfg(test)]
#[path = "persist_tests.rs"]
mod tests;
