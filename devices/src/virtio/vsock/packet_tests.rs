//! Packet parsing over real descriptor chains: good tx and rx chains in both layouts, truncated
//! headers, wrongly directed descriptors, oversized payloads, the device's own checks, and the
//! headers it writes.

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_vsock::packet::Error;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::vsock::test_utils::{GUEST_CID, Hdr, PktBuf};
use crate::virtio::vsock::{CONN_BUF_SIZE, op};

const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const R: u32 = 0;
const W: u32 = VRING_DESC_F_WRITE;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, 0))
}

fn tx(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<Hdr, Error> {
    let q = MockSplitQueue::new(mem, 16);
    let mut chain = q.build_desc_chain(descs).unwrap();
    let pkt = parse_tx(mem, &mut chain)?;
    let mut h = Hdr::guest(pkt.op(), pkt.src_port(), pkt.dst_port());
    h.len = pkt.len();
    Ok(h)
}

fn rx_room(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<usize, Error> {
    let q = MockSplitQueue::new(mem, 16);
    let mut chain = q.build_desc_chain(descs).unwrap();
    parse_rx(mem, &mut chain).map(|p| rx_capacity(&p))
}

fn put_header(mem: &GuestMemoryMmap, h: Hdr) {
    mem.write_slice(&h.bytes(), GuestAddress(HDR)).unwrap();
}

fn rw(len: u32) -> Hdr {
    let mut h = Hdr::guest(op::RW, 1000, 52);
    h.len = len;
    h
}

#[test]
fn tx_header_and_payload_in_two_descriptors() {
    let mem = mem();
    put_header(&mem, rw(5));
    mem.write_slice(b"hello", GuestAddress(DATA)).unwrap();
    let q = MockSplitQueue::new(&mem, 16);
    let mut chain = q
        .build_desc_chain(&[desc(HDR, 44, R), desc(DATA, 5, R)])
        .unwrap();
    let pkt = parse_tx(&mem, &mut chain).unwrap();
    assert_eq!(
        (
            pkt.op(),
            pkt.src_cid(),
            pkt.dst_cid(),
            pkt.src_port(),
            pkt.dst_port()
        ),
        (op::RW, GUEST_CID, 2, 1000, 52)
    );
    assert_eq!(
        (pkt.len(), pkt.buf_alloc(), pkt.type_()),
        (5, CONN_BUF_SIZE, 1)
    );
    let mut data = [0u8; 5];
    pkt.data_slice().unwrap().copy_to(&mut data[..]);
    assert_eq!(&data, b"hello");
    assert_eq!(check_tx(&pkt, GUEST_CID), Ok(()));
}

#[test]
fn tx_header_and_payload_in_one_descriptor() {
    let mem = mem();
    put_header(&mem, rw(3));
    mem.write_slice(b"abc", GuestAddress(HDR + 44)).unwrap();
    let q = MockSplitQueue::new(&mem, 16);
    let mut chain = q.build_desc_chain(&[desc(HDR, 44 + 3, R)]).unwrap();
    let pkt = parse_tx(&mem, &mut chain).unwrap();
    let mut data = [0u8; 3];
    pkt.data_slice().unwrap().copy_to(&mut data[..]);
    assert_eq!(&data, b"abc");
}

#[test]
fn control_packet_needs_no_payload_descriptor() {
    let mem = mem();
    put_header(&mem, Hdr::guest(op::REQUEST, 1000, 52));
    let h = tx(&mem, &[desc(HDR, 44, R)]).unwrap();
    assert_eq!((h.op, h.len), (op::REQUEST, 0));
}

#[test]
fn truncated_header_is_refused() {
    let mem = mem();
    put_header(&mem, rw(0));
    assert!(matches!(
        tx(&mem, &[desc(HDR, 43, R)]),
        Err(Error::DescriptorLengthTooSmall)
    ));
    assert!(matches!(
        tx(&mem, &[desc(HDR, 0, R)]),
        Err(Error::DescriptorLengthTooSmall)
    ));
}

#[test]
fn header_outside_guest_memory_is_refused() {
    let mem = mem();
    assert!(matches!(
        tx(&mem, &[desc(0x40_0000, 44, R)]),
        Err(Error::InvalidMemoryAccess(_))
    ));
    // Straddling the end of memory.
    assert!(tx(&mem, &[desc(0x20_0000 - 20, 44, R)]).is_err());
}

#[test]
fn payload_shorter_than_its_length_is_refused() {
    let mem = mem();
    put_header(&mem, rw(100));
    assert!(matches!(
        tx(&mem, &[desc(HDR, 44, R), desc(DATA, 99, R)]),
        Err(Error::DescriptorLengthTooSmall)
    ));
    // The length promises payload, but the chain ends after the header.
    assert!(matches!(
        tx(&mem, &[desc(HDR, 44, R)]),
        Err(Error::DescriptorChainTooShort)
    ));
}

#[test]
fn wrongly_directed_tx_descriptors_are_refused() {
    let mem = mem();
    put_header(&mem, rw(5));
    assert!(matches!(
        tx(&mem, &[desc(HDR, 44, W), desc(DATA, 5, R)]),
        Err(Error::UnexpectedWriteOnlyDescriptor)
    ));
    assert!(matches!(
        tx(&mem, &[desc(HDR, 44, R), desc(DATA, 5, W)]),
        Err(Error::UnexpectedWriteOnlyDescriptor)
    ));
}

#[test]
fn oversized_payload_is_refused_before_touching_it() {
    let mem = mem();
    put_header(&mem, rw(MAX_PKT_DATA + 1));
    let big = MAX_PKT_DATA + 1;
    assert!(
        matches!(tx(&mem, &[desc(HDR, 44, R), desc(DATA, big, R)]), Err(Error::InvalidHeaderLen(l)) if l == big)
    );
    put_header(&mem, rw(u32::MAX));
    assert!(matches!(
        tx(&mem, &[desc(HDR, 44, R), desc(DATA, 16, R)]),
        Err(Error::InvalidHeaderLen(u32::MAX))
    ));
    // Exactly the limit is fine.
    put_header(&mem, rw(MAX_PKT_DATA));
    assert_eq!(
        tx(&mem, &[desc(HDR, 44, R), desc(DATA, MAX_PKT_DATA, R)])
            .unwrap()
            .len,
        MAX_PKT_DATA
    );
}

#[test]
fn rx_buffers_in_both_layouts() {
    let mem = mem();
    assert_eq!(
        rx_room(&mem, &[desc(HDR, 44, W), desc(DATA, 4096, W)]).unwrap(),
        4096
    );
    assert_eq!(rx_room(&mem, &[desc(HDR, 44 + 4096, W)]).unwrap(), 4096);
    // A bigger buffer is used up to the packet limit.
    assert_eq!(
        rx_room(&mem, &[desc(HDR, 44 + 2 * MAX_PKT_DATA, W)]).unwrap(),
        MAX_PKT_DATA as usize
    );
}

#[test]
fn bad_rx_buffers_are_refused() {
    let mem = mem();
    assert!(matches!(
        rx_room(&mem, &[desc(HDR, 44, R), desc(DATA, 64, W)]),
        Err(Error::UnexpectedReadOnlyDescriptor)
    ));
    assert!(matches!(
        rx_room(&mem, &[desc(HDR, 44, W), desc(DATA, 64, R)]),
        Err(Error::UnexpectedReadOnlyDescriptor)
    ));
    assert!(matches!(
        rx_room(&mem, &[desc(HDR, 40, W)]),
        Err(Error::DescriptorLengthTooSmall)
    ));
    assert!(matches!(
        rx_room(&mem, &[desc(HDR, 44, W)]),
        Err(Error::DescriptorChainTooShort)
    ));
    let huge = MAX_PKT_DATA + 1;
    assert!(matches!(
        rx_room(&mem, &[desc(HDR, 44, W), desc(DATA, huge, W)]),
        Err(Error::DescriptorLengthTooLong)
    ));
}

#[test]
fn device_rules_on_addresses_and_type() {
    let check = |h: Hdr| check_tx(&PktBuf::tx(h, &[]).packet(), GUEST_CID);
    let good = Hdr::guest(op::REQUEST, 1, 2);
    assert_eq!(check(good), Ok(()));
    assert_eq!(
        check(Hdr { src_cid: 7, ..good }),
        Err(Refusal::WrongSrcCid(7))
    );
    assert_eq!(
        check(Hdr { dst_cid: 9, ..good }),
        Err(Refusal::WrongDstCid(9))
    );
    assert_eq!(check(Hdr { type_: 2, ..good }), Err(Refusal::WrongType(2)));
}

#[test]
fn written_header_overwrites_every_field() {
    let mut buf = PktBuf::rx(16);
    let h = Header {
        src_port: 5,
        dst_port: 6,
        op: op::SHUTDOWN,
        flags: 3,
        len: 0,
        buf_alloc: 77,
        fwd_cnt: 88,
    };
    write_header(&mut buf.packet(), GUEST_CID, &h);
    let got = buf.header();
    let want = Hdr {
        src_cid: HOST_CID,
        dst_cid: GUEST_CID,
        src_port: 5,
        dst_port: 6,
        len: 0,
        type_: 1,
        op: op::SHUTDOWN,
        flags: 3,
        buf_alloc: 77,
        fwd_cnt: 88,
    };
    assert_eq!(got, want);
    assert_eq!(used_len(10), 54);
}
