//! The I/O bus: maps guest port-I/O or MMIO addresses to the device that owns them.
//!
//! A bus is built once, while the VM is assembled, and then shared read-only between vCPU threads
//! (behind an `Arc`), so a lookup takes no global lock; each device sits behind its own mutex.

use std::sync::{Arc, Mutex};

/// A device reachable through a [`Bus`].
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A half-open address range `[base, base + len)` on a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusRange {
    /// First address of the range.
    pub base: u64,
    /// Number of addresses in the range (never zero).
    pub len: u64,
}

impl BusRange {
    /// The last address inside the range (ranges are checked not to wrap when inserted).
    fn last(&self) -> u64 {
        self.base + (self.len - 1)
    }

    fn overlaps(&self, other: &BusRange) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }
}

/// Errors while building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a device already on the bus.
    #[error("bus range {new:#x}+{new_len:#x} overlaps the device at {old:#x}+{old_len:#x}")]
    Overlap {
        /// Base of the rejected range.
        new: u64,
        /// Length of the rejected range.
        new_len: u64,
        /// Base of the range already on the bus.
        old: u64,
        /// Length of the range already on the bus.
        old_len: u64,
    },
    /// A range of length zero was given.
    #[error("bus range at {0:#x} has length zero")]
    Empty(u64),
    /// The range runs past the end of the address space.
    #[error("bus range {0:#x}+{1:#x} runs past the end of the address space")]
    Wraps(u64, u64),
}

/// A shared device handle as stored on the bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Address-to-device routing for one address space (port I/O or MMIO).
#[derive(Default, Clone)]
pub struct Bus {
    /// Sorted by base; ranges never overlap.
    devices: Vec<(BusRange, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        if base.checked_add(len - 1).is_none() {
            return Err(BusError::Wraps(base, len));
        }
        let new = BusRange { base, len };
        if let Some((old, _)) = self.devices.iter().find(|(r, _)| r.overlaps(&new)) {
            return Err(BusError::Overlap {
                new: base,
                new_len: len,
                old: old.base,
                old_len: old.len,
            });
        }
        let at = self.devices.partition_point(|(r, _)| r.base < base);
        self.devices.insert(at, (new, device));
        Ok(())
    }

    /// The device covering `addr` and `addr`'s offset into it, if any.
    fn find(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let idx = self
            .devices
            .partition_point(|(r, _)| r.base <= addr)
            .checked_sub(1)?;
        let (range, dev) = &self.devices[idx];
        (addr <= range.last()).then(|| (dev, addr - range.base))
    }

    /// Routes a guest read; returns false (leaving `data` untouched) when nothing owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((dev, offset)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Routes a guest write; returns false when nothing owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((dev, offset)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if another thread panicked while holding it: device state stays usable, and a
/// second panic in the VMM would only turn one failure into two.
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last access and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_reads_and_writes_by_offset() {
        let a = Arc::new(Mutex::new(Probe::default()));
        let b = Arc::new(Mutex::new(Probe::default()));
        let mut bus = Bus::new();
        bus.insert(b.clone(), 0x60, 5).unwrap();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(b.lock().unwrap().last_write, Some((4, vec![0xfe])));
        assert!(a.lock().unwrap().last_write.is_none());
    }

    #[test]
    fn unclaimed_addresses_are_reported_and_untouched() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Probe::default())), 0x3f8, 8)
            .unwrap();
        let mut data = [0xaa; 2];
        assert!(!bus.read(0x3f7, &mut data));
        assert!(!bus.read(0x400, &mut data));
        assert!(!bus.write(u64::MAX, &data));
        assert_eq!(data, [0xaa; 2]);
        assert!(!Bus::new().read(0, &mut data));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Probe::default()));
        bus.insert(dev(), 0x1000, 0x100).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x10ff, 1),
            Err(BusError::Overlap {
                new: 0x10ff,
                new_len: 1,
                old: 0x1000,
                old_len: 0x100
            })
        );
        assert!(bus.insert(dev(), 0xf00, 0x101).is_err());
        assert_eq!(bus.insert(dev(), 0x2000, 0), Err(BusError::Empty(0x2000)));
        // Adjacent ranges are fine, and so is the very top of the address space.
        bus.insert(dev(), 0x1100, 0x100).unwrap();
        bus.insert(dev(), u64::MAX - 1, 2).unwrap();
        assert_eq!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::Wraps(u64::MAX, 2))
        );
        assert!(bus.write(u64::MAX, &[1]));
    }
}
