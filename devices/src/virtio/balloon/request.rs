//! Reading what the guest put on the balloon's queues: page frame numbers (inflate, deflate),
//! free page reports, and statistics. Everything is checked against guest memory here, so the
//! device hands [`super::GuestPages`] only whole pages inside one memory region.
//!
//! Layouts (virtio 1.2, 5.5.6): an inflate or deflate chain is device-readable buffers of le32
//! page frame numbers (4 KiB pages); a free page report is device-writable buffers, each one free
//! block (Linux maps each to a scatterlist entry); a stats buffer is device-readable packed
//! `{le16 tag; le64 value}` entries.

use std::ops::Range;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{
    LogOnce, MAX_PFN_BYTES, MAX_REPORT_RANGES, MAX_STATS_BYTES, Misbehaviour, PAGE_SIZE,
    STATS_ENTRY_BYTES,
};
use crate::virtio::GuestMemoryMmap;

/// The region of `mem` that holds all of `start..end`, as its start address, if one does.
fn region_of(mem: &GuestMemoryMmap, start: u64, end: u64) -> Option<u64> {
    let region = mem.find_region(GuestAddress(start))?;
    let base = region.start_addr().0;
    (end > start && end - base <= region.len()).then_some(base)
}

/// Reads the device-readable buffers of a chain (walked by [`crate::virtio::chain::walk`]), at
/// most `limit` bytes; buffers of the wrong
/// direction or outside guest memory are skipped (and logged), and so is anything past `limit`.
fn read_chain(
    chain: &[Descriptor],
    mem: &GuestMemoryMmap,
    limit: u32,
    what: &str,
    log: &mut LogOnce,
) -> Vec<u8> {
    let mut bytes = Vec::new();
    for desc in chain {
        if desc.is_write_only() {
            log.warn(
                Misbehaviour::WrongDirection,
                format_args!("a {what} buffer at {:#x} is device-writable", desc.addr().0),
            );
            continue;
        }
        let room = (limit as usize).saturating_sub(bytes.len());
        if room == 0 {
            log.warn(
                Misbehaviour::Oversized,
                format_args!("a {what} chain holds more than {limit} bytes; the rest is ignored"),
            );
            break;
        }
        let len = (desc.len() as usize).min(room);
        let at = bytes.len();
        bytes.resize(at + len, 0);
        if mem.read_slice(&mut bytes[at..], desc.addr()).is_err() {
            log.warn(
                Misbehaviour::BadBuffer,
                format_args!(
                    "a {what} buffer {:#x}+{:#x} is outside guest memory",
                    desc.addr().0,
                    desc.len()
                ),
            );
            bytes.truncate(at);
        }
    }
    bytes
}

/// The pages an inflate or deflate chain names, as guest physical byte ranges in the order given,
/// consecutive pages merged. Page frame numbers outside guest memory are dropped (and logged).
pub fn pfn_ranges(
    chain: &[Descriptor],
    mem: &GuestMemoryMmap,
    log: &mut LogOnce,
) -> Vec<Range<u64>> {
    let bytes = read_chain(chain, mem, MAX_PFN_BYTES, "page frame number", log);
    let mut ranges: Vec<(Range<u64>, u64)> = Vec::new();
    for pfn in bytes.chunks_exact(4) {
        let pfn = u32::from_le_bytes([pfn[0], pfn[1], pfn[2], pfn[3]]);
        let start = u64::from(pfn) * PAGE_SIZE;
        let end = start + PAGE_SIZE;
        let Some(region) = region_of(mem, start, end) else {
            log.warn(
                Misbehaviour::PfnOutOfRange,
                format_args!("page frame number {pfn:#x} is outside guest memory; ignored"),
            );
            continue;
        };
        match ranges.last_mut() {
            Some((last, base)) if last.end == start && *base == region => last.end = end,
            _ => ranges.push((start..end, region)),
        }
    }
    ranges.into_iter().map(|(r, _)| r).collect()
}

/// The free blocks a free page report names, as guest physical byte ranges. Each buffer must be
/// device-writable, whole pages, and inside one memory region; others are dropped (and logged).
pub fn report_ranges(
    chain: &[Descriptor],
    mem: &GuestMemoryMmap,
    log: &mut LogOnce,
) -> Vec<Range<u64>> {
    let mut ranges = Vec::new();
    for (i, desc) in chain.iter().enumerate() {
        if i == MAX_REPORT_RANGES {
            log.warn(
                Misbehaviour::Oversized,
                format_args!(
                    "a free page report names more than {MAX_REPORT_RANGES} blocks; the rest are ignored"
                ),
            );
            break;
        }
        let (start, len) = (desc.addr().0, u64::from(desc.len()));
        if !desc.is_write_only() {
            log.warn(
                Misbehaviour::WrongDirection,
                format_args!("a reported block at {start:#x} is device-readable; ignored"),
            );
            continue;
        }
        let end = start.saturating_add(len);
        let aligned = start % PAGE_SIZE == 0 && len % PAGE_SIZE == 0;
        if !aligned || region_of(mem, start, end).is_none() {
            log.warn(
                Misbehaviour::BadReport,
                format_args!(
                    "reported block {start:#x}+{len:#x} is not whole pages inside guest memory; ignored"
                ),
            );
            continue;
        }
        ranges.push(start..end);
    }
    ranges
}

/// The `(tag, value)` entries of a stats buffer, in order; a short tail is ignored.
pub fn stats_entries(
    chain: &[Descriptor],
    mem: &GuestMemoryMmap,
    log: &mut LogOnce,
) -> Vec<(u16, u64)> {
    let bytes = read_chain(chain, mem, MAX_STATS_BYTES, "statistics", log);
    bytes
        .chunks_exact(STATS_ENTRY_BYTES)
        .map(|e| {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut value = [0u8; 8];
            value.copy_from_slice(&e[2..10]);
            (tag, u64::from_le_bytes(value))
        })
        .collect()
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
