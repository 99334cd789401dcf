//! Request parsing and execution: well-formed requests of each type, truncated and wrongly
//! directed chains, out-of-range sectors, read-only disks, and whole requests through the queue.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::block::{Backend, Disk};
use crate::virtio::block::{Block, BlockConfig, CHAINS_PER_PASS, MAX_REQUEST_BYTES};
use crate::virtio::device::VirtioDevice;
use crate::virtio::{GuestMemoryMmap, status as dev_status};

const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    mem.write_obj(kind, GuestAddress(HDR)).unwrap();
    mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
}

fn parse_descs(
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
) -> Result<Request, (RequestError, Option<GuestAddress>)> {
    let vq = MockSplitQueue::new(mem, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    let descs = crate::virtio::chain::walk(mem, vq.desc_table_addr(), 16, chain.head_index())
        .expect("a well-formed chain");
    parse(&descs, mem)
}

/// A disk of `sectors` sectors whose sector i is filled with byte i.
fn disk(sectors: u64, read_only: bool) -> (Disk, std::path::PathBuf) {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("kiln-blk-{}-{n}.img", std::process::id()));
    let mut f = std::fs::File::create(&path).unwrap();
    for i in 0..sectors {
        f.write_all(&[i as u8; SECTOR_SIZE as usize]).unwrap();
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(&path)
        .unwrap();
    let mut id = [0u8; ID_BYTES];
    id[..6].copy_from_slice(b"rootfs");
    (
        Disk {
            backend: Backend::File(file),
            size: sectors * SECTOR_SIZE,
            read_only,
            id,
        },
        path,
    )
}

#[test]
fn read_request_parses_and_reads_the_right_sectors() {
    let mem = mem();
    header(&mem, request_type::IN, 2);
    let req = parse_descs(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 1024, W), desc(STATUS, 1, W)],
    )
    .unwrap();
    assert_eq!(req.kind, RequestType::In);
    assert_eq!(req.sector, 2);
    assert_eq!(req.data, vec![(GuestAddress(DATA), 1024)]);
    assert_eq!(req.status, GuestAddress(STATUS));
    let (mut d, _) = disk(8, false);
    assert_eq!(req.execute(&mut d, &mem), (status::OK, 1025));
    let mut buf = [0u8; 1024];
    mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf[..512].iter().all(|b| *b == 2) && buf[512..].iter().all(|b| *b == 3));
}

#[test]
fn write_then_flush_reach_the_file() {
    let mem = mem();
    header(&mem, request_type::OUT, 5);
    mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    let req = parse_descs(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)],
    )
    .unwrap();
    let (mut d, path) = disk(8, false);
    assert_eq!(req.execute(&mut d, &mem), (status::OK, 1));
    header(&mem, request_type::FLUSH, 0);
    let flush = parse_descs(&mem, &[desc(HDR, 16, R), desc(STATUS, 1, W)]).unwrap();
    assert_eq!(flush.execute(&mut d, &mem), (status::OK, 1));
    let mut f = std::fs::File::open(path).unwrap();
    let mut sector = [0u8; 512];
    f.seek(SeekFrom::Start(5 * 512)).unwrap();
    f.read_exact(&mut sector).unwrap();
    assert_eq!(sector, [0xab; 512]);
}

#[test]
fn out_of_range_unaligned_and_read_only_requests_get_ioerr() {
    let mem = mem();
    let (mut d, _) = disk(8, false);
    header(&mem, request_type::IN, 7);
    let past_end = parse_descs(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 1024, W), desc(STATUS, 1, W)],
    )
    .unwrap();
    assert_eq!(past_end.execute(&mut d, &mem).0, status::IOERR);
    header(&mem, request_type::IN, u64::MAX / 256);
    let overflow = parse_descs(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
    )
    .unwrap();
    assert_eq!(overflow.execute(&mut d, &mem).0, status::IOERR);
    header(&mem, request_type::IN, 0);
    let unaligned = parse_descs(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 100, W), desc(STATUS, 1, W)],
    )
    .unwrap();
    assert_eq!(unaligned.execute(&mut d, &mem).0, status::IOERR);
    let outside = parse_descs(
        &mem,
        &[
            desc(HDR, 16, R),
            desc(0x20_0000, 512, W),
            desc(STATUS, 1, W),
        ],
    )
    .unwrap();
    assert_eq!(
        outside.execute(&mut d, &mem).0,
        status::IOERR,
        "buffer outside guest memory"
    );

    let (mut ro, path) = disk(8, true);
    header(&mem, request_type::OUT, 0);
    mem.write_slice(&[0xcd; 512], GuestAddress(DATA)).unwrap();
    let write = parse_descs(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)],
    )
    .unwrap();
    assert_eq!(write.execute(&mut ro, &mem), (status::IOERR, 1));
    assert_eq!(
        std::fs::read(path).unwrap()[..512],
        [0u8; 512],
        "read-only disk untouched"
    );
}

#[test]
fn get_id_and_unsupported_types() {
    let mem = mem();
    let (mut d, _) = disk(1, false);
    header(&mem, request_type::GET_ID, 0);
    let get_id = parse_descs(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 20, W), desc(STATUS, 1, W)],
    )
    .unwrap();
    assert_eq!(get_id.execute(&mut d, &mem), (status::OK, 21));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..7], b"rootfs\0");
    header(&mem, 11, 0); // DISCARD, not offered
    let discard = parse_descs(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)],
    )
    .unwrap();
    assert_eq!(discard.kind, RequestType::Unsupported(11));
    assert_eq!(discard.execute(&mut d, &mem), (status::UNSUPP, 1));
}

#[test]
fn malformed_chains_are_refused_with_the_status_place_when_known() {
    let mem = mem();
    header(&mem, request_type::IN, 0);
    let status_at = Some(GuestAddress(STATUS));
    assert_eq!(
        parse_descs(&mem, &[desc(HDR, 16, R)]),
        Err((RequestError::NoStatus, None))
    );
    assert_eq!(
        parse_descs(&mem, &[desc(HDR, 8, R), desc(STATUS, 1, W)]),
        Err((RequestError::BadHeader, status_at)),
        "truncated header"
    );
    assert_eq!(
        parse_descs(&mem, &[desc(HDR, 16, W), desc(STATUS, 1, W)]),
        Err((RequestError::BadHeader, status_at)),
        "writable header"
    );
    assert_eq!(
        parse_descs(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)]
        ),
        Err((RequestError::DataDirection(RequestType::In), status_at)),
        "read into a device-readable buffer"
    );
    header(&mem, request_type::OUT, 0);
    assert_eq!(
        parse_descs(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)]
        ),
        Err((RequestError::DataDirection(RequestType::Out), status_at)),
        "write from a device-writable buffer"
    );
    assert_eq!(
        parse_descs(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, R)]
        ),
        Err((RequestError::BadStatus, None))
    );
    assert_eq!(
        parse_descs(&mem, &[desc(0x20_0000, 16, R), desc(STATUS, 1, W)]),
        Err((RequestError::HeaderMemory(0x20_0000), status_at)),
        "header outside guest memory"
    );
}

/// A block device over a queue the test fills like a driver would.
struct Rig {
    mem: GuestMemoryMmap,
    block: Arc<Mutex<Block>>,
    path: std::path::PathBuf,
}

fn rig(read_only: bool) -> (Rig, MockSplitQueue<'static, GuestMemoryMmap>) {
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(mem()));
    let (d, path) = disk(16, false);
    drop(d);
    let cfg = BlockConfig {
        id: "data".into(),
        path: path.clone(),
        cow_overlay: None,
        read_only,
        rate_limiter: Default::default(),
        io_engine: Default::default(),
    };
    let block = Arc::new(Mutex::new(
        Block::new(cfg, EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap(),
    ));
    let vq = MockSplitQueue::new(mem, 16);
    (
        Rig {
            mem: mem.clone(),
            block,
            path,
        },
        vq,
    )
}

fn chained(descs: &[(u64, u32, u16)], first: u16) -> Vec<RawDescriptor> {
    descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let last = i == descs.len() - 1;
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT as u16
            };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, first + i as u16 + 1))
        })
        .collect()
}

#[test]
fn requests_on_the_queue_are_served_and_the_guest_interrupted() {
    let (rig, vq) = rig(false);
    let mem = &rig.mem;
    // Request 1: write sector 3; request 2: read sector 3 back into another buffer.
    mem.write_obj(request_type::OUT, GuestAddress(HDR)).unwrap();
    mem.write_obj(3u64, GuestAddress(HDR + 8)).unwrap();
    mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    mem.write_obj(request_type::IN, GuestAddress(HDR + 0x100))
        .unwrap();
    mem.write_obj(3u64, GuestAddress(HDR + 0x108)).unwrap();
    let mut descs = chained(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)], 0);
    descs.extend(chained(
        &[
            (HDR + 0x100, 16, R),
            (DATA + 0x1000, 512, W),
            (STATUS + 1, 1, W),
        ],
        3,
    ));
    vq.add_desc_chains(&descs, 0).unwrap();
    let queue: Queue = vq.create_queue().unwrap();

    let mut block = rig.block.lock().unwrap();
    block.activate(mem.clone(), vec![queue]).unwrap();
    block.process_queue();
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        status::OK
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(),
        status::OK
    );
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(back, [0x5a; 512], "read returns what was written");
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(vq.used().ring().ref_at(1).unwrap().load().len(), 513);
    assert_eq!(block.interrupt().irqfd().read().unwrap(), 1);
    assert_eq!(
        std::fs::read(&rig.path).unwrap()[3 * 512..4 * 512],
        [0x5a; 512]
    );
}

#[test]
fn a_lying_avail_index_marks_the_device_for_reset() {
    let (rig, vq) = rig(false);
    let queue: Queue = vq.create_queue().unwrap();
    // The driver claims 1000 new buffers in a 16-entry ring.
    vq.avail().idx().store(1000);
    let mut block = rig.block.lock().unwrap();
    block.activate(rig.mem.clone(), vec![queue]).unwrap();
    block.process_queue();
    assert!(block.interrupt().needs_reset());
    let _ = dev_status::DEVICE_NEEDS_RESET;
}

#[test]
fn a_descriptor_loop_ends_at_the_queue_size() {
    let (rig, vq) = rig(false);
    let mem = &rig.mem;
    header(mem, request_type::IN, 0);
    // Two descriptors pointing at each other forever.
    let looping = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(SplitDescriptor::new(
            DATA,
            512,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            0,
        )),
    ];
    vq.add_desc_chains(&looping, 0).unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    let chain = queue.iter(mem).unwrap().next().unwrap();
    assert!(chain.count() <= 16, "iteration stops at the queue size");
    let mut queue: Queue = vq.create_queue().unwrap();
    queue.set_next_avail(0);
    let mut block = rig.block.lock().unwrap();
    block.activate(mem.clone(), vec![queue]).unwrap();
    block.process_queue(); // must return, and answer the chain as malformed
    assert_eq!(vq.used().idx().load(), 1);
}

/// A block device over a fresh disk of `sectors` sectors, and a queue of `size` in `mem`.
fn rig_sized(
    mem: &'static GuestMemoryMmap,
    sectors: u64,
    size: u16,
) -> (Arc<Mutex<Block>>, MockSplitQueue<'static, GuestMemoryMmap>) {
    let (d, path) = disk(sectors, false);
    drop(d);
    let cfg = BlockConfig {
        id: "data".into(),
        path,
        cow_overlay: None,
        read_only: false,
        rate_limiter: Default::default(),
        io_engine: Default::default(),
    };
    let block = Block::new(cfg, EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap();
    (Arc::new(Mutex::new(block)), MockSplitQueue::new(mem, size))
}

#[test]
fn a_full_queue_is_served_a_budget_at_a_time_and_the_handler_comes_back() {
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(mem()));
    let (block, vq) = rig_sized(mem, 16, 256);
    header(mem, request_type::FLUSH, 0);
    // 128 FLUSH requests (header, status), filling the 256-entry table.
    let mut descs = Vec::new();
    for i in 0..128u16 {
        descs.extend(chained(
            &[(HDR, 16, R), (STATUS + u64::from(i), 1, W)],
            2 * i,
        ));
    }
    vq.add_desc_chains(&descs, 0).unwrap();
    let queue: Queue = vq.create_queue().unwrap();
    let mut block = block.lock().unwrap();
    block.activate(mem.clone(), vec![queue]).unwrap();
    let queue_evt = block.queue_events()[0].try_clone().unwrap();

    block.process_queue();
    assert_eq!(vq.used().idx().load() as usize, CHAINS_PER_PASS);
    assert_eq!(
        queue_evt.read().unwrap(),
        1,
        "the handler asked to come back"
    );
    block.process_queue();
    assert_eq!(vq.used().idx().load(), 128);
    assert_eq!(queue_evt.read().unwrap(), 1);
    block.process_queue();
    assert_eq!(vq.used().idx().load(), 128);
    assert!(queue_evt.read().is_err(), "nothing left: no new signal");
    for i in 0..128 {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            status::OK
        );
    }
}

#[test]
fn an_indirect_descriptor_needs_reset_and_its_status_is_not_touched() {
    let (rig, vq) = rig(false);
    let mem = &rig.mem;
    header(mem, request_type::IN, 0);
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    let table = [
        RawDescriptor::from(SplitDescriptor::new(
            HDR,
            16,
            (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT) as u16,
            1,
        )),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, W, 0)),
    ];
    vq.add_desc_chains(&table, 0).unwrap();
    let queue: Queue = vq.create_queue().unwrap();
    let mut block = rig.block.lock().unwrap();
    block.activate(mem.clone(), vec![queue]).unwrap();
    block.process_queue();
    assert!(block.interrupt().needs_reset());
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xee);
}

#[test]
fn a_request_larger_than_the_cap_gets_ioerr_and_one_at_the_cap_runs() {
    // Guest memory and a (sparse) disk big enough for the largest request.
    let size = MAX_REQUEST_BYTES + 0x10_0000;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
    let (mut disk, _path) = disk(1, false);
    let Backend::File(file) = &disk.backend else {
        unreachable!("disk() makes plain files")
    };
    file.set_len(2 * size).unwrap();
    disk.size = 2 * size;
    let ok = Request {
        kind: RequestType::In,
        sector: 0,
        data: vec![(GuestAddress(0x10_0000), MAX_REQUEST_BYTES as u32)],
        status: GuestAddress(STATUS),
    };
    assert_eq!(ok.execute(&mut disk, &mem).0, status::OK);
    let too_big = Request {
        data: vec![
            (GuestAddress(0x10_0000), MAX_REQUEST_BYTES as u32),
            (GuestAddress(0x10_0000), 512),
        ],
        ..ok
    };
    assert_eq!(too_big.execute(&mut disk, &mem), (status::IOERR, 1));
}
