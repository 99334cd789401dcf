//! `io_engine: "Async"` against the host's io_uring: requests stay in flight (not used) until
//! their completions are finished, bytes reach the file and come back, a read's buffers are
//! marked dirty, refusals need no ring, the completion eventfd wakes the loop, a full ring makes
//! the driver wait, and reset and snapshot wait for what is in flight.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::GuestMemoryMmap;
use crate::virtio::block::{Block, BlockConfig, IoEngine, QUEUE_SIZE, SECTOR_SIZE};
use crate::virtio::block::{request_type, status};
use crate::virtio::device::VirtioDevice;

const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;
/// Status bytes start as this, so an untouched one shows.
const UNSET: u8 = 0xee;

/// An `Async` drive of 64 sectors (sector i filled with byte i) over a 16-entry queue.
fn drive(name: &str, read_only: bool) -> (Block, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("kiln-blk-uring-{}-{name}", std::process::id()));
    let mut f = std::fs::File::create(&path).unwrap();
    for i in 0..64u8 {
        f.write_all(&[i; SECTOR_SIZE as usize]).unwrap();
    }
    let cfg = BlockConfig {
        id: "data".into(),
        path: path.clone(),
        cow_overlay: None,
        read_only,
        rate_limiter: Default::default(),
        io_engine: IoEngine::Async,
    };
    let block = Block::new(cfg, EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap();
    (block, path)
}

fn mem() -> &'static GuestMemoryMmap {
    Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
    ))
}

/// Request `n` of a test: its header at HDR + n*0x100, status byte at STATUS + n, descriptors
/// from 3n; `data` is (address, length, direction).
fn request(
    mem: &GuestMemoryMmap,
    n: u16,
    kind: u32,
    sector: u64,
    data: Option<(u64, u32, u16)>,
) -> Vec<RawDescriptor> {
    let hdr = HDR + 0x100 * u64::from(n);
    mem.write_obj(kind, GuestAddress(hdr)).unwrap();
    mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
    mem.write_obj(UNSET, GuestAddress(STATUS + u64::from(n)))
        .unwrap();
    let mut parts = vec![(hdr, 16, R)];
    parts.extend(data);
    parts.push((STATUS + u64::from(n), 1, W));
    let first = 3 * n;
    parts
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let more = i + 1 < parts.len();
            let flags = if more {
                flags | VRING_DESC_F_NEXT as u16
            } else {
                flags
            };
            RawDescriptor::from(Descriptor::new(addr, len, flags, first + i as u16 + 1))
        })
        .collect()
}

fn status_of(mem: &GuestMemoryMmap, n: u64) -> u8 {
    mem.read_obj(GuestAddress(STATUS + n)).unwrap()
}

/// Waits (bounded) for the ring's completion eventfd, as the event loop would.
fn completion_signalled(block: &Block) -> bool {
    let fd = block.engine.as_ref().unwrap().event().as_raw_fd();
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, Duration::from_secs(10).as_millis() as i32) };
    n == 1
}

#[test]
fn writes_flushes_and_reads_go_through_the_ring_and_finish_on_completion() {
    let mem = mem();
    let (mut block, path) = drive("rw", false);
    let vq = MockSplitQueue::new(mem, 16);
    mem.write_slice(&[0x5a; 1024], GuestAddress(DATA)).unwrap();
    let mut descs = request(mem, 0, request_type::OUT, 3, Some((DATA, 1024, R)));
    descs.extend(request(mem, 1, request_type::FLUSH, 0, None));
    vq.add_desc_chains(&descs, 0).unwrap();
    let queue: Queue = vq.create_queue().unwrap();
    block.activate(mem.clone(), vec![queue]).unwrap();
    block.process_queue();
    assert_eq!(
        block.engine.as_ref().unwrap().in_flight(),
        2,
        "both went to the ring"
    );
    assert_eq!(
        vq.used().idx().load(),
        0,
        "nothing is used before its completion"
    );
    assert!(
        completion_signalled(&block),
        "the completion eventfd wakes the loop"
    );
    block.complete_in_flight();
    assert_eq!(
        (status_of(mem, 0), status_of(mem, 1)),
        (status::OK, status::OK)
    );
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(block.interrupt().irqfd().read().unwrap(), 1);
    let file = std::fs::read(&path).unwrap();
    assert_eq!(
        file[3 * 512..5 * 512],
        [0x5a; 1024],
        "the write reached the file"
    );
    assert_eq!(file[5 * 512..6 * 512], [5; 512], "and nothing past it");
    assert_eq!(block.metrics().write_bytes.count(), 1024);
    assert_eq!(block.metrics().flush_count.count(), 1);

    // A read of sectors 7..9 into two buffers three pages apart, dirty afterwards.
    let region = mem.find_region(GuestAddress(DATA)).unwrap();
    let dirty = |addr: u64| region.bitmap().dirty_at(addr as usize);
    let far = DATA + 0x3000;
    assert!(
        !dirty(DATA + 0x1000) && !dirty(far),
        "untouched before the read"
    );
    // Chain 2: descriptors 6 (header), 7 and 8 (the two buffers), 9 (status).
    let mut read = request(mem, 2, request_type::IN, 7, Some((DATA + 0x1000, 512, W)));
    let next = VRING_DESC_F_NEXT as u16;
    read.insert(
        2,
        RawDescriptor::from(Descriptor::new(far, 512, W | next, 9)),
    );
    read[1] = RawDescriptor::from(Descriptor::new(DATA + 0x1000, 512, W | next, 8));
    read[3] = RawDescriptor::from(Descriptor::new(STATUS + 2, 1, W, 0));
    vq.add_desc_chains(&read, 6).unwrap();
    block.process_queue();
    assert!(completion_signalled(&block));
    block.complete_in_flight();
    assert_eq!(status_of(mem, 2), status::OK);
    let mut a = [0u8; 512];
    let mut b = [0u8; 512];
    mem.read_slice(&mut a, GuestAddress(DATA + 0x1000)).unwrap();
    mem.read_slice(&mut b, GuestAddress(far)).unwrap();
    assert_eq!((a, b), ([7; 512], [8; 512]), "sectors 7 and 8, in order");
    assert_eq!(vq.used().ring().ref_at(2).unwrap().load().len(), 1025);
    let dirty = |addr: u64| region.bitmap().dirty_at(addr as usize);
    assert!(
        dirty(DATA + 0x1000) && dirty(far),
        "what the kernel wrote is dirty"
    );
    assert!(!dirty(DATA + 0x2000), "and nothing between");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn refused_requests_finish_at_once_without_the_ring() {
    let mem = mem();
    let (mut block, path) = drive("refused", true);
    let vq = MockSplitQueue::new(mem, 16);
    let mut descs = request(mem, 0, request_type::OUT, 0, Some((DATA, 512, R)));
    descs.extend(request(mem, 1, request_type::IN, 64, Some((DATA, 512, W))));
    descs.extend(request(mem, 2, 77, 0, None));
    vq.add_desc_chains(&descs, 0).unwrap();
    let queue: Queue = vq.create_queue().unwrap();
    block.activate(mem.clone(), vec![queue]).unwrap();
    block.process_queue();
    assert_eq!(block.engine.as_ref().unwrap().in_flight(), 0);
    assert_eq!(vq.used().idx().load(), 3);
    assert_eq!(
        [status_of(mem, 0), status_of(mem, 1), status_of(mem, 2)],
        [status::IOERR, status::IOERR, status::UNSUPP],
        "a write to a read-only drive, a read past the end, an unknown type"
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_driver_posting_more_than_the_ring_holds_waits_for_completions() {
    let mem = mem();
    let (mut block, path) = drive("full", false);
    let size = 16u16;
    let vq = MockSplitQueue::new(mem, size);
    let mut descs = Vec::new();
    for n in 0..5 {
        descs.extend(request(
            mem,
            n,
            request_type::IN,
            u64::from(n),
            Some((DATA + 0x1000 * u64::from(n), 512, W)),
        ));
    }
    vq.add_desc_chains(&descs, 0).unwrap();
    let queue: Queue = vq.create_queue().unwrap();
    block.activate(mem.clone(), vec![queue]).unwrap();
    // Fill every slot but three by hand, as a driver re-posting chains in flight could.
    let engine = block.engine.as_mut().unwrap();
    let fd = std::fs::File::open(&path).unwrap();
    for _ in 0..usize::from(QUEUE_SIZE) - 3 {
        engine
            .queue_flush(fd.as_raw_fd(), 15, GuestAddress(STATUS + 15))
            .unwrap();
    }
    block.process_queue();
    assert!(block.engine.as_ref().unwrap().is_full());
    assert_eq!(vq.used().idx().load(), 0);
    // The queue still holds the two requests that found no slot.
    block.complete_in_flight();
    block.process_queue();
    block.complete_in_flight();
    assert_eq!(
        (0..5).map(|n| status_of(mem, n)).collect::<Vec<_>>(),
        [status::OK; 5],
        "every request ran once slots came free"
    );
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(DATA + 0x4000))
        .unwrap();
    assert_eq!(back, [4; 512]);
    drop(fd);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_reset_waits_for_requests_in_flight_and_drops_them() {
    let mem = mem();
    let (mut block, path) = drive("reset", false);
    let vq = MockSplitQueue::new(mem, 16);
    vq.add_desc_chains(
        &request(mem, 0, request_type::IN, 9, Some((DATA, 512, W))),
        0,
    )
    .unwrap();
    let queue: Queue = vq.create_queue().unwrap();
    block.activate(mem.clone(), vec![queue]).unwrap();
    block.process_queue();
    assert_eq!(block.engine.as_ref().unwrap().in_flight(), 1);
    block.reset();
    assert_eq!(
        block.engine.as_ref().unwrap().in_flight(),
        0,
        "nothing is left writing"
    );
    assert_eq!(vq.used().idx().load(), 0, "a reset device uses nothing");
    assert_eq!(status_of(mem, 0), UNSET);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn an_overlay_with_async_is_refused_by_name() {
    let cfg = BlockConfig {
        id: "rootfs".into(),
        path: "/nonexistent-base".into(),
        cow_overlay: Some("/nonexistent-overlay".into()),
        read_only: false,
        rate_limiter: Default::default(),
        io_engine: IoEngine::Async,
    };
    let err = Block::new(cfg, EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .starts_with("drive rootfs: io_engine Async cannot be used with a cow_overlay_path"),
        "{err}"
    );
}
