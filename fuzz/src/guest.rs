//! A guest as a device fuzz target sees it: guest memory filled from the input, split-ring queues
//! laid out at fixed places in it (their contents, avail index included, are the input's), and
//! the device's event handler run the way the VMM's loop runs it.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kiln_devices::GuestMemoryMmap;
use kiln_devices::virtio::{Queue, VirtioDevice};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

/// Bytes of guest memory a device target gets.
pub const MEM_SIZE: usize = 0x2_0000;
/// Where queue `i`'s rings start: descriptor table, avail ring 4 KiB on, used ring 8 KiB on.
pub const fn queue_base(i: usize) -> u64 {
    (i as u64) * 0x3000
}

/// Guest memory with `data` copied to its start (the rest zero).
pub struct Memory(pub GuestMemoryMmap);

impl Memory {
    /// Memory of [`MEM_SIZE`] bytes holding `data` from address 0.
    pub fn new(data: &[u8]) -> Memory {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .expect("guest memory for fuzzing");
        let n = data.len().min(MEM_SIZE);
        mem.write_slice(&data[..n], GuestAddress(0))
            .expect("within guest memory");
        Memory(mem)
    }

    /// `count` ready queues of `size` (a power of two up to 256) at [`queue_base`].
    pub fn queues(&self, count: usize, size: u16) -> Vec<Queue> {
        (0..count)
            .map(|i| {
                let mut q = Queue::new(256).expect("a queue of 256");
                q.set_size(size);
                let base = queue_base(i);
                q.set_desc_table_address(Some(base as u32), Some(0));
                q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
                q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
                q.set_ready(true);
                q
            })
            .collect()
    }
}

/// A queue size from one input byte: a power of two from 1 to 256.
pub fn queue_size(byte: u8) -> u16 {
    1 << (byte % 9)
}

/// Runs `device`'s event handler, as the VMM loop does, until nothing is ready (at most `passes`
/// rounds: a handler that keeps re-signalling itself is bounded by its budget, not by this).
pub fn drive<T: MutEventSubscriber + Send + 'static>(device: Arc<Mutex<T>>, passes: usize) {
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().expect("an event manager");
    em.add_subscriber(device);
    for _ in 0..passes {
        match em.run_with_timeout(0) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Activates `device` with `count` queues of `size` laid out in `mem`, signals each queue as if
/// the guest had notified it, and runs the handler as [`drive`] does; a device that refuses the
/// activation (as it may, for the input's choices) is left at that.
pub fn activate_and_drive<T>(mut device: T, mem: &Memory, count: usize, size: u16)
where
    T: VirtioDevice + MutEventSubscriber + Send + 'static,
{
    if device
        .activate(mem.0.clone(), mem.queues(count, size))
        .is_err()
    {
        return;
    }
    for evt in device.queue_events() {
        let _ = evt.write(1);
    }
    drive(Arc::new(Mutex::new(device)), 64);
}
