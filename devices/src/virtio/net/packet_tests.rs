//! Chains into segments: frames split over descriptors, wrong directions, bounds, memory limits,
//! and the dirty bitmap for bytes written.

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::*;
use crate::virtio::net::MAX_GSO_FRAME;

const BUF: u64 = 0x10_0000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn tx(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<usize, ChainError> {
    let vq = MockSplitQueue::new(mem, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    tx_frame(mem, chain).map(|s| s.len())
}

fn rx(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<usize, ChainError> {
    let vq = MockSplitQueue::new(mem, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    rx_room(mem, chain).map(|s| s.len())
}

#[test]
fn a_frame_split_over_descriptors_reads_back_whole() {
    let mem = mem();
    let bytes: Vec<u8> = (0..100u8).collect();
    mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    // Header alone, then the frame in two pieces.
    let chain = vq
        .build_desc_chain(&[
            desc(BUF, 12, R),
            desc(BUF + 12, 30, R),
            desc(BUF + 42, 58, R),
        ])
        .unwrap();
    let segs = tx_frame(&mem, chain).unwrap();
    assert_eq!((segs.len(), segs.pieces()), (100, 3));
    let mut back = vec![0u8; 100];
    assert_eq!(segs.read_at(0, &mut back), 100);
    assert_eq!(back, bytes);
    let mut mid = [0u8; 10];
    assert_eq!(segs.read_at(37, &mut mid), 10);
    assert_eq!(
        mid.to_vec(),
        bytes[37..47].to_vec(),
        "a read across a boundary"
    );
    let iov = segs.iovecs();
    assert_eq!(
        iov.iter().map(|v| v.iov_len).collect::<Vec<_>>(),
        [12, 30, 58]
    );
}

#[test]
fn transmit_chains_must_be_readable_frames_of_sane_length() {
    let mem = mem();
    assert_eq!(
        tx(&mem, &[desc(BUF, 12, R), desc(BUF + 12, 60, W)]),
        Err(ChainError::Direction("device-writable", "transmit"))
    );
    assert_eq!(
        tx(&mem, &[desc(BUF, 25, R)]),
        Err(ChainError::TooShort(25)),
        "header and less than an Ethernet header"
    );
    assert_eq!(tx(&mem, &[desc(BUF, 26, R)]), Ok(26));
    let max = (HDR_LEN + MAX_GSO_FRAME) as u32;
    assert_eq!(tx(&mem, &[desc(BUF, max, R)]), Ok(max as usize));
    assert_eq!(
        tx(&mem, &[desc(BUF, max, R), desc(BUF, 1, R)]),
        Err(ChainError::TooLong(max as usize + 1))
    );
    assert_eq!(
        tx(&mem, &[desc(0x3f_fff0, 64, R)]),
        Err(ChainError::Memory {
            addr: 0x3f_fff0,
            len: 64
        }),
        "running past the end of guest memory"
    );
    assert_eq!(
        tx(&mem, &[desc(u64::MAX - 10, 64, R)]),
        Err(ChainError::Memory {
            addr: u64::MAX - 10,
            len: 64
        })
    );
}

#[test]
fn receive_chains_must_be_writable() {
    let mem = mem();
    assert_eq!(
        rx(&mem, &[desc(BUF, 4096, W), desc(BUF + 4096, 100, W)]),
        Ok(4196)
    );
    assert_eq!(
        rx(&mem, &[desc(BUF, 4096, W), desc(BUF + 4096, 100, R)]),
        Err(ChainError::Direction("device-readable", "receive"))
    );
    assert!(matches!(
        rx(&mem, &[desc(0x50_0000, 16, W)]),
        Err(ChainError::Memory { .. })
    ));
}

#[test]
fn bytes_written_through_segments_are_dirty() {
    let mem = mem();
    let vq = MockSplitQueue::new(&mem, 16);
    // Two buffers three pages apart.
    let chain = vq
        .build_desc_chain(&[desc(BUF, 100, W), desc(BUF + 0x3000, 4096, W)])
        .unwrap();
    let segs = rx_room(&mem, chain).unwrap();
    let region = mem.find_region(GuestAddress(BUF)).unwrap();
    let dirty = |addr: u64| region.bitmap().dirty_at(addr as usize);
    assert!(!dirty(BUF) && !dirty(BUF + 0x3000));
    // num_buffers-style write at offset 98: two bytes, one in each buffer.
    assert_eq!(segs.write_at(98, &[1, 2, 3]), 3);
    assert_eq!(mem.read_obj::<u16>(GuestAddress(BUF + 98)).unwrap(), 0x0201);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(BUF + 0x3000)).unwrap(), 3);
    assert!(dirty(BUF) && dirty(BUF + 0x3000));
    assert!(!dirty(BUF + 0x4000));
    // What the kernel writes through I/O vectors is marked by hand.
    segs.mark_written(100 + 4096);
    assert!(dirty(BUF + 0x3000 + 4095));
    assert_eq!(
        segs.write_at(5000, &[9]),
        0,
        "past the end nothing is written"
    );
}
