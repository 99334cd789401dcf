//! Test helpers: a pretend guest driving a real `Balloon` through `MockSplitQueue`s and a real
//! event manager, and a [`GuestPages`] that records what it was asked to discard.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::device::{DEFLATEQ, INFLATEQ};
use super::{Balloon, BalloonConfig, DiscardError, GuestPages};
use crate::virtio::GuestMemoryMmap;
use crate::virtio::device::VirtioDevice;

/// Guest memory of the test guests: 16 MiB at 0 and 4 MiB at 32 MiB (a gap between).
pub const LOW_MIB: u64 = 16;
/// Start of the second region.
pub const HIGH_START: u64 = 32 << 20;
/// Size of the second region.
pub const HIGH_LEN: u64 = 4 << 20;
/// Buffers the test guest fills start here (the rings sit below).
const BUF_BASE: u64 = 0x10_0000;
const BUF_SLOT: u64 = 0x1_0000;
const RING_SIZE: u16 = 256;

/// A configuration with these values.
pub fn config(
    amount_mib: u32,
    deflate_on_oom: bool,
    stats_s: u16,
    reporting: bool,
) -> BalloonConfig {
    BalloonConfig {
        amount_mib,
        deflate_on_oom,
        stats_polling_interval_s: stats_s,
        free_page_reporting: reporting,
    }
}

/// Records the ranges it was given; optionally fails.
#[derive(Default)]
pub struct Recorder {
    pub ranges: Mutex<Vec<Range<u64>>>,
    pub calls: Mutex<usize>,
    pub fail: bool,
}

impl Recorder {
    pub fn taken(&self) -> Vec<Range<u64>> {
        self.ranges.lock().unwrap().clone()
    }
}

impl GuestPages for Recorder {
    fn discard(&self, ranges: &[Range<u64>]) -> Result<u64, DiscardError> {
        *self.calls.lock().unwrap() += 1;
        if self.fail {
            return Err(DiscardError {
                range: ranges[0].clone(),
                err: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        self.ranges.lock().unwrap().extend(ranges.iter().cloned());
        Ok(ranges.iter().map(|r| r.end - r.start).sum())
    }
}

pub fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// A guest with an activated balloon, its queues in `mem`, run by a real event manager.
pub struct TestGuest {
    pub mem: &'static GuestMemoryMmap,
    pub balloon: Arc<Mutex<Balloon>>,
    pub em: EventManager<Arc<Mutex<Balloon>>>,
    pub queues: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
    pub pages: Arc<Recorder>,
    next_desc: Vec<u16>,
    next_buf: u64,
    seen_used: Vec<u16>,
}

impl TestGuest {
    pub fn new(cfg: BalloonConfig) -> Self {
        Self::with_pages(cfg, Recorder::default())
    }

    pub fn with_pages(cfg: BalloonConfig, pages: Recorder) -> Self {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), (LOW_MIB << 20) as usize),
                (GuestAddress(HIGH_START), HIGH_LEN as usize),
            ])
            .unwrap(),
        ));
        let pages = Arc::new(pages);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = Balloon::new(cfg, LOW_MIB + (HIGH_LEN >> 20), pages.clone(), irq).unwrap();
        let count = dev.queue_max_sizes().len();
        let queues: Vec<_> = (0..count)
            .map(|i| MockSplitQueue::create(mem, GuestAddress(i as u64 * 0x1_0000), RING_SIZE))
            .collect();
        let vqs = queues.iter().map(|q| q.create_queue().unwrap()).collect();
        dev.activate(mem.clone(), vqs).unwrap();
        let balloon = Arc::new(Mutex::new(dev));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(balloon.clone());
        let mut g = Self {
            mem,
            balloon,
            em,
            queues,
            pages,
            next_desc: vec![0; count],
            next_buf: BUF_BASE,
            seen_used: vec![0; count],
        };
        g.poll();
        g
    }

    pub fn dev(&self) -> MutexGuard<'_, Balloon> {
        self.balloon.lock().unwrap()
    }

    /// Runs the event loop until it has nothing more to do.
    pub fn poll(&mut self) {
        for _ in 0..1000 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
    }

    pub fn kick(&mut self, q: usize) {
        self.dev().queue_events()[q].write(1).unwrap();
        self.poll();
    }

    /// A fresh buffer of `len` bytes holding `bytes`.
    fn buffer(&mut self, bytes: &[u8], len: u64) -> u64 {
        let addr = self.next_buf;
        self.next_buf += len.max(1).next_multiple_of(BUF_SLOT);
        assert!(self.next_buf < LOW_MIB << 20, "test buffers ran out");
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        addr
    }

    /// Puts `descs` (their `next` fields set here) on queue `q` without notifying; returns the
    /// head index.
    pub fn add_chain(&mut self, q: usize, descs: &[(u64, u32, u32)]) -> u16 {
        let head = self.next_desc[q];
        let raw: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                let next = head + i as u16 + 1;
                let flags = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT
                };
                desc(addr, len, flags, if last { 0 } else { next })
            })
            .collect();
        self.queues[q].add_desc_chains(&raw, head).unwrap();
        self.next_desc[q] = (head + descs.len() as u16) % RING_SIZE;
        head
    }

    fn pfn_chain(&mut self, q: usize, pfns: &[u32]) -> u16 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        let addr = self.buffer(&bytes, bytes.len() as u64);
        let head = self.add_chain(q, &[(addr, bytes.len() as u32, 0)]);
        self.kick(q);
        head
    }

    /// Sends `pfns` on the inflate queue.
    pub fn inflate(&mut self, pfns: &[u32]) -> u16 {
        self.pfn_chain(INFLATEQ, pfns)
    }

    /// Sends `pfns` on the deflate queue.
    pub fn deflate(&mut self, pfns: &[u32]) -> u16 {
        self.pfn_chain(DEFLATEQ, pfns)
    }

    /// Reports the free blocks `(address, length)`.
    pub fn report(&mut self, blocks: &[(u64, u32)]) -> u16 {
        let q = self.dev().index.reporting.expect("reporting is on");
        let descs: Vec<_> = blocks
            .iter()
            .map(|&(a, l)| (a, l, VRING_DESC_F_WRITE))
            .collect();
        let head = self.add_chain(q, &descs);
        self.kick(q);
        head
    }

    /// Puts a stats buffer with `entries` on the stats queue.
    pub fn send_stats(&mut self, entries: &[(u16, u64)]) -> u16 {
        let q = self.dev().index.stats.expect("stats are on");
        let bytes: Vec<u8> = entries
            .iter()
            .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
            .collect();
        let addr = self.buffer(&bytes, bytes.len() as u64);
        let head = self.add_chain(q, &[(addr, bytes.len() as u32, 0)]);
        self.kick(q);
        head
    }

    /// The head the stats queue's buffer had (the device holds it).
    pub fn stats_head(&self) -> u16 {
        self.dev().stats_desc.expect("a stats buffer is held")
    }

    /// The (head, length) entries queue `q` used since the last call.
    pub fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let idx = self.queues[q].used().idx().load();
        let mut out = Vec::new();
        while self.seen_used[q] != idx {
            let e = self.queues[q]
                .used()
                .ring()
                .ref_at(usize::from(self.seen_used[q] % RING_SIZE))
                .unwrap()
                .load();
            out.push((e.id(), e.len()));
            self.seen_used[q] = self.seen_used[q].wrapping_add(1);
        }
        out
    }

    /// Whether the device still works (no NEEDS_RESET).
    pub fn healthy(&self) -> bool {
        !self.dev().interrupt().needs_reset()
    }
}
