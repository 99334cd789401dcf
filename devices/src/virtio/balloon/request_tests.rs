//! Parsing the balloon's chains: page frame numbers merged into ranges and checked against guest
//! memory, free page reports checked for direction, alignment and bounds, statistics entries.

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::GuestMemoryMmap;

const P: u64 = PAGE_SIZE;
const BUF: u64 = 0x8000;
/// Second region: 1 MiB at 4 MiB.
const HIGH: u64 = 4 << 20;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(HIGH), 1 << 20)])
        .unwrap()
}

fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, 0))
}

/// Builds a chain of `descs` (the mock links them), walks it as the device does and hands it
/// to `f`.
fn with_chain<T>(
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
    f: impl FnOnce(&[SplitDescriptor]) -> T,
) -> T {
    let vq = MockSplitQueue::new(mem, 64);
    let chain = vq.build_desc_chain(descs).unwrap();
    let walked =
        crate::virtio::chain::walk(mem, vq.desc_table_addr(), 64, chain.head_index()).unwrap();
    f(&walked)
}

fn pfns(mem: &GuestMemoryMmap, list: &[u32], log: &mut LogOnce) -> Vec<std::ops::Range<u64>> {
    let bytes: Vec<u8> = list.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    with_chain(mem, &[desc(BUF, bytes.len() as u32, 0)], |c| {
        pfn_ranges(c, mem, log)
    })
}

#[test]
fn consecutive_pfns_merge_and_order_is_kept() {
    let mem = mem();
    let mut log = LogOnce::default();
    let got = pfns(&mem, &[10, 11, 12, 40, 9, 41], &mut log);
    assert_eq!(
        got,
        vec![
            10 * P..13 * P,
            40 * P..41 * P,
            9 * P..10 * P,
            41 * P..42 * P
        ]
    );
    assert_eq!(log, LogOnce::default(), "nothing to complain about");
}

#[test]
fn pfns_outside_memory_or_in_the_gap_are_dropped_and_logged() {
    let mem = mem();
    let mut log = LogOnce::default();
    let last_low = ((1 << 20) / P - 1) as u32;
    let first_high = (HIGH / P) as u32;
    let got = pfns(
        &mem,
        &[last_low, last_low + 1, first_high, u32::MAX, first_high + 1],
        &mut log,
    );
    // The last low page and the first high page are not merged: the gap lies between them.
    assert_eq!(
        got,
        vec![
            u64::from(last_low) * P..u64::from(last_low + 1) * P,
            HIGH..HIGH + 2 * P
        ]
    );
    assert!(log.seen(Misbehaviour::PfnOutOfRange));
}

#[test]
fn a_writable_or_missing_pfn_buffer_is_skipped() {
    let mem = mem();
    let mut log = LogOnce::default();
    mem.write_obj(5u32, GuestAddress(BUF)).unwrap();
    let got = with_chain(
        &mem,
        &[
            desc(BUF, 4, VRING_DESC_F_WRITE),
            desc(8 << 20, 4, 0),
            desc(BUF, 6, 0),
        ],
        |c| pfn_ranges(c, &mem, &mut log),
    );
    assert_eq!(
        got,
        vec![5 * P..6 * P],
        "the 2 trailing bytes are not a PFN"
    );
    assert!(log.seen(Misbehaviour::WrongDirection));
    assert!(log.seen(Misbehaviour::BadBuffer));
}

#[test]
fn an_oversized_pfn_chain_is_cut_at_the_limit() {
    let mem = mem();
    let mut log = LogOnce::default();
    // Two descriptors of MAX_PFN_BYTES each, all page 3: only the first is read.
    let big = 0x2_0000;
    let bytes: Vec<u8> = std::iter::repeat_n(3u32.to_le_bytes(), MAX_PFN_BYTES as usize / 2)
        .flatten()
        .collect();
    mem.write_slice(&bytes, GuestAddress(big)).unwrap();
    let got = with_chain(
        &mem,
        &[desc(big, MAX_PFN_BYTES, 0), desc(big, MAX_PFN_BYTES, 0)],
        |c| pfn_ranges(c, &mem, &mut log),
    );
    let pages: u64 = got.iter().map(|r| (r.end - r.start) / P).sum();
    assert_eq!(pages, u64::from(MAX_PFN_BYTES / 4));
    assert!(log.seen(Misbehaviour::Oversized));
}

#[test]
fn reports_keep_whole_pages_inside_one_region() {
    let mem = mem();
    let mut log = LogOnce::default();
    let w = VRING_DESC_F_WRITE;
    let got = with_chain(
        &mem,
        &[
            desc(0x10_0000 - 0x8_0000, 0x8_0000, w), // the top half of the low region
            desc(HIGH, 0x20_0000, w),                // runs past the high region's end
            desc(0x1000, 0x800, w),                  // half a page
            desc(0x2001, 0x1000, w),                 // unaligned start
            desc(0xF_F000, 0x2000, w),               // crosses into the gap
            desc(0x3000, 0x1000, 0),                 // device-readable
            desc(HIGH + 0x1000, 0x1000, w),
        ],
        |c| report_ranges(c, &mem, &mut log),
    );
    assert_eq!(got, vec![0x8_0000..0x10_0000, HIGH + 0x1000..HIGH + 0x2000]);
    assert!(log.seen(Misbehaviour::BadReport));
    assert!(log.seen(Misbehaviour::WrongDirection));
}

#[test]
fn stats_entries_are_read_in_order_and_a_short_tail_ignored() {
    let mem = mem();
    let mut log = LogOnce::default();
    let mut bytes = Vec::new();
    for (tag, value) in [(4u16, 123u64), (99, 7), (5, u64::MAX)] {
        bytes.extend(tag.to_le_bytes());
        bytes.extend(value.to_le_bytes());
    }
    bytes.extend([1, 2, 3]);
    mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    let got = with_chain(&mem, &[desc(BUF, bytes.len() as u32, 0)], |c| {
        stats_entries(c, &mem, &mut log)
    });
    assert_eq!(got, vec![(4, 123), (99, 7), (5, u64::MAX)]);
}
