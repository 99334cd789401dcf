//! Guest memory in a snapshot's memory file: the file has the memfd's layout (RAM below the MMIO
//! gap, then the rest), so restoring maps it region by region at the same offsets.
//!
//! A full snapshot writes every page that holds data; all-zero pages are left as holes, which
//! read back as zeros. A diff snapshot writes exactly the pages that changed since the previous
//! snapshot (KVM's dirty log for vCPU writes, vm-memory's bitmap for the VMM's own writes), zero
//! pages included, and leaves everything else a hole. Neither looks at page residency (mincore):
//! a page swapped out to zram, or never touched, is still known to be dirty or clean.
//!
//! Both leave out the pages the guest gave up (reported free or in the balloon, and not written
//! since: [`crate::memory::free_pages`]): a full snapshot writes them as holes without reading
//! them, a diff does not write them, so merging keeps whatever the base had there, which the guest
//! does not care about either.
//!
//! After guest memory the file carries one trailer page naming the snapshot it belongs to, so a
//! state file is never paired with another snapshot's memory.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use kiln_snapshot::{PAGE_SIZE, PageBitmap};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemoryMmap;

/// The trailer's magic: "KILNMEM" and a version byte.
const TRAILER_MAGIC: [u8; 8] = *b"KILNMEM1";
/// How much is copied out of guest memory at a time.
const CHUNK: usize = 1 << 20;

/// Errors writing or checking a memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// Writing failed.
    #[error("cannot write the memory file: {0}")]
    Write(std::io::Error),
    /// Guest memory could not be read.
    #[error("cannot read guest memory at {addr:#x}: {why}")]
    Read {
        /// Guest address.
        addr: u64,
        /// Why.
        why: String,
    },
    /// The memfd's data ranges could not be found.
    #[error("cannot find the written parts of guest memory: {0}")]
    Ranges(String),
    /// The file is too short for the snapshot's memory.
    #[error(
        "memory file is {len} bytes; the snapshot needs {want} (guest memory and a trailer page); it is truncated or belongs to another VM"
    )]
    TooShort {
        /// File length.
        len: u64,
        /// Needed.
        want: u64,
    },
    /// The trailer is missing or names another snapshot.
    #[error("{0}")]
    Mismatch(String),
    /// The file cannot be read.
    #[error("cannot read the memory file: {0}")]
    Io(std::io::Error),
}

/// The trailer page written at `mem_size`.
fn trailer(id: u64, mem_size: u64) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    page[..8].copy_from_slice(&TRAILER_MAGIC);
    page[8..16].copy_from_slice(&id.to_le_bytes());
    page[16..24].copy_from_slice(&mem_size.to_le_bytes());
    page
}

/// Checks that `file` holds `mem_size` bytes of guest memory for snapshot `id`.
pub fn check_file(file: &File, mem_size: u64, id: u64) -> Result<(), MemoryFileError> {
    let len = file.metadata().map_err(MemoryFileError::Io)?.len();
    let want = mem_size.saturating_add(PAGE_SIZE);
    if len < want {
        return Err(MemoryFileError::TooShort { len, want });
    }
    let mut page = vec![0u8; 24];
    file.read_exact_at(&mut page, mem_size)
        .map_err(MemoryFileError::Io)?;
    if page[..8] != TRAILER_MAGIC {
        return Err(MemoryFileError::Mismatch(
            "memory file has no Kiln trailer after guest memory; it is not a Kiln memory file"
                .into(),
        ));
    }
    let file_id = u64::from_le_bytes(page[8..16].try_into().unwrap_or_default());
    let file_size = u64::from_le_bytes(page[16..24].try_into().unwrap_or_default());
    if file_size != mem_size || file_id != id {
        return Err(MemoryFileError::Mismatch(format!(
            "memory file belongs to snapshot {file_id:016x} ({file_size} bytes of memory), not to this state file's snapshot {id:016x} ({mem_size} bytes); for a diff snapshot, merge its memory into the base first (kiln snapshot merge)"
        )));
    }
    Ok(())
}

/// Copies `len` bytes of guest memory at `addr` into `buf`.
fn read_guest(mem: &GuestMemoryMmap, addr: u64, buf: &mut [u8]) -> Result<(), MemoryFileError> {
    mem.read_slice(buf, GuestAddress(addr))
        .map_err(|e| MemoryFileError::Read {
            addr,
            why: e.to_string(),
        })
}

/// Writes the non-zero pages of `buf` (guest memory copied from file offset `offset`).
fn write_nonzero_pages(out: &File, buf: &[u8], offset: u64) -> Result<u64, MemoryFileError> {
    let mut written = 0;
    let page = PAGE_SIZE as usize;
    let mut run_start = None;
    for (i, chunk) in buf.chunks(page).enumerate() {
        let zero = chunk.iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(start)) => {
                let bytes = &buf[start * page..i * page];
                out.write_all_at(bytes, offset + (start * page) as u64)
                    .map_err(MemoryFileError::Write)?;
                written += bytes.len() as u64;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        let bytes = &buf[start * page..];
        out.write_all_at(bytes, offset + (start * page) as u64)
            .map_err(MemoryFileError::Write)?;
        written += bytes.len() as u64;
    }
    Ok(written)
}

/// `want` (sorted, disjoint) without the parts `holes` (sorted, disjoint) covers.
fn subtract_ranges(want: Vec<Range<u64>>, holes: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::with_capacity(want.len());
    let mut h = 0;
    for mut r in want {
        while h < holes.len() && holes[h].end <= r.start {
            h += 1;
        }
        let mut i = h;
        while i < holes.len() && holes[i].start < r.end {
            if holes[i].start > r.start {
                out.push(r.start..holes[i].start);
            }
            r.start = r.start.max(holes[i].end);
            i += 1;
        }
        if r.start < r.end {
            out.push(r);
        }
    }
    out
}

/// The parts of each region worth reading for a full snapshot, as `(guest address, file offset,
/// length)`: with a memfd, only its data ranges (pages the guest never touched, or the balloon
/// gave back, are holes there); otherwise all of it; in both cases without the free pages.
fn full_ranges(
    mem: &GuestMemoryMmap,
    memfd: Option<&File>,
    free: &[PageBitmap],
) -> Result<Vec<(u64, u64, u64)>, MemoryFileError> {
    let data = match memfd {
        Some(f) => Some(
            kiln_snapshot::data_ranges(f, std::path::Path::new("guest memory memfd"))
                .map_err(|e| MemoryFileError::Ranges(e.to_string()))?,
        ),
        None => None,
    };
    let mut out = Vec::new();
    let mut file_offset = 0;
    for (index, region) in mem.iter().enumerate() {
        let (base, len) = (region.start_addr().0, region.len());
        // Region-relative ranges to read.
        let want: Vec<Range<u64>> = match &data {
            None => std::iter::once(0..len).collect(),
            Some(ranges) => ranges
                .iter()
                .filter_map(|r| {
                    let start = r.start.max(file_offset);
                    let end = r.end.min(file_offset + len);
                    (start < end).then(|| start - file_offset..end - file_offset)
                })
                .collect(),
        };
        let holes = free
            .get(index)
            .map(PageBitmap::byte_ranges)
            .unwrap_or_default();
        for r in subtract_ranges(want, &holes) {
            out.push((base + r.start, file_offset + r.start, r.end - r.start));
        }
        file_offset += len;
    }
    Ok(out)
}

/// Writes all guest memory (its non-zero pages, free pages left out) and the trailer; returns
/// the data bytes written.
pub fn write_full(
    out: &File,
    mem: &GuestMemoryMmap,
    memfd: Option<&File>,
    free: &[PageBitmap],
    id: u64,
) -> Result<u64, MemoryFileError> {
    let mem_size: u64 = mem.iter().map(|r| r.len()).sum();
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    for (addr, offset, len) in full_ranges(mem, memfd, free)? {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            read_guest(mem, addr + done, &mut buf[..n])?;
            written += write_nonzero_pages(out, &buf[..n], offset + done)?;
            done += n as u64;
        }
    }
    finish(out, mem_size, id)?;
    Ok(written)
}

/// Writes the pages `dirty` marks and `free` does not (one bitmap each per region, in order) and
/// the trailer; returns the bytes written.
pub fn write_diff(
    out: &File,
    mem: &GuestMemoryMmap,
    dirty: &[PageBitmap],
    free: &[PageBitmap],
    id: u64,
) -> Result<u64, MemoryFileError> {
    let mem_size: u64 = mem.iter().map(|r| r.len()).sum();
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    let mut file_offset = 0;
    for (index, (region, bitmap)) in mem.iter().zip(dirty).enumerate() {
        let (base, len) = (region.start_addr().0, region.len());
        let mut bitmap = bitmap.clone();
        if let Some(f) = free.get(index) {
            bitmap.subtract(f);
        }
        for range in bitmap.byte_ranges() {
            let end = range.end.min(len);
            let mut at = range.start;
            while at < end {
                let n = (end - at).min(CHUNK as u64) as usize;
                read_guest(mem, base + at, &mut buf[..n])?;
                out.write_all_at(&buf[..n], file_offset + at)
                    .map_err(MemoryFileError::Write)?;
                written += n as u64;
                at += n as u64;
            }
        }
        file_offset += len;
    }
    finish(out, mem_size, id)?;
    Ok(written)
}

fn finish(out: &File, mem_size: u64, id: u64) -> Result<(), MemoryFileError> {
    out.write_all_at(&trailer(id, mem_size), mem_size)
        .map_err(MemoryFileError::Write)?;
    out.set_len(mem_size + PAGE_SIZE)
        .map_err(MemoryFileError::Write)
}

/// Takes (and clears) the VMM's own record of the pages it wrote, one bitmap per region.
pub fn take_vmm_dirty(mem: &GuestMemoryMmap) -> Vec<PageBitmap> {
    mem.iter()
        .map(|region| {
            // The mapping's own bitmap (through Deref), not the region trait's slice view.
            let bitmap: &AtomicBitmap = vm_memory::MmapRegion::bitmap(region);
            PageBitmap::new(bitmap.get_and_reset())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn tmp(name: &str) -> File {
        let path = std::env::temp_dir().join(format!("kiln-memfile-{}-{name}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn full_skips_zero_pages_and_diff_writes_exactly_the_dirty_ones() {
        let (mem, memfd) = crate::memory::create(1 << 20).unwrap();
        mem.write_slice(&[7u8; 10], GuestAddress(0x3000)).unwrap();
        mem.write_slice(&[9u8; 1], GuestAddress(0x8_0000)).unwrap();
        let full = tmp("full");
        let written = write_full(&full, &mem, Some(&memfd), &[], 42).unwrap();
        assert_eq!(written, 2 * PAGE_SIZE, "two pages hold data");
        check_file(&full, 1 << 20, 42).unwrap();
        let mut b = [0u8; 10];
        full.read_exact_at(&mut b, 0x3000).unwrap();
        assert_eq!(b, [7; 10]);
        let ranges = kiln_snapshot::data_ranges(&full, std::path::Path::new("full")).unwrap();
        assert!(
            ranges.iter().map(|r| r.end - r.start).sum::<u64>() <= 3 * PAGE_SIZE,
            "zero pages stay holes: {ranges:?}"
        );

        // The VMM's own writes are tracked; a diff of them writes those pages, zeros included.
        let _ = take_vmm_dirty(&mem);
        mem.write_slice(&[0u8; 8], GuestAddress(0x5000)).unwrap();
        mem.write_slice(&[1u8; 8], GuestAddress(0x9_0000)).unwrap();
        let dirty = take_vmm_dirty(&mem);
        assert_eq!(dirty[0].dirty_pages(), 2);
        let diff = tmp("diff");
        assert_eq!(
            write_diff(&diff, &mem, &dirty, &[], 43).unwrap(),
            2 * PAGE_SIZE
        );
        check_file(&diff, 1 << 20, 43).unwrap();
        assert_eq!(take_vmm_dirty(&mem)[0].dirty_pages(), 0, "taking clears");
    }

    #[test]
    fn ranges_are_subtracted() {
        assert_eq!(
            subtract_ranges(vec![0..10, 20..30, 40..50], &[5..8, 9..22, 25..26, 45..60]),
            vec![0..5, 8..9, 22..25, 26..30, 40..45]
        );
        let one = |r: Range<u64>| std::iter::once(r).collect::<Vec<_>>();
        assert_eq!(subtract_ranges(one(0..10), &[]), one(0..10));
        assert!(subtract_ranges(one(3..4), &one(0..10)).is_empty());
    }

    #[test]
    fn free_pages_are_holes_in_full_snapshots_and_left_out_of_diffs() {
        // A restored VM: memory mapped privately from a file full of old data.
        let path = std::env::temp_dir().join(format!("kiln-freesnap-{}", std::process::id()));
        std::fs::write(&path, vec![3u8; 1 << 20]).unwrap();
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let mem = crate::memory::map_snapshot(&file, 1 << 20).unwrap();
        let mut free = PageBitmap::clean(256);
        free.set_range(16..256);
        let full = tmp("free-full");
        let written = write_full(&full, &mem, None, std::slice::from_ref(&free), 9).unwrap();
        assert_eq!(written, 16 * PAGE_SIZE, "only the pages in use");
        let ranges = kiln_snapshot::data_ranges(&full, std::path::Path::new("full")).unwrap();
        let data: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        assert!(data <= 17 * PAGE_SIZE, "free pages are holes: {ranges:?}");
        let mut b = [0u8; 1];
        full.read_exact_at(&mut b, 20 * PAGE_SIZE).unwrap();
        assert_eq!(
            b,
            [0],
            "a free page reads back as zeros, not the stale file"
        );

        let mut dirty = PageBitmap::clean(256);
        dirty.set_range(10..20);
        let diff = tmp("free-diff");
        let written = write_diff(&diff, &mem, &[dirty], &[free], 10).unwrap();
        assert_eq!(
            written,
            6 * PAGE_SIZE,
            "dirty pages 10..16; 16..20 are free"
        );
    }

    #[test]
    fn the_trailer_pairs_memory_with_its_state_file() {
        let (mem, memfd) = crate::memory::create(1 << 20).unwrap();
        let f = tmp("trailer");
        write_full(&f, &mem, Some(&memfd), &[], 7).unwrap();
        let e = check_file(&f, 1 << 20, 8).unwrap_err().to_string();
        assert!(e.contains("merge its memory into the base first"), "{e}");
        let e = check_file(&f, 2 << 20, 7).unwrap_err().to_string();
        assert!(e.contains("is truncated or belongs to another VM"), "{e}");
        f.write_all_at(b"garbage!", 1 << 20).unwrap();
        let e = check_file(&f, 1 << 20, 7).unwrap_err().to_string();
        assert!(e.contains("not a Kiln memory file"), "{e}");
    }
}
