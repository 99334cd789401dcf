//! Giving the host memory behind guest pages back, for each kind of guest memory Kiln has.
//!
//! - A **booted** VM's memory is a memfd mapped shared. `MADV_DONTNEED` frees nothing there (it
//!   only drops this process's page table entries; the pages stay in the file), so the pages are
//!   punched out of the file with `fallocate(PUNCH_HOLE | KEEP_SIZE)`: the memory is freed, the
//!   file keeps its size, and a later touch finds a fresh zero page.
//! - A **restored** VM's memory is a private (copy-on-write) mapping of the snapshot's memory file,
//!   which clones share. The private copies are dropped with `MADV_DONTNEED`; the page then reads
//!   as the file's content again, which is stale but never seen where it matters: the guest holds
//!   the page free (without PAGE_POISON it assumes nothing of a free page's content), and
//!   snapshots leave it out by the free-page bitmap ([`super::free_pages`]), not by reading it.
//! - A VM restored with the **`Uffd`** backend has anonymous private memory that a page-fault
//!   handler fills ([`super::uffd`]). `MADV_DONTNEED` is the drop for anonymous memory too: the
//!   page goes, the kernel tells the handler (`UFFD_EVENT_REMOVE`, declared when the userfaultfd
//!   was made) and holds the call until the handler has read that, and the next touch is a
//!   missing-page fault again, served as the handler chooses (Firecracker's handlers serve zeros
//!   for removed ranges). The same free-page bitmap keeps the page out of snapshots.
//!
//! The options for the private mapping, measured on this machine (Linux 6.18, 256 MiB mapped
//! from a file and written, then half of it discarded as 4096 ranges of 32 KiB):
//!
//! | | time per range | anonymous memory | VMAs | page reads afterwards |
//! |---|---|---|---|---|
//! | `MADV_DONTNEED` | 3.7-4.0 us | 256 -> 128 MiB | 1 -> 1 | the file's content |
//! | `mmap(MAP_FIXED \| MAP_ANONYMOUS)` over the range | 8.3-8.4 us | 256 -> 128 MiB | 1 -> 8192 | zeros |
//! | `MADV_REMOVE` | - | EACCES on a private mapping | | |
//! | `MADV_FREE` | - | EINVAL on a file mapping | | |
//! | `MADV_PAGEOUT`, `MADV_COLD` | 1.5-4.5 us | unchanged (nothing to swap to) | 1 | |
//!
//! Mapping anonymous memory over each range would give zeros, but it splits the mapping into two
//! VMAs per range: a guest that frees memory in scattered 2-4 MiB blocks would soon leave
//! thousands of VMAs (every fault and KVM's memslot lookups walk them), and `vm.max_map_count`
//! (65530) bounds them, after which discards fail with ENOMEM. `MADV_DONTNEED` is twice as fast,
//! keeps one VMA, and frees the same memory, so it is the choice. (For comparison, the memfd's
//! `fallocate` punch took 8.6 us per range and `MADV_REMOVE` on the shared mapping 8.9 us; plain
//! `MADV_DONTNEED` there freed nothing, as said.)

use std::io;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress};

/// How a region's memory is given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)` on the file behind a shared mapping (the memfd).
    PunchHole,
    /// `madvise(MADV_REMOVE)` on a shared mapping with no file to punch (shared anonymous
    /// memory is a file inside the kernel).
    Remove,
    /// `madvise(MADV_DONTNEED)` on a private mapping (a restored VM's, file-backed or anonymous).
    DontNeed,
}

/// The method for `region`, from how it was mapped.
pub fn method(region: &GuestRegionMmap<AtomicBitmap>) -> Method {
    let shared = region.flags() & libc::MAP_SHARED != 0;
    match (shared, region.file_offset().is_some()) {
        (true, true) => Method::PunchHole,
        (true, false) => Method::Remove,
        (false, _) => Method::DontNeed,
    }
}

/// Gives back `len` bytes of `region` from `offset` (both whole pages, inside the region).
pub fn discard(region: &GuestRegionMmap<AtomicBitmap>, offset: u64, len: u64) -> io::Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    match method(region) {
        Method::PunchHole => {
            let Some(file) = region.file_offset() else {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            };
            let at = file.start() + offset;
            // SAFETY: fallocate on a descriptor the region owns; punching a hole changes what
            // the file holds, never which memory is mapped, so no reference becomes invalid.
            let rc = unsafe {
                libc::fallocate(
                    file.file().as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    at as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Method::Remove | Method::DontNeed => {
            let advice = if method(region) == Method::Remove {
                libc::MADV_REMOVE
            } else {
                libc::MADV_DONTNEED
            };
            let host = region
                .get_host_address(MemoryRegionAddress(offset))
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: `host..host+len` lies inside the region's live mapping (checked above);
            // the advice only drops page contents, the mapping itself stays, and the guest has
            // given these pages up, so nothing relies on what they held.
            let rc = unsafe { libc::madvise(host.cast(), len as usize, advice) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    const MIB: u64 = 1 << 20;

    /// Anonymous memory of this process in the mapping at `base`, in KiB, and the number of
    /// mappings that lie inside `base..base+len`.
    fn anon_and_vmas(base: u64, len: u64) -> (u64, usize) {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let (mut anon, mut vmas, mut inside) = (0, 0, false);
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
            {
                inside = lo >= base && hi <= base + len;
                vmas += usize::from(inside);
            } else if inside && let Some(v) = line.strip_prefix("Anonymous:") {
                anon += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap();
            }
        }
        (anon, vmas)
    }

    #[test]
    fn a_memfd_gets_holes_punched() {
        let (mem, memfd) = crate::memory::create(8 * MIB).unwrap();
        mem.write_slice(&vec![7u8; (8 * MIB) as usize], GuestAddress(0))
            .unwrap();
        let region = mem.iter().next().unwrap();
        assert_eq!(method(region), Method::PunchHole);
        let before = memfd.metadata().unwrap().blocks() * 512;
        discard(region, 2 * MIB, 4 * MIB).unwrap();
        let after = memfd.metadata().unwrap().blocks() * 512;
        assert_eq!(before - after, 4 * MIB, "the file's blocks went");
        assert_eq!(memfd.metadata().unwrap().len(), 8 * MIB, "its size stayed");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(3 * MIB)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(MIB)).unwrap(), 7);
        let e = discard(region, 6 * MIB, 4 * MIB).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EINVAL),
            "past the region's end"
        );
    }

    #[test]
    fn a_private_file_mapping_drops_its_copies_and_stays_one_mapping() {
        let path = std::env::temp_dir().join(format!("kiln-discard-{}", std::process::id()));
        std::fs::write(&path, vec![0x5au8; (16 * MIB) as usize]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let mem = crate::memory::map_snapshot(&file, 16 * MIB).unwrap();
        let region = mem.iter().next().unwrap();
        assert_eq!(method(region), Method::DontNeed);
        mem.write_slice(&vec![1u8; (16 * MIB) as usize], GuestAddress(0))
            .unwrap();
        let base = region.as_ptr() as u64;
        let (anon_before, vmas_before) = anon_and_vmas(base, 16 * MIB);
        assert!(
            anon_before >= 16 * 1024,
            "every page was copied: {anon_before} KiB"
        );
        // Every other 32 KiB, as scattered free blocks come.
        for i in 0..(16 * MIB / (64 << 10)) {
            discard(region, i * (64 << 10), 32 << 10).unwrap();
        }
        let (anon_after, vmas_after) = anon_and_vmas(base, 16 * MIB);
        assert!(
            anon_before - anon_after >= 8 * 1024,
            "half the copies went: {anon_before} -> {anon_after} KiB"
        );
        assert_eq!(vmas_after, vmas_before, "the mapping was not split");
        // A dropped page reads as the file again; a kept one as the guest wrote it.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 0x5a);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(32 << 10)).unwrap(), 1);
    }

    #[test]
    fn anonymous_memory_a_handler_serves_reports_its_drops_to_the_handler() {
        use crate::memory::uffd::{Event, UFFD_FEATURE_EVENT_REMOVE, Userfaultfd};
        let mem = crate::memory::map_anonymous(4 * MIB).unwrap();
        let region = mem.iter().next().unwrap();
        assert_eq!(method(region), Method::DontNeed);
        let base = region.as_ptr() as u64;
        let uffd = Userfaultfd::new(UFFD_FEATURE_EVENT_REMOVE).unwrap();
        uffd.register_missing(base, 4 * MIB).unwrap();
        uffd.copy(base, &vec![9u8; MIB as usize]).unwrap();
        // The drop waits until the handler has read of it, so it runs on a thread of its own.
        let dropper = {
            let mem = mem.clone();
            std::thread::spawn(move || discard(mem.iter().next().unwrap(), 64 << 10, 128 << 10))
        };
        let start = std::time::Instant::now();
        let event = loop {
            if let Some(e) = uffd.read_event().unwrap() {
                break e;
            }
            assert!(start.elapsed().as_secs() < 10, "the handler heard nothing");
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(
            event,
            Event::Remove {
                start: base + (64 << 10),
                end: base + (192 << 10)
            }
        );
        dropper.join().unwrap().unwrap();
        // A kept page still holds what was copied; a dropped one is missing again (the VMM's
        // own read of it would wait for the handler, so look at residency instead).
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 9);
        let mut resident = [0u8; 1];
        // SAFETY: mincore of one page inside the live mapping, into a 1-byte vector.
        let rc = unsafe {
            libc::mincore(
                (base + (64 << 10)) as *mut libc::c_void,
                4096,
                resident.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(resident[0] & 1, 0, "the dropped page is gone");
    }
}
