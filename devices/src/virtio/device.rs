//! What every virtio device implements, and the interrupt line it shares with its transport.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

use virtio_queue::QueueT;

use super::{GuestMemoryMmap, Queue, interrupt_status};

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured a different number of queues than the device has.
    #[error("the driver set up {got} queues; the device has {want}")]
    QueueCount {
        /// Queues the device has.
        want: usize,
        /// Queues handed over.
        got: usize,
    },
    /// The device's activation event could not be signalled.
    #[error("cannot signal the device's activation: {0}")]
    Signal(std::io::Error),
    /// Activated twice without a reset in between.
    #[error("the device is already active")]
    AlreadyActive,
    /// A device-specific reason.
    #[error("{0}")]
    Device(String),
}

/// A device behind a virtio-mmio transport.
///
/// The transport calls these from a vCPU thread with the device's lock held, so each must be quick;
/// `activate` in particular only stores the queues and wakes the device's event handler.
pub trait VirtioDevice: Send {
    /// The virtio device ID ([`super::TYPE_BLOCK`], ...).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue (the queue count is the length).
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// The feature bits the driver accepted (a subset of `avail_features`, VERSION_1 included).
    fn set_acked_features(&mut self, features: u64);
    /// The feature bits accepted so far.
    fn acked_features(&self) -> u64;
    /// The driver reads the device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver writes the device-specific configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The eventfds KVM signals when the driver notifies each queue (one per queue, registered as
    /// ioeventfds on QueueNotify with the queue index as datamatch).
    fn queue_events(&self) -> &[EventFd];
    /// The interrupt the device raises, shared with the transport.
    fn interrupt(&self) -> &std::sync::Arc<Interrupt>;
    /// Takes ownership of the driver's queues and starts the device.
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError>;
    /// Stops the device and drops its queues (the driver wrote 0 to Status).
    fn reset(&mut self);
    /// True between a successful `activate` and the next `reset`.
    fn is_activated(&self) -> bool;
    /// The queues the device owns while active (empty otherwise), for snapshots.
    fn active_queues(&self) -> &[Queue];
}

/// Copies the part of a device's configuration space at `offset` into `data`; bytes past the end
/// read as zero (what a driver reading beyond a short config space sees).
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = space.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// A device's interrupt: the irqfd KVM turns into a guest interrupt, the InterruptStatus bits the
/// driver reads and acknowledges, and the device's "needs reset" flag.
#[derive(Debug)]
pub struct Interrupt {
    irqfd: EventFd,
    status: AtomicU32,
    needs_reset: AtomicBool,
}

impl Interrupt {
    /// An interrupt raised through `irqfd` (registered with KVM by the VMM).
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            irqfd,
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
        }
    }

    /// The eventfd to register as an irqfd.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::error!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// Tells the driver buffers were used.
    pub fn signal_used(&self) {
        self.raise(interrupt_status::USED_RING);
    }

    /// Tells the driver buffers on `queue` were used, if it asked to hear about it (EVENT_IDX);
    /// when the answer cannot be read from guest memory, interrupts anyway rather than stall it.
    pub fn signal_used_if_needed(&self, queue: &mut Queue, mem: &GuestMemoryMmap) {
        if queue.needs_notification(mem).unwrap_or(true) {
            self.signal_used();
        }
    }

    /// As [`Interrupt::signal_used_if_needed`], for buffers handed back with
    /// [`super::used::publish`] since the used index was `since` (nothing when none was).
    pub fn signal_used_since(&self, queue: &Queue, mem: &GuestMemoryMmap, since: u16) {
        if queue.next_used() != since
            && super::used::needs_notification(queue, mem, since).unwrap_or(true)
        {
            self.signal_used();
        }
    }

    /// Tells the driver the configuration space changed.
    pub fn signal_config(&self) {
        self.raise(interrupt_status::CONFIG_CHANGED);
    }

    /// The device cannot go on (a lying driver): DEVICE_NEEDS_RESET shows in Status and the driver
    /// gets a configuration interrupt.
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.signal_config();
        }
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Puts back a saved InterruptStatus and needs-reset flag (snapshot restore); pending bits
    /// are raised again so the guest sees the interrupt it had not yet handled.
    pub fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
        if status != 0
            && let Err(e) = self.irqfd.write(1)
        {
            log::error!("cannot raise a restored virtio interrupt: {e}");
        }
    }

    /// Forgets all state (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_reads_are_bounded_and_zero_filled() {
        let space = [1u8, 2, 3, 4];
        let mut d = [9u8; 3];
        read_config_space(&space, 2, &mut d);
        assert_eq!(d, [3, 4, 0]);
        read_config_space(&space, 10, &mut d);
        assert_eq!(d, [0, 0, 0]);
        read_config_space(&space, u64::MAX, &mut d);
        assert_eq!(d, [0, 0, 0]);
    }

    #[test]
    fn status_bits_are_raised_acked_and_reset() {
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        irq.signal_used();
        irq.signal_config();
        assert_eq!(irq.status(), 3);
        assert_eq!(irq.irqfd().read().unwrap(), 2);
        irq.ack(interrupt_status::USED_RING);
        assert_eq!(irq.status(), interrupt_status::CONFIG_CHANGED);
        irq.set_needs_reset();
        irq.set_needs_reset();
        assert!(irq.needs_reset());
        assert_eq!(
            irq.irqfd().read().unwrap(),
            1,
            "one config interrupt for needs-reset"
        );
        irq.reset();
        assert_eq!((irq.status(), irq.needs_reset()), (0, false));
    }
}
