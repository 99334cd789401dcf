//! A pretend guest driving a real `Net` through `MockSplitQueue`s and a real event manager, with
//! a datagram socket pair standing in for the TAP (the test holds the host's end) and a fake
//! clock under the rate limiters.

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{HDR_LEN, Net, NetConfig, RXQ, TXQ, Tap, features};
use crate::rate_limiter::{FakeClock, RateLimiterConfig};
use crate::virtio::device::VirtioDevice;
use crate::virtio::used::TestRing;
use crate::virtio::{GuestMemoryMmap, VIRTIO_F_VERSION_1};

/// The queue size the test driver picks: more than the budget, so a walk can stop at it.
pub const QSIZE: u16 = 512;
const RX_BASE: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x1_0000;
const TX_BASE: u64 = 0x300_0000;
const TX_SLOT: u64 = 0x1_1000;
const INDIRECT_BASE: u64 = 0x560_0000;
const INDIRECT_SLOT: u64 = 0x400;
/// Guest memory size.
pub const MEM_SIZE: usize = 0x600_0000;
/// Where the used rings go ([`TestRing`]), past each queue's available ring.
const USED_RINGS: [u64; 2] = [0x4000, 0x1_4000];

/// The MAC the test device gives its guest.
pub const MAC: [u8; 6] = [6, 0, 0xac, 0x10, 0, 2];

/// A 12-byte vnet header: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VnetHdr {
    pub fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    pub fn parse(b: &[u8]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }
}

/// An Ethernet frame of `len` bytes whose bytes count up from `seed`.
pub fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// A guest with an activated network device.
pub struct TestNet {
    pub mem: &'static GuestMemoryMmap,
    pub net: Arc<Mutex<Net>>,
    pub em: EventManager<Arc<Mutex<Net>>>,
    pub rxq: MockSplitQueue<'static, GuestMemoryMmap>,
    pub txq: MockSplitQueue<'static, GuestMemoryMmap>,
    /// The queues' used rings, indexed like them.
    pub used: [TestRing; 2],
    pub host: UnixDatagram,
    pub clock: FakeClock,
    rx_desc: u16,
    rx_seen: u16,
    tx_desc: u16,
    tx_slot: u64,
}

impl TestNet {
    /// Every offered feature accepted, no limits.
    pub fn new() -> Self {
        Self::new_with(
            Some(MAC),
            RateLimiterConfig::default(),
            RateLimiterConfig::default(),
        )
    }

    /// Every offered feature accepted, with these limits.
    pub fn new_with(mac: Option<[u8; 6]>, rx: RateLimiterConfig, tx: RateLimiterConfig) -> Self {
        Self::build(mac, rx, tx, |offered| offered, true)
    }

    /// Accepting only what `accept` keeps of the offered features (VERSION_1 always), with
    /// EVENT_IDX on the queues or not.
    pub fn build(
        mac: Option<[u8; 6]>,
        rx: RateLimiterConfig,
        tx: RateLimiterConfig,
        accept: impl Fn(u64) -> u64,
        event_idx: bool,
    ) -> Self {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let rxq = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
        let txq = MockSplitQueue::create(mem, GuestAddress(0x1_0000), QSIZE);
        let (tap, host) = Self::tap_pair();
        let clock = FakeClock::new();
        let cfg = NetConfig {
            id: "eth0".into(),
            host_dev_name: "test-tap".into(),
            guest_mac: mac,
            rx_rate_limiter: rx,
            tx_rate_limiter: tx,
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = Net::with_tap(cfg, tap, irq, Arc::new(clock.clone())).unwrap();
        let offered = dev.avail_features();
        dev.set_acked_features(accept(offered) | (1 << VIRTIO_F_VERSION_1));
        let mut queues: Vec<virtio_queue::Queue> =
            vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()];
        for q in &mut queues {
            virtio_queue::QueueT::set_event_idx(q, event_idx);
        }
        let used = [
            TestRing::place(&mut queues[RXQ], USED_RINGS[RXQ]),
            TestRing::place(&mut queues[TXQ], USED_RINGS[TXQ]),
        ];
        dev.activate(mem.clone(), queues).unwrap();
        let net = Arc::new(Mutex::new(dev));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(net.clone());
        let mut t = Self {
            mem,
            net,
            em,
            rxq,
            txq,
            used,
            host,
            clock,
            rx_desc: 0,
            rx_seen: 0,
            tx_desc: 0,
            tx_slot: 0,
        };
        t.run();
        t
    }

    /// A TAP stand-in and the host's end of it.
    pub fn tap_pair() -> (Tap, UnixDatagram) {
        let (dev, host) = UnixDatagram::pair().unwrap();
        host.set_nonblocking(true).unwrap();
        // Room for many 64 KiB frames in flight.
        for fd in [&dev, &host] {
            let size: libc::c_int = 8 << 20;
            // SAFETY: setsockopt reads one int from the valid pointer.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(fd),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        (Tap::from_socket(dev), host)
    }

    pub fn dev(&self) -> MutexGuard<'_, Net> {
        self.net.lock().unwrap()
    }

    /// Runs the event loop until it has nothing more to do; returns how many events it handled.
    pub fn run(&mut self) -> usize {
        let mut total = 0;
        for _ in 0..1000 {
            match self.em.run_with_timeout(0).unwrap() {
                0 => return total,
                n => total += n,
            }
        }
        panic!("the event loop never went quiet");
    }

    /// Runs one round of the event loop (one epoll wait); returns how many events it handled.
    pub fn run_once(&mut self) -> usize {
        self.em.run_with_timeout(0).unwrap()
    }

    fn kick(&self, queue: usize) {
        self.dev().queue_events()[queue].write(1).unwrap();
    }

    /// Makes `head` available on `q` (the mock's own helper does not wrap the ring index).
    fn publish(q: &MockSplitQueue<'static, GuestMemoryMmap>, head: u16) {
        let idx = q.avail().idx().load();
        q.avail()
            .ring()
            .ref_at(usize::from(idx % QSIZE))
            .unwrap()
            .store(head.to_le());
        q.avail().idx().store(idx.wrapping_add(1));
    }

    /// Writes `hdr` and `frame` into the next transmit slot; the pieces they are split into at
    /// `cuts` (offsets into header + frame), as (address, length).
    fn tx_pieces(&mut self, hdr: VnetHdr, frame: &[u8], cuts: &[usize]) -> Vec<(u64, u32)> {
        let mut bytes = hdr.bytes().to_vec();
        bytes.extend_from_slice(frame);
        let slot = self.tx_slot % u64::from(QSIZE);
        let addr = TX_BASE + slot * TX_SLOT;
        self.tx_slot += 1;
        self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().copied().filter(|c| *c > 0 && *c < bytes.len()));
        bounds.push(bytes.len());
        bounds
            .windows(2)
            .map(|w| (addr + w[0] as u64, (w[1] - w[0]) as u32))
            .collect()
    }

    /// Queues a transmit chain: `hdr` and `frame` split into descriptors at `cuts` (offsets into
    /// header + frame), without notifying.
    pub fn queue_tx_split(&mut self, hdr: VnetHdr, frame: &[u8], cuts: &[usize]) {
        let pieces = self.tx_pieces(hdr, frame, cuts);
        let head = self.tx_desc;
        for (i, &(addr, len)) in pieces.iter().enumerate() {
            let index = self.tx_desc;
            self.tx_desc = (self.tx_desc + 1) % QSIZE;
            let flags = if i + 1 == pieces.len() {
                0
            } else {
                VRING_DESC_F_NEXT
            };
            let d = desc(addr, len, flags, self.tx_desc);
            self.txq.desc_table().store(index, d).unwrap();
        }
        Self::publish(&self.txq, head);
    }

    /// Queues a transmit chain as Linux does with VIRTIO_RING_F_INDIRECT_DESC: one descriptor in
    /// the ring pointing to a table (in guest memory) of the pieces split at `cuts`.
    pub fn queue_tx_indirect(&mut self, hdr: VnetHdr, frame: &[u8], cuts: &[usize]) {
        let slot = self.tx_slot % u64::from(QSIZE);
        let pieces = self.tx_pieces(hdr, frame, cuts);
        let table = INDIRECT_BASE + slot * INDIRECT_SLOT;
        for (i, &(addr, len)) in pieces.iter().enumerate() {
            let flags = if i + 1 == pieces.len() {
                0
            } else {
                VRING_DESC_F_NEXT
            };
            let d = desc(addr, len, flags, (i + 1) as u16);
            self.mem
                .write_obj(d, GuestAddress(table + i as u64 * 16))
                .unwrap();
        }
        self.queue_tx_raw(&[(table, pieces.len() as u32 * 16, VRING_DESC_F_INDIRECT)]);
    }

    /// Queues raw descriptors as one transmit chain (for malformed chains).
    pub fn queue_tx_raw(&mut self, descs: &[(u64, u32, u32)]) {
        let head = self.tx_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = self.tx_desc;
            self.tx_desc = (self.tx_desc + 1) % QSIZE;
            let next = if i + 1 < descs.len() {
                flags | VRING_DESC_F_NEXT
            } else {
                flags
            };
            self.txq
                .desc_table()
                .store(index, desc(addr, len, next, self.tx_desc))
                .unwrap();
        }
        Self::publish(&self.txq, head);
    }

    /// The guest sends `frame` with an empty header, header and frame in one buffer.
    pub fn guest_sends(&mut self, frame: &[u8]) {
        self.queue_tx_split(VnetHdr::default(), frame, &[]);
        self.kick(TXQ);
        self.run();
    }

    /// Notifies the transmit queue.
    pub fn kick_tx(&mut self) {
        self.kick(TXQ);
    }

    /// Gives the device `n` receive buffers of `size` bytes each, one descriptor a chain, and
    /// notifies it.
    pub fn give_rx(&mut self, n: usize, size: u32) {
        self.add_rx(n, size);
        self.kick_rx();
        self.run();
    }

    /// Notifies the receive queue.
    pub fn kick_rx(&self) {
        self.kick(RXQ);
    }

    /// Makes `n` receive buffers of `size` bytes available without notifying.
    pub fn add_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let index = self.rx_desc;
            self.rx_desc = (self.rx_desc + 1) % QSIZE;
            let addr = RX_BASE + u64::from(index) * RX_SLOT;
            self.mem
                .write_slice(&vec![0xee; size as usize], GuestAddress(addr))
                .unwrap();
            self.rxq
                .desc_table()
                .store(index, desc(addr, size, VRING_DESC_F_WRITE, 0))
                .unwrap();
            Self::publish(&self.rxq, index);
        }
    }

    /// Queues a raw receive chain (for malformed chains) and notifies.
    pub fn give_rx_raw(&mut self, descs: &[(u64, u32, u32)]) {
        let head = self.rx_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = self.rx_desc;
            self.rx_desc = (self.rx_desc + 1) % QSIZE;
            let flags = if i + 1 < descs.len() {
                flags | VRING_DESC_F_NEXT
            } else {
                flags
            };
            self.rxq
                .desc_table()
                .store(index, desc(addr, len, flags, self.rx_desc))
                .unwrap();
        }
        Self::publish(&self.rxq, head);
        self.kick(RXQ);
        self.run();
    }

    /// The host puts a frame (with header) on the TAP.
    pub fn host_sends(&mut self, hdr: VnetHdr, frame: &[u8]) {
        let mut bytes = hdr.bytes().to_vec();
        bytes.extend_from_slice(frame);
        self.host.send(&bytes).unwrap();
    }

    /// Frames (header included) that reached the TAP.
    pub fn host_receives(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Ok(n) = self.host.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    /// Used receive buffers since the last call: (head index, used length).
    pub fn rx_used(&mut self) -> Vec<(u16, u32)> {
        let ring = self.used[RXQ];
        let used = ring.idx(self.mem);
        let mut out = Vec::new();
        while self.rx_seen != used {
            out.push(ring.entry(self.mem, self.rx_seen));
            self.rx_seen = self.rx_seen.wrapping_add(1);
        }
        out
    }

    /// Frames the guest received since the last call, reassembled from their buffers: (header,
    /// frame). Each frame's buffers are checked against its `num_buffers`.
    pub fn guest_receives(&mut self) -> Vec<(VnetHdr, Vec<u8>)> {
        let used = self.rx_used();
        let mut out = Vec::new();
        let mut i = 0;
        while i < used.len() {
            let read = |(id, len): (u16, u32)| {
                let mut b = vec![0u8; len as usize];
                self.mem
                    .read_slice(&mut b, GuestAddress(RX_BASE + u64::from(id) * RX_SLOT))
                    .unwrap();
                b
            };
            let mut bytes = read(used[i]);
            let hdr = VnetHdr::parse(&bytes);
            let count = usize::from(hdr.num_buffers.max(1));
            assert!(
                i + count <= used.len(),
                "num_buffers {count} but only {} buffers used",
                used.len() - i
            );
            for &u in &used[i + 1..i + count] {
                bytes.extend(read(u));
            }
            out.push((hdr, bytes[HDR_LEN..].to_vec()));
            i += count;
        }
        out
    }

    /// How long until the receive limiter's timer fires (zero when it is not set).
    pub fn rx_timer_left(&self) -> std::time::Duration {
        let dev = self.dev();
        // SAFETY: itimerspec is plain data; timerfd_gettime fills it from a valid timerfd.
        let mut spec: libc::itimerspec = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the descriptor is the device's open timerfd.
        let rc = unsafe {
            libc::timerfd_gettime(std::os::fd::AsRawFd::as_raw_fd(&dev.rx_timer), &mut spec)
        };
        assert_eq!(rc, 0);
        std::time::Duration::new(spec.it_value.tv_sec as u64, spec.it_value.tv_nsec as u32)
    }

    /// Makes both limiter timers fire now, as they would once the real time they were set for
    /// has passed (the limiters themselves run on the fake clock).
    pub fn expire_timers(&mut self) {
        {
            let mut dev = self.dev();
            dev.rx_timer
                .reset(std::time::Duration::from_nanos(1), None)
                .unwrap();
            dev.tx_timer
                .reset(std::time::Duration::from_nanos(1), None)
                .unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }

    /// The transmit queue's used index.
    pub fn tx_used(&self) -> u16 {
        self.used[TXQ].idx(self.mem)
    }

    /// The receive queue's `avail_event` (after its used ring): the driver notifies once its
    /// available index passes it.
    pub fn rx_avail_event(&self) -> u16 {
        self.used[RXQ].avail_event(self.mem)
    }

    /// Whether the device still works (no NEEDS_RESET).
    pub fn healthy(&self) -> bool {
        !self.dev().interrupt().needs_reset()
    }

    /// Interrupts raised since the last call.
    pub fn interrupts(&self) -> u64 {
        self.dev().interrupt().irqfd().read().unwrap_or(0)
    }
}

/// Features without mergeable receive buffers.
pub fn without_mrg(offered: u64) -> u64 {
    offered & !(1 << features::MRG_RXBUF)
}
