//! Which guest pages are free: reported free or put in the balloon, and not written since. The
//! balloon hands such pages here ([`GuestPages::discard`]); their host memory is given back at once
//! ([`super::discard`]) and they are remembered, so snapshots write them as holes.
//!
//! "Not written since" is learnt one of two ways:
//! - With KVM's dirty log, when it is on for diff snapshots (`track_dirty_pages`): every look at
//!   the logs (KVM's for the guest's writes, vm-memory's for the VMM's own, say a disk read) folds
//!   them into the pages written since the last snapshot (what a diff writes) and clears them
//!   from the free set. Order matters: the logs are read *before* pages are marked free, so a
//!   write from before the guest freed a page cannot unmark it, and the guest does not touch a
//!   page it gave up until the device used the chain naming it, so no write falls between.
//! - Without it, from the memory itself when a snapshot is taken: a booted VM's punched pages are
//!   holes in its memfd (a write fills them again), which the full snapshot skips on its own, so
//!   the record is not needed there; a restored VM's private mapping shows a written page as a
//!   private copy in `/proc/self/pagemap` ([`super::pagemap`]).
//!
//! KVM's log is not turned on for the balloon alone: it maps guest memory with 4 KiB pages only
//! and write-protects every page again at each look, so each first write after a report would
//! fault (measured in `cargo xtask bench memory`). Without the record a restored VM's discarded
//! pages would read as the snapshot file's stale content and be written again.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use kiln_devices::virtio::balloon::{DiscardError, GuestPages};
use kiln_snapshot::{PAGE_SIZE, PageBitmap};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::GuestMemoryMmap;
use super::discard::{Method, discard, method};
use super::pagemap::Pagemap;
use crate::persist::memory::take_vmm_dirty;

/// Reads (and clears) KVM's dirty log: one bitmap per memory slot, in region order.
pub type DirtyLog = Box<dyn Fn() -> Result<Vec<Vec<u64>>, String> + Send + Sync>;

/// Errors reading the dirty logs.
#[derive(Debug, thiserror::Error)]
pub enum FreePagesError {
    /// KVM's log could not be read.
    #[error("cannot read KVM's dirty page log: {0}")]
    KvmLog(String),
    /// `/proc/self/pagemap` could not be read.
    #[error("cannot read /proc/self/pagemap to tell which free pages were written: {0}")]
    Pagemap(std::io::Error),
    /// A log does not cover its region.
    #[error("the dirty page log of memory region {region} does not fit it: {err}")]
    Bitmap {
        /// The region's index.
        region: usize,
        /// Why.
        err: kiln_snapshot::BitmapError,
    },
}

/// What a snapshot needs to know about guest pages.
pub struct SnapshotPages {
    /// Per region: written since the last snapshot.
    pub dirty: Vec<PageBitmap>,
    /// Per region: free, to be written as holes.
    pub free: Vec<PageBitmap>,
}

struct Tracked {
    dirty: Vec<PageBitmap>,
    free: Vec<PageBitmap>,
}

/// The free-page record of one VM's guest memory.
pub struct FreePages {
    mem: GuestMemoryMmap,
    kvm_log: Option<DirtyLog>,
    state: Mutex<Tracked>,
    log_failure_reported: AtomicBool,
}

impl FreePages {
    /// A record for `mem` with no page free; `kvm_log` reads KVM's dirty log, when KVM logs.
    /// Without it the memory itself tells, when a snapshot is taken, which free pages were
    /// written since.
    pub fn new(mem: GuestMemoryMmap, kvm_log: Option<DirtyLog>) -> Self {
        let clean = || {
            mem.iter()
                .map(|r| PageBitmap::clean(r.len() / PAGE_SIZE))
                .collect::<Vec<_>>()
        };
        Self {
            state: Mutex::new(Tracked {
                dirty: clean(),
                free: clean(),
            }),
            mem,
            kvm_log,
            log_failure_reported: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracked> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Folds the writes since the last look into `dirty` and out of `free`.
    fn sync(&self, t: &mut Tracked) -> Result<(), FreePagesError> {
        let mut written = take_vmm_dirty(&self.mem);
        // Without KVM's log the guest's writes are found from the memory at snapshot time
        // ([`Self::verify`]).
        if let Some(read) = &self.kvm_log {
            let kvm = read().map_err(FreePagesError::KvmLog)?;
            for (region, (mine, guest)) in written.iter_mut().zip(kvm).enumerate() {
                mine.merge(&PageBitmap::new(guest))
                    .map_err(|err| FreePagesError::Bitmap { region, err })?;
            }
        }
        for (region, w) in written.iter().enumerate() {
            t.dirty[region]
                .merge(w)
                .map_err(|err| FreePagesError::Bitmap { region, err })?;
            t.free[region].subtract(w);
        }
        Ok(())
    }

    /// For a snapshot: the pages written since the last one (the record starts again from
    /// none) and the free pages.
    pub fn take_for_snapshot(&self) -> Result<SnapshotPages, FreePagesError> {
        let mut t = self.lock();
        self.sync(&mut t)?;
        if self.kvm_log.is_none() {
            self.verify(&mut t);
        }
        let dirty = t
            .dirty
            .iter_mut()
            .map(|d| std::mem::replace(d, PageBitmap::clean(d.pages())))
            .collect();
        Ok(SnapshotPages {
            dirty,
            free: t.free.clone(),
        })
    }

    /// Without KVM's log: takes the pages written since they were freed out of the free set.
    /// A private mapping's written pages are private copies again; a shared mapping (the memfd)
    /// needs no record, its freed pages are holes until written, so its set is emptied. If the
    /// page map cannot be read (no `/proc` in a jail, say), nothing stays free: the snapshot is
    /// bigger, never wrong.
    fn verify(&self, t: &mut Tracked) {
        let mut pagemap: Option<Pagemap> = None;
        for (region, free) in self.mem.iter().zip(t.free.iter_mut()) {
            if free.dirty_pages() == 0 {
                continue;
            }
            let written = if method(region) == Method::DontNeed {
                private_copies(&mut pagemap, region.as_ptr() as u64, free)
            } else {
                Err(None)
            };
            match written {
                Ok(w) => free.subtract(&w),
                Err(e) => {
                    if let Some(e) = e
                        && !self.log_failure_reported.swap(true, Ordering::Relaxed)
                    {
                        log::warn!("{e}; freed pages are kept in snapshots");
                    }
                    *free = PageBitmap::clean(free.pages());
                }
            }
        }
    }

    /// Bytes of guest memory known free now (as of the last look at the logs; without KVM's,
    /// pages written since are found at the next snapshot).
    pub fn free_bytes(&self) -> u64 {
        self.lock()
            .free
            .iter()
            .map(|f| f.dirty_pages() * PAGE_SIZE)
            .sum()
    }

    /// The region holding all of `range`, as its index, start and the region.
    fn region_of(
        &self,
        range: &Range<u64>,
    ) -> Option<(
        usize,
        u64,
        &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>,
    )> {
        self.mem.iter().enumerate().find_map(|(i, r)| {
            let start = r.start_addr().0;
            (range.start >= start && range.end <= start + r.len()).then_some((i, start, r))
        })
    }
}

/// The pages of `free` that are private copies in the mapping at host address `host`, opening
/// the page map into `pagemap` the first time.
fn private_copies(
    pagemap: &mut Option<Pagemap>,
    host: u64,
    free: &PageBitmap,
) -> Result<PageBitmap, Option<FreePagesError>> {
    let map = match pagemap {
        Some(m) => m,
        None => pagemap.insert(Pagemap::open().map_err(|e| Some(FreePagesError::Pagemap(e)))?),
    };
    let mut written = PageBitmap::clean(free.pages());
    for range in free.byte_ranges() {
        let first = range.start / PAGE_SIZE;
        map.private_copies(
            host + range.start,
            (range.end - range.start) / PAGE_SIZE,
            |i| written.set_dirty(first + i),
        )
        .map_err(|e| Some(FreePagesError::Pagemap(e)))?;
    }
    Ok(written)
}

impl GuestPages for FreePages {
    fn discard(&self, ranges: &[Range<u64>]) -> Result<u64, DiscardError> {
        let mut t = self.lock();
        // Read the logs first: writes from before the guest gave these pages up must not count
        // against them.
        let known = match self.sync(&mut t) {
            Ok(()) => true,
            Err(e) => {
                if !self.log_failure_reported.swap(true, Ordering::Relaxed) {
                    log::warn!("{e}; freed pages are given back but kept in snapshots");
                }
                false
            }
        };
        let mut given = 0;
        let mut failed = None;
        for range in ranges {
            let result = match self.region_of(range) {
                Some((index, start, region)) => {
                    let (offset, len) = (range.start - start, range.end - range.start);
                    if known {
                        t.free[index].set_range(offset / PAGE_SIZE..(offset + len) / PAGE_SIZE);
                    }
                    discard(region, offset, len).map(|()| len)
                }
                None => Err(std::io::Error::from_raw_os_error(libc::EFAULT)),
            };
            match result {
                Ok(len) => given += len,
                Err(err) => {
                    failed.get_or_insert(DiscardError {
                        range: range.clone(),
                        err,
                    });
                }
            }
        }
        failed.map_or(Ok(given), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};

    const P: u64 = PAGE_SIZE;
    const MIB: u64 = 1 << 20;

    /// A KVM log whose next answer the test sets.
    fn fake_log(mem: &GuestMemoryMmap) -> (DirtyLog, Arc<Mutex<Vec<Vec<u64>>>>) {
        let words: Vec<Vec<u64>> = mem
            .iter()
            .map(|r| vec![0; (r.len() / P).div_ceil(64) as usize])
            .collect();
        let next = Arc::new(Mutex::new(words.clone()));
        let shared = next.clone();
        let log: DirtyLog = Box::new(move || {
            let mut n = shared.lock().unwrap();
            let out = n.clone();
            for w in n.iter_mut().flatten() {
                *w = 0;
            }
            Ok(out)
        });
        (log, next)
    }

    fn free_ranges(p: &FreePages) -> Vec<Range<u64>> {
        p.take_for_snapshot().unwrap().free[0].byte_ranges()
    }

    #[test]
    fn discarded_pages_stay_free_until_the_guest_or_the_vmm_writes_them() {
        let (mem, memfd) = crate::memory::create(4 * MIB).unwrap();
        mem.write_slice(&vec![9u8; (4 * MIB) as usize], GuestAddress(0))
            .unwrap();
        take_vmm_dirty(&mem);
        let (log, next) = fake_log(&mem);
        // The guest wrote pages 0..16 before freeing them: still in KVM's log when reported.
        next.lock().unwrap()[0][0] = 0xffff;
        let pages = FreePages::new(mem.clone(), Some(log));
        let given = pages.discard(&[0..16 * P, MIB..2 * MIB]).unwrap();
        assert_eq!(given, 16 * P + MIB);
        assert_eq!(pages.free_bytes(), 16 * P + MIB);
        assert_eq!(
            memfd.metadata().unwrap().blocks() * 512,
            4 * MIB - 16 * P - MIB,
            "the host memory went"
        );

        // The guest writes page 3 again; the VMM writes into the second range.
        next.lock().unwrap()[0][0] = 1 << 3;
        mem.write_obj(1u8, GuestAddress(MIB + 5 * P)).unwrap();
        let snap = pages.take_for_snapshot().unwrap();
        assert_eq!(
            snap.free[0].byte_ranges(),
            vec![
                0..3 * P,
                4 * P..16 * P,
                MIB..MIB + 5 * P,
                MIB + 6 * P..2 * MIB
            ]
        );
        assert!(snap.dirty[0].is_dirty(3) && snap.dirty[0].is_dirty(MIB / P + 5));
        assert!(
            snap.dirty[0].is_dirty(0),
            "writes seen at discard time count as dirty too"
        );
        let again = pages.take_for_snapshot().unwrap();
        assert_eq!(
            again.dirty[0].dirty_pages(),
            0,
            "a snapshot starts the dirty record anew"
        );
        assert_eq!(
            again.free, snap.free,
            "free pages stay free across snapshots"
        );
    }

    #[test]
    fn without_kvms_log_a_booted_vm_leaves_free_pages_to_its_memfds_holes() {
        let (mem, memfd) = crate::memory::create(2 * MIB).unwrap();
        mem.write_slice(&vec![9u8; (2 * MIB) as usize], GuestAddress(0))
            .unwrap();
        let pages = FreePages::new(mem, None);
        pages.discard(std::slice::from_ref(&(0..MIB))).unwrap();
        assert_eq!(memfd.metadata().unwrap().blocks() * 512, MIB);
        assert!(
            free_ranges(&pages).is_empty(),
            "the holes are the record; the set is not needed"
        );
    }

    #[test]
    fn without_kvms_log_a_restored_vm_finds_written_pages_in_the_page_map() {
        // A snapshot's memory file full of old data, mapped privately as a restore does.
        let path = std::env::temp_dir().join(format!("kiln-free-pages-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; (4 * MIB) as usize]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let mem = crate::memory::map_snapshot(&file, 4 * MIB).unwrap();
        mem.write_slice(&vec![9u8; (2 * MIB) as usize], GuestAddress(0))
            .unwrap();
        let pages = FreePages::new(mem.clone(), None);
        pages.discard(std::slice::from_ref(&(0..2 * MIB))).unwrap();
        // The private copies went: the pages read as the file's old data again.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(P)).unwrap(), 7);
        take_vmm_dirty(&mem);
        // The guest writes two pages again (a raw write, as KVM's would be: no VMM log).
        let region = mem.iter().next().unwrap();
        // SAFETY: offsets inside the region's mapping, which `mem` keeps alive.
        unsafe {
            std::ptr::write_volatile(region.as_ptr().add(3 * P as usize), 1);
            std::ptr::write_volatile(region.as_ptr().add((MIB + 8 * P) as usize), 1);
        }
        assert_eq!(
            free_ranges(&pages),
            vec![0..3 * P, 4 * P..MIB + 8 * P, MIB + 9 * P..2 * MIB]
        );
    }

    #[test]
    fn a_failing_log_keeps_pages_out_of_the_free_set_and_bad_ranges_are_named() {
        let (mem, _memfd) = crate::memory::create(2 * MIB).unwrap();
        let fail: DirtyLog = Box::new(|| Err("KVM_GET_DIRTY_LOG failed: ENOENT".into()));
        let pages = FreePages::new(mem.clone(), Some(fail));
        assert_eq!(pages.discard(std::slice::from_ref(&(0..MIB))).unwrap(), MIB);
        assert_eq!(pages.free_bytes(), 0);
        let e = pages.take_for_snapshot().err().unwrap().to_string();
        assert_eq!(
            e,
            "cannot read KVM's dirty page log: KVM_GET_DIRTY_LOG failed: ENOENT"
        );

        let (log, _) = fake_log(&mem);
        let pages = FreePages::new(mem, Some(log));
        let e = pages.discard(&[0..P, 2 * MIB..2 * MIB + P]).unwrap_err();
        assert_eq!(e.range, 2 * MIB..2 * MIB + P);
        assert!(
            e.to_string()
                .starts_with("cannot give back guest memory 0x200000..0x201000")
        );
        assert_eq!(pages.free_bytes(), P, "the good range was still taken");
    }
}
