//! The virtio-mmio register file (virtio 1.2, 4.2.2), version 2 only.
//!
//! The transport owns the queue configuration until the driver sets DRIVER_OK, then hands the
//! queues to the device. Everything a driver writes is checked against the status state machine:
//! features only between DRIVER and FEATURES_OK, queues only between FEATURES_OK and DRIVER_OK,
//! sizes that are powers of two no larger than the maximum, rings inside guest memory. A driver
//! that breaks a rule gets DEVICE_NEEDS_RESET, never a VMM panic.

use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;

use super::device::VirtioDevice;
use super::{GuestMemoryMmap, LogOnce, Queue, VIRTIO_F_VERSION_1, status};
use crate::bus::BusDevice;

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
/// Modern virtio-mmio.
const VERSION: u32 = 2;
/// "KILN" as a vendor id.
const VENDOR_ID: u32 = 0x4e4c_494b;

/// Register offsets.
pub(crate) mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Kinds of driver mistakes, each logged at `warn` once per transport (see [`LogOnce`]).
#[derive(Clone, Copy)]
enum Mistake {
    /// A status write that breaks the state machine, or a failed activation.
    Status = 0,
    /// A queue size that is not a power of two up to the maximum.
    QueueSize,
    /// Features the device does not offer, or no VERSION_1.
    Features,
}

/// Offset of QueueNotify, where the VMM registers each queue's ioeventfd.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;
/// Size of one device's MMIO window.
pub const MMIO_LEN: u64 = 0x1000;

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    /// A queue whose configuration the driver got wrong; activation is refused.
    queue_error: bool,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    log: LogOnce,
}

impl MmioTransport {
    /// A transport for `device`, whose queues will live in `mem`.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, mem: GuestMemoryMmap) -> Self {
        let queues = lock(&device)
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect();
        Self {
            device,
            mem,
            queues,
            queue_error: false,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            log: LogOnce::default(),
        }
    }

    /// How many lines this transport logged at `warn` (once per kind of driver mistake).
    pub fn warnings(&self) -> u32 {
        self.log.warnings()
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The Status register as the driver sees it.
    pub fn status(&self) -> u32 {
        let needs_reset = lock(&self.device).interrupt().needs_reset();
        self.status
            | if needs_reset {
                status::DEVICE_NEEDS_RESET
            } else {
                0
            }
    }

    fn has(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    /// Queue registers are writable only while features are settled and the device is not live.
    fn queue_config_allowed(&self) -> bool {
        self.has(status::FEATURES_OK)
            && !self.has(status::DRIVER_OK)
            && self.status & status::FAILED == 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn fail(&mut self, mistake: Mistake, why: &str) {
        let device = format!("virtio-mmio device {}", lock(&self.device).device_type());
        self.log.warn(
            mistake as u32,
            &device,
            format_args!("{why}; device needs reset"),
        );
        lock(&self.device).interrupt().set_needs_reset();
    }

    fn reset(&mut self) {
        let mut dev = lock(&self.device);
        if dev.is_activated() {
            dev.reset();
        }
        dev.interrupt().reset();
        drop(dev);
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_error = false;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        if value & self.status != self.status {
            // Bits can only be added; clearing any but through a reset is a driver bug.
            self.fail(
                Mistake::Status,
                &format!("status {:#x} would clear bits of {:#x}", value, self.status),
            );
            return;
        }
        let expected_before = |bit: u32| match bit {
            status::ACKNOWLEDGE => 0,
            status::DRIVER => status::ACKNOWLEDGE,
            status::FEATURES_OK => status::ACKNOWLEDGE | status::DRIVER,
            status::DRIVER_OK => status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            _ => 0,
        };
        for bit in [
            status::ACKNOWLEDGE,
            status::DRIVER,
            status::FEATURES_OK,
            status::DRIVER_OK,
        ] {
            if added & bit == 0 {
                continue;
            }
            if !self.has(expected_before(bit)) {
                self.fail(
                    Mistake::Status,
                    &format!(
                        "status bit {bit:#x} set out of order (status {:#x})",
                        self.status
                    ),
                );
                return;
            }
            match bit {
                status::FEATURES_OK => {
                    if !self.features_acceptable() {
                        // Leave FEATURES_OK clear: the driver reads it back and gives up.
                        let features = self.driver_features;
                        self.log.warn(
                            Mistake::Features as u32,
                            "virtio-mmio",
                            format_args!("driver features {features:#x} refused"),
                        );
                        return;
                    }
                    lock(&self.device).set_acked_features(self.driver_features);
                }
                status::DRIVER_OK => {
                    if let Err(why) = self.activate() {
                        self.status |= bit;
                        self.fail(Mistake::Status, &why);
                        return;
                    }
                }
                _ => {}
            }
            self.status |= bit;
        }
        if added & status::FAILED != 0 {
            self.status |= status::FAILED;
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = lock(&self.device).avail_features();
        self.driver_features & !offered == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) -> Result<(), String> {
        if self.queue_error {
            return Err("a queue was configured with an invalid size".into());
        }
        for (i, q) in self.queues.iter().enumerate() {
            if !q.is_valid(&self.mem) {
                return Err(format!(
                    "queue {i} is not ready or its rings are outside guest memory"
                ));
            }
        }
        let event_idx = self.driver_features & (1 << super::VIRTIO_RING_F_EVENT_IDX) != 0;
        // The device gets its own copies; the transport keeps the configuration the driver reads.
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            let mut copy = Queue::try_from(q.state()).map_err(|e| format!("queue {i}: {e:?}"))?;
            copy.set_event_idx(event_idx);
            queues.push(copy);
        }
        lock(&self.device)
            .activate(self.mem.clone(), queues)
            .map_err(|e| e.to_string())
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let dev = lock(&self.device);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => dev.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => dev.avail_features() as u32,
                1 => (dev.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => dev.interrupt().status(),
            reg::STATUS => {
                drop(dev);
                self.status()
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let features_allowed = self.has(status::DRIVER) && !self.has(status::FEATURES_OK);
        let queue_allowed = self.queue_config_allowed();
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES if features_allowed => match self.driver_features_select {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => log::debug!(
                    "virtio-mmio: driver features page {} ignored",
                    self.driver_features_select
                ),
            },
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM if queue_allowed => {
                let valid = self
                    .selected_queue()
                    .map(|q| q.try_set_size(value as u16).is_ok() && value <= 0xffff);
                if valid != Some(true) {
                    self.queue_error = true;
                    let queue = self.queue_select;
                    self.fail(
                        Mistake::QueueSize,
                        &format!(
                            "queue {queue} size {value} is not a power of two up to the maximum"
                        ),
                    );
                }
            }
            reg::QUEUE_READY if queue_allowed => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH
                if queue_allowed =>
            {
                let high = offset & 4 != 0;
                let (lo, hi) = if high {
                    (None, Some(value))
                } else {
                    (Some(value), None)
                };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        reg::QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => lock(&self.device).interrupt().ack(value),
            reg::STATUS => self.set_status(value),
            _ => log::debug!(
                "virtio-mmio: write {value:#x} to register {offset:#x} ignored (status {:#x})",
                self.status
            ),
        }
    }

    /// A QueueNotify that reached the VMM (no ioeventfd matched): pass it to the device's event.
    fn notify(&self, queue: u32) {
        if !self.has(status::DRIVER_OK) {
            return;
        }
        let dev = lock(&self.device);
        match dev.queue_events().get(queue as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    log::error!(
                        "virtio-mmio: cannot forward a notification for queue {queue}: {e}"
                    );
                }
            }
            None => {
                log::debug!("virtio-mmio: notification for queue {queue}, which does not exist")
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            log::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} is not a register access",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).write_config(offset - reg::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} is not a register access",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

/// The transport's scalar registers, as saved in a snapshot.
pub(super) struct Registers {
    pub(super) queue_error: bool,
    pub(super) queue_select: u32,
    pub(super) device_features_select: u32,
    pub(super) driver_features_select: u32,
    pub(super) driver_features: u64,
    pub(super) status: u32,
    pub(super) config_generation: u32,
}

impl MmioTransport {
    /// The queue configuration the driver wrote.
    pub(super) fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// The scalar registers.
    pub(super) fn registers(&self) -> Registers {
        Registers {
            queue_error: self.queue_error,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
        }
    }

    /// Puts back saved queues and registers (the device was restored separately).
    pub(super) fn set_restored(&mut self, queues: Vec<Queue>, regs: Registers) {
        self.queues = queues;
        self.queue_error = regs.queue_error;
        self.queue_select = regs.queue_select;
        self.device_features_select = regs.device_features_select;
        self.driver_features_select = regs.driver_features_select;
        self.driver_features = regs.driver_features;
        self.status = regs.status;
        self.config_generation = regs.config_generation;
    }
}

/// Locks a device even if a thread panicked while holding it (see `bus::lock`).
fn lock(
    dev: &Arc<Mutex<dyn VirtioDevice>>,
) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
pub(crate) mod tests;
