//! Test helpers: packets in plain buffers (for the connection and muxer tests), and a pretend
//! guest driving a real `Vsock` through `MockSplitQueue`s and a real event manager.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::packet::Packet;
use super::{CONN_BUF_SIZE, EVQ, HOST_CID, RXQ, TXQ, TYPE_STREAM, Vsock};
use crate::virtio::GuestMemoryMmap;
use crate::virtio::device::VirtioDevice;
use crate::virtio::used::TestRing;

/// The CID the test guests have.
pub const GUEST_CID: u64 = 42;
const HDR_LEN: usize = 44;

/// A packet header as plain fields, for building and checking packets in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    /// A packet from the test guest's `src_port` to the host's `dst_port`.
    pub fn guest(op: u16, src_port: u32, dst_port: u32) -> Self {
        Self {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: 0,
        }
    }

    pub fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn parse(b: &[u8]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// A packet in ordinary memory.
pub struct PktBuf {
    hdr: [u8; HDR_LEN],
    data: Option<Vec<u8>>,
}

impl PktBuf {
    /// A guest packet with header `h` (its `len` set from `data`).
    pub fn tx(mut h: Hdr, data: &[u8]) -> Self {
        h.len = data.len() as u32;
        Self {
            hdr: h.bytes(),
            data: (!data.is_empty()).then(|| data.to_vec()),
        }
    }

    /// An rx buffer with room for `room` payload bytes.
    pub fn rx(room: usize) -> Self {
        Self {
            hdr: [0xee; HDR_LEN],
            data: Some(vec![0; room]),
        }
    }

    /// The packet over these buffers.
    pub fn packet(&mut self) -> Packet<'_, ()> {
        let hdr = self.hdr;
        let data = self.data.as_deref_mut();
        // SAFETY: the buffers belong to `self`, which the packet borrows mutably for its whole
        // life, so they outlive it and nothing else touches them meanwhile.
        let mut pkt = unsafe { Packet::new(&mut self.hdr, data) }.unwrap();
        pkt.set_header_from_raw(&hdr).unwrap();
        pkt
    }

    /// The header as it is now (after the device wrote it).
    pub fn header(&self) -> Hdr {
        Hdr::parse(&self.hdr)
    }

    /// The first `len` payload bytes.
    pub fn payload(&self, len: u32) -> Vec<u8> {
        self.data.as_deref().unwrap_or(&[])[..len as usize].to_vec()
    }
}

/// A fresh directory for sockets, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("kiln-vsock-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const RX_BASE: u64 = 0x10_0000;
const TX_BASE: u64 = 0x30_0000;
const EV_BASE: u64 = 0x50_0000;
const SLOT: u64 = 0x2000;
/// Where the used rings go ([`TestRing`]), past each queue's available ring.
const USED_RINGS: [u64; 3] = [0x3000, 0x1_3000, 0x2_3000];
/// Payload room of each rx buffer the test guest provides.
pub const RX_ROOM: u32 = 4096;
/// Largest payload the test guest sends in one packet.
pub const TX_MAX: usize = (SLOT - 0x100) as usize;

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// A guest with an activated vsock device, its queues in `mem`, run by a real event manager.
pub struct TestGuest {
    pub mem: &'static GuestMemoryMmap,
    pub vsock: Arc<Mutex<Vsock>>,
    pub em: EventManager<Arc<Mutex<Vsock>>>,
    pub rxq: MockSplitQueue<'static, GuestMemoryMmap>,
    pub txq: MockSplitQueue<'static, GuestMemoryMmap>,
    pub evq: MockSplitQueue<'static, GuestMemoryMmap>,
    /// The queues' used rings, indexed like them.
    pub used: [TestRing; 3],
    rx_next: u16,
    tx_next: u16,
    rx_seen: u16,
    pub dir: TempDir,
}

impl TestGuest {
    pub fn new() -> Self {
        Self::with_event_idx(false)
    }

    /// A guest that negotiated VIRTIO_RING_F_EVENT_IDX (or not).
    pub fn with_event_idx(event_idx: bool) -> Self {
        let dir = TempDir::new();
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x60_0000)]).unwrap(),
        ));
        let rxq = MockSplitQueue::create(mem, GuestAddress(0), 256);
        let txq = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 256);
        let evq = MockSplitQueue::create(mem, GuestAddress(0x2_0000), 256);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = Vsock::new(GUEST_CID, dir.0.join("v.sock"), irq).unwrap();
        let mut queues: Vec<virtio_queue::Queue> = vec![
            rxq.create_queue().unwrap(),
            txq.create_queue().unwrap(),
            evq.create_queue().unwrap(),
        ];
        for q in &mut queues {
            virtio_queue::QueueT::set_event_idx(q, event_idx);
        }
        let used = [RXQ, TXQ, EVQ].map(|i| TestRing::place(&mut queues[i], USED_RINGS[i]));
        dev.activate(mem.clone(), queues).unwrap();
        let vsock = Arc::new(Mutex::new(dev));
        // The same Arc is the transport's device and the event loop's subscriber.
        let _transport_side: Arc<Mutex<dyn VirtioDevice>> = vsock.clone();
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(vsock.clone());
        let mut g = Self {
            mem,
            vsock,
            em,
            rxq,
            txq,
            evq,
            used,
            rx_next: 0,
            tx_next: 0,
            rx_seen: 0,
            dir,
        };
        g.poll();
        g
    }

    pub fn dev(&self) -> MutexGuard<'_, Vsock> {
        self.vsock.lock().unwrap()
    }

    pub fn uds(&self) -> PathBuf {
        self.dir.0.join("v.sock")
    }

    /// A host process connecting to the device's socket.
    pub fn host_connect(&mut self) -> UnixStream {
        let s = UnixStream::connect(self.uds()).unwrap();
        self.poll();
        s
    }

    /// Runs the event loop until it has nothing more to do.
    pub fn poll(&mut self) {
        for _ in 0..100 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
    }

    fn kick(&mut self, queue: usize) {
        self.dev().queue_events()[queue].write(1).unwrap();
        self.poll();
    }

    /// Puts a packet on the tx queue (header `h`, its `len` from `data`) and notifies the device.
    pub fn send(&mut self, mut h: Hdr, data: &[u8]) {
        assert!(data.len() <= TX_MAX);
        h.len = data.len() as u32;
        self.send_raw(&h.bytes(), data);
    }

    /// Puts raw header bytes and payload on the tx queue and notifies the device.
    pub fn send_raw(&mut self, hdr: &[u8], data: &[u8]) {
        self.queue_tx(hdr, data);
        self.kick(TXQ);
    }

    /// Puts raw header bytes and payload on the tx queue, without notifying the device.
    pub fn queue_tx(&mut self, hdr: &[u8], data: &[u8]) {
        let i = self.tx_next;
        self.tx_next = (i + 2) % 256;
        let addr = TX_BASE + u64::from(i) * SLOT;
        self.mem.write_slice(hdr, GuestAddress(addr)).unwrap();
        self.mem
            .write_slice(data, GuestAddress(addr + 0x100))
            .unwrap();
        let hdr_desc = desc(addr, hdr.len() as u32, 0, 0);
        if data.is_empty() {
            self.txq.add_desc_chains(&[hdr_desc], i).unwrap();
        } else {
            let hdr_desc = desc(addr, hdr.len() as u32, VRING_DESC_F_NEXT, i + 1);
            let data_desc = desc(addr + 0x100, data.len() as u32, 0, 0);
            self.txq.add_desc_chains(&[hdr_desc, data_desc], i).unwrap();
        }
    }

    /// Gives the device `n` rx buffers (header descriptor + [`RX_ROOM`] bytes).
    pub fn give_rx(&mut self, n: usize) {
        for _ in 0..n {
            let i = self.rx_next;
            self.rx_next = (i + 2) % 256;
            let addr = RX_BASE + u64::from(i) * SLOT;
            let descs = [
                desc(
                    addr,
                    HDR_LEN as u32,
                    VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                    i + 1,
                ),
                desc(addr + 0x100, RX_ROOM, VRING_DESC_F_WRITE, 0),
            ];
            self.rxq.add_desc_chains(&descs, i).unwrap();
        }
        self.kick(RXQ);
    }

    /// Packets the device put in rx buffers since the last call.
    pub fn recv(&mut self) -> Vec<(Hdr, Vec<u8>)> {
        let ring = self.used[RXQ];
        let used = ring.idx(self.mem);
        let mut out = Vec::new();
        while self.rx_seen != used {
            let (id, len) = ring.entry(self.mem, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = RX_BASE + u64::from(id) * SLOT;
            let mut hdr = [0u8; HDR_LEN];
            self.mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
            let h = Hdr::parse(&hdr);
            let mut data = vec![0u8; len as usize - HDR_LEN];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + 0x100))
                .unwrap();
            assert_eq!(h.len as usize, data.len(), "used length matches the header");
            out.push((h, data));
        }
        out
    }

    /// Gives the device one event buffer of `len` bytes.
    pub fn give_event_buffer(&mut self, len: u32) {
        self.mem
            .write_obj(0xffff_ffffu32, GuestAddress(EV_BASE))
            .unwrap();
        self.evq
            .add_desc_chains(&[desc(EV_BASE, len, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        self.kick(EVQ);
    }

    /// The (id, used length) of the last used event buffer and the event id in it.
    pub fn last_event(&self) -> Option<(u32, u32)> {
        let ring = self.used[EVQ];
        let (_, len) = ring.entry(self.mem, ring.idx(self.mem).checked_sub(1)?);
        Some((
            len,
            self.mem.read_obj::<u32>(GuestAddress(EV_BASE)).unwrap(),
        ))
    }

    /// Whether the device's queue is still working (no NEEDS_RESET).
    pub fn healthy(&self) -> bool {
        !self.dev().interrupt().needs_reset()
    }
}
