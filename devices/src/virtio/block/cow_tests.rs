//! The copy-on-write drive through its queue, as a driver uses it: reads come from the base until
//! written, a partial write copies the rest of its cluster up from the base, the base is never
//! written, a reopened overlay (a restore in a new process) knows its clusters again, a clone
//! restored over a copy of the overlay sees the parent's writes but not its later ones, and bad
//! configurations are refused by name.

use std::path::{Path, PathBuf};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::GuestMemoryMmap;
use crate::virtio::block::{
    Backend, Block, BlockConfig, BlockError, BlockRestoreArgs, SECTOR_SIZE, request_type, status,
};
use crate::virtio::device::VirtioDevice;
use kiln_snapshot::Persist;

const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x8_0000;
/// Sectors in the test base image: 16 clusters of 4 KiB.
const SECTORS: u64 = 128;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// A fresh folder for one test's files.
fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-cow-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Sector `i` of the base is filled with byte `0x80 | i` (mod 256): no sector is zero.
fn base_byte(sector: u64) -> u8 {
    0x80 | (sector as u8)
}

/// A base image of [`SECTORS`] sectors and an empty overlay beside it.
fn files(d: &Path) -> (PathBuf, PathBuf) {
    let base = d.join("base.img");
    let bytes: Vec<u8> = (0..SECTORS)
        .flat_map(|s| [base_byte(s); SECTOR_SIZE as usize])
        .collect();
    std::fs::write(&base, bytes).unwrap();
    let overlay = d.join("overlay.img");
    std::fs::File::create(&overlay).unwrap();
    (base, overlay)
}

fn config(base: &Path, overlay: &Path) -> BlockConfig {
    BlockConfig {
        id: "rootfs".into(),
        path: base.to_path_buf(),
        cow_overlay: Some(overlay.to_path_buf()),
        read_only: false,
        rate_limiter: Default::default(),
        io_engine: Default::default(),
    }
}

fn open(base: &Path, overlay: &Path) -> Block {
    Block::new(
        config(base, overlay),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    )
    .unwrap()
}

fn contents(path: &Path) -> Vec<u8> {
    // A byte-for-byte copy is checksum enough for a 64 KiB file.
    std::fs::read(path).unwrap()
}

/// One request: its type, first sector and data length (in bytes); write data is taken from
/// guest memory at [`DATA`] + `index * 0x1_0000`, read data lands there.
struct Req(u32, u64, u32);

fn data_addr(i: usize) -> GuestAddress {
    GuestAddress(DATA + i as u64 * 0x1_0000)
}

/// Puts `reqs` on a fresh queue as a driver would, activates the device on it and lets it run
/// them; returns each request's status byte.
fn run(block: &mut Block, mem: &GuestMemoryMmap, reqs: &[Req]) -> Vec<u8> {
    let vq = MockSplitQueue::new(mem, 64);
    let mut descs = Vec::new();
    for (i, Req(kind, sector, len)) in reqs.iter().enumerate() {
        let hdr = HDR + i as u64 * 0x100;
        mem.write_obj(*kind, GuestAddress(hdr)).unwrap();
        mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        mem.write_obj(*sector, GuestAddress(hdr + 8)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS + i as u64))
            .unwrap();
        let first = descs.len() as u16;
        let dir = if *kind == request_type::IN {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        let mut chain = vec![(hdr, 16, 0)];
        if *len > 0 {
            chain.push((data_addr(i).0, *len, dir));
        }
        chain.push((STATUS + i as u64, 1, VRING_DESC_F_WRITE as u16));
        for (j, &(addr, len, flags)) in chain.iter().enumerate() {
            let next = first + j as u16 + 1;
            let flags = if j + 1 < chain.len() {
                flags | VRING_DESC_F_NEXT as u16
            } else {
                flags
            };
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                addr, len, flags, next,
            )));
        }
    }
    vq.add_desc_chains(&descs, 0).unwrap();
    let queue: Queue = vq.create_queue().unwrap();
    block.reset();
    block.set_acked_features(block.avail_features());
    block.activate(mem.clone(), vec![queue]).unwrap();
    block.process_queue();
    assert_eq!(
        vq.used().idx().load(),
        reqs.len() as u16,
        "every request used"
    );
    (0..reqs.len())
        .map(|i| mem.read_obj::<u8>(GuestAddress(STATUS + i as u64)).unwrap())
        .collect()
}

/// Reads `sectors` sectors from `sector` through the queue.
fn read(block: &mut Block, mem: &GuestMemoryMmap, sector: u64, sectors: u64) -> Vec<u8> {
    let len = (sectors * SECTOR_SIZE) as u32;
    assert_eq!(
        run(block, mem, &[Req(request_type::IN, sector, len)]),
        [status::OK]
    );
    let mut buf = vec![0u8; len as usize];
    mem.read_slice(&mut buf, data_addr(0)).unwrap();
    buf
}

/// What the base holds at sectors `from..to`.
fn base_bytes(from: u64, to: u64) -> Vec<u8> {
    (from..to)
        .flat_map(|s| [base_byte(s); SECTOR_SIZE as usize])
        .collect()
}

fn overlay_data(overlay: &Path) -> Vec<std::ops::Range<u64>> {
    let f = std::fs::File::open(overlay).unwrap();
    kiln_snapshot::data_ranges(&f, overlay).unwrap()
}

fn cluster_of(block: &Block) -> u64 {
    match &block.disk().backend {
        Backend::Cow(cow) => cow.cluster_size(),
        Backend::File(_) => panic!("not a copy-on-write drive"),
    }
}

#[test]
fn reads_come_from_the_base_and_an_empty_overlay_stays_a_hole() {
    let d = dir("read");
    let (base, overlay) = files(&d);
    let before = contents(&base);
    let mut block = open(&base, &overlay);
    let mem = mem();
    assert_eq!(read(&mut block, &mem, 0, SECTORS), base_bytes(0, SECTORS));
    assert_eq!(read(&mut block, &mem, 37, 3), base_bytes(37, 40));
    assert_eq!(
        std::fs::metadata(&overlay).unwrap().len(),
        SECTORS * SECTOR_SIZE,
        "the empty overlay is extended to the base's length"
    );
    assert_eq!(overlay_data(&overlay), vec![], "reads write nothing");
    assert_eq!(contents(&base), before);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_partial_write_copies_its_cluster_up_and_the_base_is_never_written() {
    let d = dir("copyup");
    let (base, overlay) = files(&d);
    let before = contents(&base);
    let mut block = open(&base, &overlay);
    let cluster = cluster_of(&block);
    let per = cluster / SECTOR_SIZE;
    let mem = mem();
    // One sector in the middle of cluster 1, and a write straddling clusters 2 and 3.
    mem.write_slice(&[0x11; 512], data_addr(0)).unwrap();
    mem.write_slice(&[0x22; 1024], data_addr(1)).unwrap();
    let statuses = run(
        &mut block,
        &mem,
        &[
            Req(request_type::OUT, per + 3, 512),
            Req(request_type::OUT, 3 * per - 1, 1024),
            Req(request_type::FLUSH, 0, 0),
        ],
    );
    assert_eq!(statuses, [status::OK; 3]);

    let mut want = base_bytes(0, SECTORS);
    let at = |s: u64| (s * SECTOR_SIZE) as usize;
    want[at(per + 3)..at(per + 4)].fill(0x11);
    want[at(3 * per - 1)..at(3 * per + 1)].fill(0x22);
    assert_eq!(read(&mut block, &mem, 0, SECTORS), want);
    // The overlay holds exactly clusters 1, 2 and 3, each whole: the base's bytes around the
    // written sectors were copied up with them.
    assert_eq!(overlay_data(&overlay), vec![cluster..4 * cluster]);
    let on_disk = std::fs::read(&overlay).unwrap();
    assert_eq!(
        on_disk[cluster as usize..4 * cluster as usize],
        want[cluster as usize..4 * cluster as usize]
    );
    assert_eq!(contents(&base), before, "the base is never written");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_reopened_overlay_rebuilds_its_bitmap_from_its_data() {
    let d = dir("reopen");
    let (base, overlay) = files(&d);
    let mem = mem();
    let mut block = open(&base, &overlay);
    let per = cluster_of(&block) / SECTOR_SIZE;
    // Zeros are data too: a written zero cluster must not show the base again after reopening.
    mem.write_slice(&[0; 512], data_addr(0)).unwrap();
    mem.write_slice(&[0x33; 512], data_addr(1)).unwrap();
    let statuses = run(
        &mut block,
        &mem,
        &[
            Req(request_type::OUT, 5 * per, 512),
            Req(request_type::OUT, SECTORS - 1, 512),
        ],
    );
    assert_eq!(statuses, [status::OK; 2]);
    let want = read(&mut block, &mem, 0, SECTORS);
    drop(block);

    let mut again = open(&base, &overlay);
    let Backend::Cow(cow) = &again.disk().backend else {
        panic!("not a copy-on-write drive")
    };
    assert_eq!(cow.clusters_present(), 2);
    assert_eq!(read(&mut again, &mem, 0, SECTORS), want);
    assert_eq!(read(&mut again, &mem, 5 * per, 1), vec![0; 512]);
    assert_eq!(
        read(&mut again, &mem, 5 * per + 1, 1),
        base_bytes(5 * per + 1, 5 * per + 2)
    );
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn requests_past_the_end_are_refused_and_touch_nothing() {
    let d = dir("end");
    let (base, overlay) = files(&d);
    let mut block = open(&base, &overlay);
    let mem = mem();
    mem.write_slice(&[0x44; 1024], data_addr(1)).unwrap();
    let statuses = run(
        &mut block,
        &mem,
        &[
            Req(request_type::IN, SECTORS, 512),
            Req(request_type::OUT, SECTORS - 1, 1024),
            Req(request_type::OUT, u64::MAX / 256, 512),
        ],
    );
    assert_eq!(statuses, [status::IOERR; 3]);
    assert_eq!(overlay_data(&overlay), vec![]);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_clone_restored_over_a_copy_of_the_overlay_sees_the_parents_writes_only() {
    let d = dir("clone");
    let (base, overlay) = files(&d);
    let mem = mem();
    let mut parent = open(&base, &overlay);
    mem.write_slice(&[0x55; 512], data_addr(0)).unwrap();
    assert_eq!(
        run(&mut parent, &mem, &[Req(request_type::OUT, 9, 512)]),
        [status::OK]
    );
    let state = parent.save();
    assert_eq!(state.cow_overlay_path.as_deref(), Some(overlay.as_path()));
    let copy = d.join("clone-overlay.img");
    std::fs::copy(&overlay, &copy).unwrap();

    let args = |path: Option<PathBuf>, overlay: Option<PathBuf>| BlockRestoreArgs {
        mem: mem.clone(),
        irqfd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        rate_limiter: Default::default(),
        io_engine: Default::default(),
        path_override: path,
        cow_overlay_override: overlay,
    };
    let mut clone = Block::restore(args(None, Some(copy.clone())), &state).unwrap();
    assert_eq!(clone.config().cow_overlay.as_deref(), Some(copy.as_path()));
    assert_eq!(clone.save().cow_overlay_path, Some(copy.clone()));
    assert_eq!(read(&mut clone, &mem, 9, 1), vec![0x55; 512]);
    mem.write_slice(&[0x66; 512], data_addr(0)).unwrap();
    assert_eq!(
        run(&mut clone, &mem, &[Req(request_type::OUT, 9, 512)]),
        [status::OK]
    );
    assert_eq!(read(&mut parent, &mem, 9, 1), vec![0x55; 512]);
    assert_eq!(read(&mut clone, &mem, 9, 1), vec![0x66; 512]);

    // A base of another size is noticed; an overlay for a drive saved without one is refused.
    let short = d.join("short.img");
    std::fs::write(&short, base_bytes(0, 8)).unwrap();
    let e = Block::restore(args(Some(short), Some(d.join("o2.img"))), &state)
        .err()
        .unwrap();
    assert!(e.to_string().contains("o2.img"), "{e}");
    std::fs::File::create(d.join("o3.img")).unwrap();
    let e = Block::restore(
        args(Some(d.join("short.img")), Some(d.join("o3.img"))),
        &state,
    )
    .err()
    .unwrap();
    assert!(
        e.to_string()
            .contains("short.img is 4096 bytes; the snapshot was taken with 65536 bytes"),
        "{e}"
    );
    let mut plain = state.clone();
    plain.cow_overlay_path = None;
    let e = Block::restore(args(None, Some(copy)), &plain)
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("the drive was saved without a copy-on-write overlay"),
        "{e}"
    );
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn bad_overlays_are_refused_by_name() {
    let d = dir("bad");
    let (base, overlay) = files(&d);
    let irq = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut ro = config(&base, &overlay);
    ro.read_only = true;
    let e = Block::new(ro, irq()).err().unwrap();
    assert!(matches!(e, BlockError::ReadOnlyOverlay(_)), "{e}");
    assert!(
        e.to_string()
            .contains("is_read_only with a cow_overlay_path"),
        "{e}"
    );

    std::fs::write(&overlay, [0u8; 1000]).unwrap();
    let e = Block::new(config(&base, &overlay), irq()).err().unwrap();
    assert!(
        e.to_string()
            .contains("overlay.img is 1000 bytes but the base")
            && e.to_string().contains("is 65536"),
        "{e}"
    );
    let missing = d.join("missing.img");
    let e = Block::new(config(&base, &missing), irq()).err().unwrap();
    assert!(
        e.to_string().starts_with("drive rootfs: ")
            && e.to_string().contains("missing.img: No such file"),
        "{e}"
    );
    let e = Block::new(config(&missing, &overlay), irq()).err().unwrap();
    assert!(e.to_string().contains("missing.img: No such file"), "{e}");
    std::fs::remove_dir_all(d).unwrap();
}
