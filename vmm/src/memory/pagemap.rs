//! Which pages of a private file mapping were written since their private copies were dropped,
//! read from `/proc/self/pagemap` (one 64-bit entry per page of this process's address space).
//!
//! A restored VM's memory is a private mapping of the snapshot file. After the balloon drops a
//! page's private copy (`MADV_DONTNEED`), the page is either not mapped or maps the file's page
//! (a read); the first write after that makes a new anonymous copy. So a page is written since it
//! was given back exactly when its entry shows an anonymous page: present and not file-backed,
//! or swapped out (only anonymous pages swap). This is what lets snapshots leave free pages out
//! without KVM logging every guest write (see [`super::free_pages`]). No privilege is needed:
//! only the page frame numbers are hidden from unprivileged readers, not these flags.
//!
//! A VM restored with the `Uffd` backend has anonymous memory from the start: a dropped page that
//! the guest touches again is served by the handler as a new anonymous page (the zero page
//! included), read or written. So there a freed page the guest only read counts as written too,
//! and the snapshot keeps it: bigger, never wrong.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

/// `/proc/self/pagemap`: page present in RAM.
const PRESENT: u64 = 1 << 63;
/// Page swapped out.
const SWAPPED: u64 = 1 << 62;
/// Page is a file page or shared anonymous memory (not a private copy).
const FILE: u64 = 1 << 61;
/// Entries read per system call (512 KiB, 256 MiB of guest memory).
const CHUNK: usize = 64 * 1024;

/// Whether a pagemap entry is a private anonymous page (a copy this process wrote).
pub fn is_private_copy(entry: u64) -> bool {
    entry & SWAPPED != 0 || (entry & PRESENT != 0 && entry & FILE == 0)
}

/// This process's page map.
pub struct Pagemap(File);

impl Pagemap {
    /// Opens `/proc/self/pagemap`.
    pub fn open() -> io::Result<Self> {
        File::open("/proc/self/pagemap").map(Self)
    }

    /// Calls `written(i)` for each page `i` of the `pages` pages from host address `addr` (page
    /// aligned) that is a private copy.
    pub fn private_copies(
        &mut self,
        addr: u64,
        pages: u64,
        mut written: impl FnMut(u64),
    ) -> io::Result<()> {
        self.entries(addr, pages, |i, entry| {
            if is_private_copy(entry) {
                written(i);
            }
        })
    }

    /// Calls `each(i, entry)` with the page map entry of each page `i` of the `pages` pages from
    /// host address `addr` (page aligned).
    pub fn entries(
        &mut self,
        addr: u64,
        pages: u64,
        mut each: impl FnMut(u64, u64),
    ) -> io::Result<()> {
        let first = addr / kiln_snapshot::PAGE_SIZE;
        self.0.seek(SeekFrom::Start(first * 8))?;
        let mut buf = vec![0u8; CHUNK.min(pages as usize) * 8];
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(CHUNK as u64) as usize;
            self.0.read_exact(&mut buf[..n * 8])?;
            for (i, e) in buf[..n * 8].chunks_exact(8).enumerate() {
                each(
                    done + i as u64,
                    u64::from_le_bytes(e.try_into().unwrap_or_default()),
                );
            }
            done += n as u64;
        }
        Ok(())
    }
}

/// Whether a pagemap entry is a page this process has mapped (present, or swapped out).
pub fn is_mapped(entry: u64) -> bool {
    entry & (PRESENT | SWAPPED) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    const P: usize = 4096;

    #[test]
    fn only_written_pages_of_a_private_file_mapping_are_private_copies() {
        let mut f = tempfile_with(&vec![7u8; 8 * P]);
        f.flush().unwrap();
        // SAFETY: a fresh private mapping of 8 pages of a file we own, unmapped at the end; no
        // Rust reference into it outlives the test.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8 * P,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let b = base as *mut u8;
        // SAFETY: every offset is inside the 8-page mapping made above.
        unsafe {
            let _ = std::ptr::read_volatile(b.add(P)); // read: the file's page
            std::ptr::write_volatile(b.add(2 * P), 1); // written: a private copy
            std::ptr::write_volatile(b.add(3 * P), 1); // written, then given back
            assert_eq!(
                libc::madvise(b.add(3 * P).cast(), P, libc::MADV_DONTNEED),
                0
            );
            let _ = std::ptr::read_volatile(b.add(3 * P)); // and read again: the file's
            std::ptr::write_volatile(b.add(5 * P), 1); // written
        }
        let mut seen = Vec::new();
        Pagemap::open()
            .unwrap()
            .private_copies(base as u64, 8, |i| seen.push(i))
            .unwrap();
        assert_eq!(seen, vec![2, 5]);
        // SAFETY: the mapping made above, not used after.
        unsafe { libc::munmap(base, 8 * P) };
    }

    fn tempfile_with(bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!("kiln-pagemap-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(bytes).unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}
