//! Used buffers handed back together. `virtio-queue`'s `add_used` moves the used ring's index after
//! each element, so a driver reading the ring meanwhile (on another vCPU, or while the device's
//! thread is preempted) can see the first buffers of a frame without the rest. With mergeable
//! receive buffers Linux reads the frame's `num_buffers` from the first one, finds the others
//! missing, drops the frame (`rx_length_errors`) and then takes the rest for frames of their own.
//! [`publish`] writes every element first and moves the index once, as QEMU's `virtqueue_flush`
//! does; [`needs_notification`] is the EVENT_IDX test over what a walk published, since
//! `virtio-queue`'s own test counts only its `add_used` calls.

use std::num::Wrapping;
use std::sync::atomic::{Ordering, fence};

use virtio_queue::{Error, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::{GuestMemoryMmap, Queue};

/// Bytes before the used ring's elements: `flags` and `idx`.
const USED_HEADER: u64 = 4;
/// Bytes of one used element: `id` and `len`.
const USED_ELEM: u64 = 8;
/// Where the used ring's `idx` sits.
const USED_IDX: u64 = 2;
/// Bytes before the available ring's elements: `flags` and `idx`.
const AVAIL_HEADER: u64 = 4;

/// Hands `used` (head index, bytes written) back to the driver in order, all visible at once.
pub fn publish(queue: &mut Queue, mem: &GuestMemoryMmap, used: &[(u16, u32)]) -> Result<(), Error> {
    if used.is_empty() {
        return Ok(());
    }
    let size = queue.size();
    let ring = GuestAddress(queue.used_ring());
    let mut next = Wrapping(queue.next_used());
    for &(head, len) in used {
        if head >= size {
            return Err(Error::InvalidDescriptorIndex);
        }
        let offset = USED_HEADER + u64::from(next.0 % size) * USED_ELEM;
        let addr = ring.checked_add(offset).ok_or(Error::AddressOverflow)?;
        let mut elem = [0u8; USED_ELEM as usize];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr).map_err(Error::GuestMemory)?;
        next += 1;
    }
    let idx = ring.checked_add(USED_IDX).ok_or(Error::AddressOverflow)?;
    // Release: the elements are in memory before the index that shows them.
    mem.store(u16::to_le(next.0), idx, Ordering::Release)
        .map_err(Error::GuestMemory)?;
    queue.set_next_used(next.0);
    Ok(())
}

/// Whether the driver wants an interrupt for what was published since the used index was
/// `since`: always without EVENT_IDX, else when its `used_event` lies in what was published
/// (the same test as Linux's `vring_need_event`).
pub fn needs_notification(queue: &Queue, mem: &GuestMemoryMmap, since: u16) -> Result<bool, Error> {
    // The index stored before the driver's event is read; the driver orders the two the other
    // way round, so at least one of them sees what the other wrote.
    fence(Ordering::SeqCst);
    if !queue.event_idx_enabled() {
        return Ok(true);
    }
    let offset = AVAIL_HEADER + 2 * u64::from(queue.size());
    let addr = GuestAddress(queue.avail_ring())
        .checked_add(offset)
        .ok_or(Error::AddressOverflow)?;
    let used_event = Wrapping(u16::from_le(
        mem.load(addr, Ordering::Relaxed)
            .map_err(Error::GuestMemory)?,
    ));
    let new = Wrapping(queue.next_used());
    Ok(new - used_event - Wrapping(1) < new - Wrapping(since))
}

/// A used ring as the tests' pretend driver reads it, at an address they chose: `virtio-queue`'s
/// `MockSplitQueue` puts its used ring after the available ring's first `size` bytes, which is
/// inside that ring (its entries are two bytes each), so the device's used entries would overwrite
/// the driver's available ones. Tests place the used ring themselves with [`TestRing::place`].
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct TestRing {
    /// Guest address of the used ring.
    pub addr: u64,
    /// Entries in it.
    pub size: u16,
}

#[cfg(test)]
impl TestRing {
    /// Points `queue`'s used ring at `addr`.
    pub fn place(queue: &mut Queue, addr: u64) -> TestRing {
        queue.set_used_ring_address(Some(addr as u32), Some((addr >> 32) as u32));
        TestRing {
            addr,
            size: queue.size(),
        }
    }

    /// A ready queue of `size` entries alone in fresh memory: descriptors at 0, the available
    /// ring at [`TestRing::AVAIL`], the used ring at [`TestRing::USED`].
    pub fn queue(size: u16) -> (GuestMemoryMmap, Queue, TestRing) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut queue = Queue::new(size).unwrap();
        queue.set_desc_table_address(Some(0), Some(0));
        queue.set_avail_ring_address(Some(Self::AVAIL as u32), Some(0));
        let ring = TestRing::place(&mut queue, Self::USED);
        queue.set_ready(true);
        (mem, queue, ring)
    }

    /// Where [`TestRing::queue`] puts the available ring.
    pub const AVAIL: u64 = 0x1000;
    /// Where [`TestRing::queue`] puts the used ring.
    pub const USED: u64 = 0x2000;

    /// Sets the driver's available index (its buffers' heads are not written).
    pub fn set_avail_idx(mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(Self::AVAIL + 2))
            .unwrap();
    }

    /// Sets the driver's `used_event`, after its available ring of `size` entries.
    pub fn set_used_event(mem: &GuestMemoryMmap, size: u16, at: u16) {
        let addr = GuestAddress(Self::AVAIL + AVAIL_HEADER + 2 * u64::from(size));
        mem.write_obj(at.to_le(), addr).unwrap();
    }

    /// The used index.
    pub fn idx(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.addr + USED_IDX)).unwrap())
    }

    /// The used entry at position `at` (taken modulo the size): (head index, length).
    pub fn entry(&self, mem: &GuestMemoryMmap, at: u16) -> (u16, u32) {
        let elem = self.addr + USED_HEADER + u64::from(at % self.size) * USED_ELEM;
        let id: u32 = mem.read_obj(GuestAddress(elem)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(elem + 4)).unwrap();
        (u32::from_le(id) as u16, u32::from_le(len))
    }

    /// `avail_event`, after the used entries: the driver notifies once its index passes it.
    pub fn avail_event(&self, mem: &GuestMemoryMmap) -> u16 {
        let at = self.addr + USED_HEADER + u64::from(self.size) * USED_ELEM;
        u16::from_le(mem.read_obj(GuestAddress(at)).unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u16 = 16;

    fn setup() -> (GuestMemoryMmap, Queue, TestRing) {
        TestRing::queue(SIZE)
    }

    fn used_event(mem: &GuestMemoryMmap, at: u16) {
        TestRing::set_used_event(mem, SIZE, at);
    }

    #[test]
    fn a_batch_lands_in_order_and_moves_the_index_once_across_the_ring_end() {
        let (mem, mut queue, ring) = setup();
        queue.set_next_used(SIZE - 2);
        publish(&mut queue, &mem, &[(3, 100), (7, 4096), (1, 12)]).unwrap();
        assert_eq!(queue.next_used(), SIZE + 1);
        assert_eq!(ring.idx(&mem), SIZE + 1);
        let seen: Vec<(u16, u32)> = [SIZE - 2, SIZE - 1, SIZE]
            .iter()
            .map(|&at| ring.entry(&mem, at))
            .collect();
        assert_eq!(seen, [(3, 100), (7, 4096), (1, 12)]);
    }

    #[test]
    fn a_head_outside_the_queue_publishes_nothing() {
        let (mem, mut queue, ring) = setup();
        let err = publish(&mut queue, &mem, &[(2, 10), (SIZE, 10)]).unwrap_err();
        assert!(matches!(err, Error::InvalidDescriptorIndex), "{err:?}");
        assert_eq!(queue.next_used(), 0);
        assert_eq!(ring.idx(&mem), 0);
    }

    #[test]
    fn the_driver_hears_of_a_batch_only_when_its_used_event_is_in_it() {
        let (mem, mut queue, _) = setup();
        // Without EVENT_IDX every batch is heard of.
        publish(&mut queue, &mem, &[(0, 1)]).unwrap();
        assert!(needs_notification(&queue, &mem, 0).unwrap());
        queue.set_event_idx(true);
        // The driver asks to hear once the device used entry 3 (the index moves past 3).
        used_event(&mem, 3);
        let since = queue.next_used();
        publish(&mut queue, &mem, &[(1, 1), (2, 1)]).unwrap(); // entries 1 and 2
        assert!(!needs_notification(&queue, &mem, since).unwrap());
        let since = queue.next_used();
        publish(&mut queue, &mem, &[(3, 1), (4, 1)]).unwrap(); // entries 3 and 4
        assert!(needs_notification(&queue, &mem, since).unwrap());
        let since = queue.next_used();
        publish(&mut queue, &mem, &[(5, 1)]).unwrap(); // past it: already heard of
        assert!(!needs_notification(&queue, &mem, since).unwrap());
        // Across the 16-bit wrap.
        queue.set_next_used(u16::MAX - 1);
        used_event(&mem, u16::MAX);
        let since = queue.next_used();
        publish(&mut queue, &mem, &[(5, 1), (6, 1), (7, 1)]).unwrap();
        assert_eq!(queue.next_used(), 1);
        assert!(needs_notification(&queue, &mem, since).unwrap());
    }
}
