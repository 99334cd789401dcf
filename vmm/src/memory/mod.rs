//! Guest memory: one memfd backs all of it, mapped shared, laid out around the 32-bit MMIO gap.
//!
//! A memfd (not anonymous memory) so that later snapshots can write it out and restores can map a
//! file in its place, and so that copy-on-write sharing between VMs has a file to share.
//!
//! A restored VM maps its snapshot's memory file privately instead ([`map_snapshot`]), or, when a
//! page-fault handler serves its memory (the `Uffd` backend), anonymous memory that the handler
//! fills through a userfaultfd ([`map_anonymous`], [`uffd`]).
//!
//! [`discard`] gives the host memory behind guest pages back (for a memfd and for a restored VM's
//! private mapping alike), and [`free_pages`] remembers which pages the guest gave up, for
//! snapshots ([`pagemap`] tells which of a restored VM's were written since). [`thp`] keeps
//! transparent huge pages off for the VMM's own memory.

pub mod discard;
pub mod free_pages;
pub mod pagemap;
pub mod thp;
pub mod uffd;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use kiln_api::requests::machine_config::HugePages;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// The guest memory type used throughout the VMM: every region carries a bitmap of the pages the
/// VMM itself wrote (device rings, disk reads), which diff snapshots add to KVM's dirty log.
pub use kiln_devices::GuestMemoryMmap;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("cannot create the guest memory file (memfd_create): {0}")]
    Memfd(std::io::Error),
    /// 2 MiB huge pages could not back guest memory.
    #[error(
        "cannot back {size} bytes of guest memory with 2 MiB huge pages: {err} (reserve them: echo N > /proc/sys/vm/nr_hugepages)"
    )]
    HugePages {
        /// Guest memory size.
        size: u64,
        /// Why.
        err: std::io::Error,
    },
    /// Sizing the memfd failed.
    #[error("cannot size the guest memory file to {size} bytes: {err}")]
    Resize {
        /// Requested size.
        size: u64,
        /// Why it failed.
        err: std::io::Error,
    },
    /// Mapping a snapshot's memory file failed.
    #[error("cannot map {size} bytes of the snapshot's memory file: {err}")]
    MapFile {
        /// Guest memory size.
        size: u64,
        /// Why it failed.
        err: vm_memory::mmap::MmapRegionError,
    },
    /// Mapping anonymous memory for a page-fault handler failed.
    #[error("cannot map {size} bytes of anonymous guest memory: {err}")]
    MapAnonymous {
        /// Guest memory size.
        size: u64,
        /// Why it failed.
        err: vm_memory::mmap::MmapRegionError,
    },
    /// The regions overlap or wrap (a bug in the layout).
    #[error("guest memory regions overlap")]
    Overlap,
    /// Mapping the regions failed.
    #[error("cannot map {size} bytes of guest memory: {err}")]
    Map {
        /// Requested size.
        size: u64,
        /// Why it failed.
        err: vm_memory::mmap::FromRangesError,
    },
}

/// The RAM ranges `(guest address, length)` for `size` bytes of guest memory: below the MMIO gap
/// first, the rest from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// Where each RAM range lives in the memory file: `(guest address, length, file offset)`. The
/// memfd of a booted VM and a snapshot's memory file use the same layout.
pub fn file_layout(size: u64) -> Vec<(GuestAddress, u64, u64)> {
    let mut offset = 0;
    ram_ranges(size)
        .into_iter()
        .map(|(addr, len)| {
            let here = offset;
            offset += len;
            (addr, len, here)
        })
        .collect()
}

/// End (exclusive) of RAM below the MMIO gap.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

/// Creates `size` bytes of guest memory backed by a new memfd. Returns the memory and the memfd.
pub fn create(size: u64) -> Result<(GuestMemoryMmap, File), MemoryError> {
    create_with(size, HugePages::None)
}

/// [`create`] with the pages `huge_pages` asks for: 2 MiB hugetlbfs pages (a hugetlb memfd; the
/// host must have them reserved, and a shortfall is an error naming the size), or transparent
/// huge pages asked for with `madvise(MADV_HUGEPAGE)` (a hint the kernel may ignore).
pub fn create_with(
    size: u64,
    huge_pages: HugePages,
) -> Result<(GuestMemoryMmap, File), MemoryError> {
    let flags = match huge_pages {
        HugePages::Hugetlbfs2M => libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
        HugePages::None | HugePages::Transparent => libc::MFD_CLOEXEC,
    };
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"kiln-guest-mem".as_ptr(), flags) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(match huge_pages {
            HugePages::Hugetlbfs2M => MemoryError::HugePages { size, err },
            _ => MemoryError::Memfd(err),
        });
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|err| MemoryError::Resize { size, err })?;

    let mut regions = Vec::new();
    for (addr, len, file_offset) in file_layout(size) {
        let clone = file.try_clone().map_err(MemoryError::Memfd)?;
        regions.push((
            addr,
            len as usize,
            Some(FileOffset::new(clone, file_offset)),
        ));
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(regions)
        .map_err(|err| MemoryError::Map { size, err })?;
    match huge_pages {
        HugePages::Transparent => {
            // kiln-vmm turns THP off for itself at start (see [`thp`]); this memory wants it.
            if let Err(e) = thp::enable_for_process() {
                log::warn!(
                    "transparent huge pages: cannot turn them back on for this process ({e}); guest memory uses 4 KiB pages"
                );
            }
            for region in mem.iter() {
                // SAFETY: the range is one mapping of guest memory this process owns; the
                // advice changes only how the kernel backs it, not its contents.
                let rc = unsafe {
                    libc::madvise(
                        region.as_ptr().cast(),
                        region.len() as usize,
                        libc::MADV_HUGEPAGE,
                    )
                };
                if rc != 0 {
                    log::warn!(
                        "transparent huge pages: madvise failed ({}); guest memory uses 4 KiB pages",
                        std::io::Error::last_os_error()
                    );
                }
            }
        }
        HugePages::Hugetlbfs2M => {
            // Touching the pool now turns a shortfall into an error here, not a SIGBUS when
            // the guest first touches a page: fallocate reserves every huge page.
            // SAFETY: fallocate on the memfd we own, over its own length.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
            if rc != 0 {
                return Err(MemoryError::HugePages {
                    size,
                    err: std::io::Error::last_os_error(),
                });
            }
        }
        HugePages::None => {}
    }
    Ok((mem, file))
}

/// Maps `size` bytes of guest memory privately from `file` (a snapshot's memory file, laid out by
/// [`file_layout`]): pages are read from the file when the guest first touches them, writes stay
/// in this process, and every VM mapping the same file shares its page cache.
pub fn map_snapshot(file: &File, size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    for (addr, len, offset) in file_layout(size) {
        let clone = file.try_clone().map_err(MemoryError::Memfd)?;
        let region =
            MmapRegionBuilder::new_with_bitmap(len as usize, AtomicBitmap::with_len(len as usize))
                .with_file_offset(FileOffset::new(clone, offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
                .build()
                .map_err(|err| MemoryError::MapFile { size, err })?;
        regions.push(GuestRegionMmap::new(region, addr).ok_or(MemoryError::Overlap)?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Overlap)
}

/// Maps `size` bytes of guest memory anonymous and private, region by region as
/// [`file_layout`] lays them out, for a page-fault handler to fill (the `Uffd` backend): every
/// page is missing until the handler copies it in, and a dropped page (`MADV_DONTNEED`) is
/// missing again.
pub fn map_anonymous(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    for (addr, len, _) in file_layout(size) {
        let region =
            MmapRegionBuilder::new_with_bitmap(len as usize, AtomicBitmap::with_len(len as usize))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
                .build()
                .map_err(|err| MemoryError::MapAnonymous { size, err })?;
        regions.push(GuestRegionMmap::new(region, addr).ok_or(MemoryError::Overlap)?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Overlap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_memory_is_one_range_below_the_gap() {
        assert_eq!(ram_ranges(128 * MIB), vec![(GuestAddress(0), 128 * MIB)]);
        assert_eq!(ram_ranges(3 * GIB), vec![(GuestAddress(0), 3 * GIB)]);
        assert_eq!(low_ram_end(128 * MIB), 128 * MIB);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        assert_eq!(
            ram_ranges(5 * GIB),
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), 2 * GIB)]
        );
        assert_eq!(low_ram_end(5 * GIB), 3 * GIB);
    }

    #[test]
    fn memfd_backs_both_regions_at_distinct_offsets() {
        // Regions are mapped lazily, so 3.5 GiB of address space costs nothing here.
        let (mem, file) = create(3 * GIB + 512 * MIB).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert_eq!(file.metadata().unwrap().len(), 3 * GIB + 512 * MIB);
        let offsets: Vec<u64> = mem
            .iter()
            .map(|r| r.file_offset().map(|f| f.start()).unwrap())
            .collect();
        assert_eq!(offsets, vec![0, 3 * GIB]);
        mem.write_obj(0xdead_beef_u32, GuestAddress(4 * GIB + 8))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(4 * GIB + 8)).unwrap(),
            0xdead_beef
        );
        assert!(
            mem.write_obj(1u8, GuestAddress(3 * GIB + 1)).is_err(),
            "the gap is not RAM"
        );
    }

    #[test]
    fn anonymous_memory_has_the_file_layout_and_no_file() {
        let mem = map_anonymous(3 * GIB + 512 * MIB).unwrap();
        let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions, vec![(0, 3 * GIB), (4 * GIB, 512 * MIB)]);
        for r in mem.iter() {
            assert!(r.file_offset().is_none());
            assert_eq!(
                discard::method(r),
                discard::Method::DontNeed,
                "dropped with MADV_DONTNEED"
            );
        }
        assert_eq!(mem.read_obj::<u64>(GuestAddress(4 * GIB)).unwrap(), 0);
    }
}
