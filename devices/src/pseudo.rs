//! Pseudo devices: MMIO windows that are not hardware but a way for the guest to tell the VMM
//! something. The boot timer is Firecracker's: with `--boot-timer`, the guest's init writes the
//! byte 123 to the first MMIO window (0xd000_0000 on x86_64) when it is up, and the VMM logs how
//! long the boot took.

use crate::bus::BusDevice;

/// The byte that says the guest has booted (Firecracker's `MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE`).
pub const BOOT_COMPLETE: u8 = 123;

/// The boot timer: calls its hook when the guest writes [`BOOT_COMPLETE`] at offset 0 as one
/// byte; every other access is ignored (reads see zeros).
pub struct BootTimer {
    on_boot: Box<dyn FnMut() + Send>,
}

impl BootTimer {
    /// A boot timer that calls `on_boot` (on the vCPU thread that wrote) each time the guest
    /// signals.
    pub fn new(on_boot: Box<dyn FnMut() + Send>) -> Self {
        Self { on_boot }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data == [BOOT_COMPLETE] {
            (self.on_boot)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn only_one_byte_of_123_at_offset_0_counts() {
        let hits = Arc::new(AtomicU32::new(0));
        let seen = hits.clone();
        let mut t = BootTimer::new(Box::new(move || {
            seen.fetch_add(1, Ordering::Relaxed);
        }));
        t.write(0, &[122]);
        t.write(1, &[123]);
        t.write(0, &[123, 0]);
        assert_eq!(hits.load(Ordering::Relaxed), 0);
        t.write(0, &[123]);
        assert_eq!(hits.load(Ordering::Relaxed), 1);
        let mut buf = [0xffu8; 4];
        t.read(0, &mut buf);
        assert_eq!(buf, [0; 4]);
    }
}
