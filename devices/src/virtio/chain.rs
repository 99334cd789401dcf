//! Walking a descriptor chain as Kiln's devices accept it. `virtio-queue`'s iterator follows
//! INDIRECT descriptors whatever was negotiated and quietly stops at a loop or past 4 GiB; the
//! block, vsock and balloon devices offer neither VIRTIO_F_INDIRECT_DESC nor chains longer than
//! the queue, so a chain of theirs that uses them is a driver bug (or a hostile guest) and is
//! refused by name, for the device to answer with an error status or DEVICE_NEEDS_RESET. (The
//! network device offers INDIRECT and walks its chains with the iterator: a frame is bytes the
//! guest owns either way, and a chain cut short at a loop is a short frame.)

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress};

use super::GuestMemoryMmap;

/// Bytes of one split-ring descriptor.
const DESC_SIZE: u64 = 16;

/// Why a chain is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A descriptor asks for an indirect table, a feature the device never offered.
    #[error("descriptor {index} is INDIRECT, which was not negotiated")]
    Indirect {
        /// The descriptor's index in its table.
        index: u16,
    },
    /// A `next` index (or the head) past the end of the table.
    #[error("descriptor index {index} is outside a queue of {size}")]
    OutOfRange {
        /// The index.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// More descriptors than the queue has: the chain loops.
    #[error("the chain from descriptor {head} is longer than the queue ({size}): it loops")]
    Loop {
        /// The chain's head.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// The buffers add up to more than 4 GiB (virtio 1.2, 2.7.5.2).
    #[error("the chain from descriptor {head} is longer than 4 GiB")]
    TooLong {
        /// The chain's head.
        head: u16,
    },
    /// The descriptor table is not in guest memory.
    #[error("descriptor {index} at {addr:#x} is outside guest memory")]
    Memory {
        /// The descriptor's index.
        index: u16,
        /// Its guest-physical address.
        addr: u64,
    },
}

/// Why a device stopped serving a queue: the driver broke the rings or a chain. Either way the
/// device needs a reset.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The rings (a lying avail index, say).
    #[error("{0:?}")]
    Queue(virtio_queue::Error),
    /// A chain that uses INDIRECT, loops, or points outside its table.
    #[error("{0}")]
    Chain(#[from] ChainError),
}

impl From<virtio_queue::Error> for QueueError {
    fn from(e: virtio_queue::Error) -> Self {
        QueueError::Queue(e)
    }
}

/// The descriptors of the chain starting at `head` in the table at `table` of a queue of
/// `size`, in order; refuses indirect descriptors, loops, out-of-range indices and chains over
/// 4 GiB.
pub fn walk(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> Result<Vec<Descriptor>, ChainError> {
    let mut out = Vec::new();
    let mut index = head;
    let mut total = 0u32;
    loop {
        if index >= size {
            return Err(ChainError::OutOfRange { index, size });
        }
        let addr = table
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(ChainError::Memory {
                index,
                addr: table.raw_value(),
            })?;
        let desc: Descriptor = mem.read_obj(addr).map_err(|_| ChainError::Memory {
            index,
            addr: addr.raw_value(),
        })?;
        if desc.flags() & VRING_DESC_F_INDIRECT as u16 != 0 {
            return Err(ChainError::Indirect { index });
        }
        total = total
            .checked_add(desc.len())
            .ok_or(ChainError::TooLong { head })?;
        out.push(desc);
        if !desc.has_next() {
            return Ok(out);
        }
        if out.len() >= usize::from(size) {
            return Err(ChainError::Loop { head, size });
        }
        index = desc.next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn err(r: Result<Vec<Descriptor>, ChainError>) -> ChainError {
        r.expect_err("the chain is refused")
    }

    fn raw(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
    }

    #[test]
    fn a_plain_chain_is_returned_in_order() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let chain = vq
            .build_desc_chain(&[raw(0x1000, 16, 0, 0), raw(0x2000, 1, VRING_DESC_F_WRITE, 0)])
            .unwrap();
        let descs = walk(&m, vq.desc_table_addr(), 16, chain.head_index()).unwrap();
        assert_eq!(descs.len(), 2);
        assert_eq!((descs[0].addr().0, descs[1].len()), (0x1000, 1));
        assert!(descs[1].is_write_only());
    }

    #[test]
    fn indirect_loops_ranges_and_giant_chains_are_refused() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let table = vq.desc_table();
        let at = vq.desc_table_addr();
        // An indirect descriptor at the head, and one behind a plain head.
        table
            .store(0, raw(0x3000, 32, VRING_DESC_F_INDIRECT, 0))
            .unwrap();
        assert_eq!(err(walk(&m, at, 16, 0)), ChainError::Indirect { index: 0 });
        table
            .store(1, raw(0x1000, 16, VRING_DESC_F_NEXT, 0))
            .unwrap();
        assert_eq!(err(walk(&m, at, 16, 1)), ChainError::Indirect { index: 0 });
        // Two descriptors pointing at each other.
        table
            .store(2, raw(0x1000, 16, VRING_DESC_F_NEXT, 3))
            .unwrap();
        table
            .store(3, raw(0x1000, 16, VRING_DESC_F_NEXT, 2))
            .unwrap();
        assert_eq!(
            err(walk(&m, at, 16, 2)),
            ChainError::Loop { head: 2, size: 16 }
        );
        // A next index past the table, and a head past it.
        table
            .store(4, raw(0x1000, 16, VRING_DESC_F_NEXT, 99))
            .unwrap();
        assert_eq!(
            err(walk(&m, at, 16, 4)),
            ChainError::OutOfRange {
                index: 99,
                size: 16
            }
        );
        assert!(matches!(
            walk(&m, at, 16, 16),
            Err(ChainError::OutOfRange { .. })
        ));
        // Two 3 GiB buffers.
        table
            .store(5, raw(0x1000, 3 << 30, VRING_DESC_F_NEXT, 6))
            .unwrap();
        table.store(6, raw(0x1000, 3 << 30, 0, 0)).unwrap();
        assert_eq!(err(walk(&m, at, 16, 5)), ChainError::TooLong { head: 5 });
        // A table outside guest memory.
        assert!(matches!(
            walk(&m, GuestAddress(u64::MAX - 8), 16, 0),
            Err(ChainError::Memory { .. })
        ));
    }
}
