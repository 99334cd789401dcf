//! Working sets: the guest pages a VM restored from a snapshot has touched since the load, saved
//! by `PUT /snapshot/working-set` and mapped in ahead by later loads of the same snapshot
//! (`working_set_path` on `PUT /snapshot/load`).
//!
//! A restored VM's memory is a private mapping of the memory file, so each page the guest touches
//! first is a page fault in the host (and, in a nested lab, an exit to the outer hypervisor too).
//! What a fresh clone touches up to its first result is much the same every time (the agent, the
//! exec path, the command's binary), so a caller that records it once, after one restore's first
//! command, lets every later restore populate those pages in two `madvise` calls per range
//! (`MADV_POPULATE_WRITE` for pages the guest wrote: their private copies are made ahead;
//! `MADV_POPULATE_READ` for pages it only read: they map the memory file's page cache, which
//! clones share) before the vCPUs run.
//!
//! Which pages were touched comes from `/proc/self/pagemap` ([`crate::memory::pagemap`]): a
//! private copy was written, any other mapped page was read. The file is JSON and names the
//! snapshot (its id and memory size), so a working set is never applied to another snapshot's
//! memory; an unreadable, foreign or out-of-range one fails the load by name.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

use kvm_bindings::kvm_pre_fault_memory;
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use super::PersistError;
use crate::memory::GuestMemoryMmap;
use crate::memory::pagemap::{Pagemap, is_mapped, is_private_copy};

/// The file format's version (`kiln_working_set`).
const VERSION: u32 = 1;
/// A working set file larger than this is not one (a 64 GiB VM's worst case is far below).
const MAX_FILE: u64 = 64 << 20;
/// Guest pages.
const PAGE: u64 = kiln_snapshot::PAGE_SIZE;
/// `madvise` advice that faults a range in, readable (Linux 5.14).
const MADV_POPULATE_READ: libc::c_int = 22;
/// `madvise` advice that faults a range in, writable (private copies made; Linux 5.14).
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// `KVM_PRE_FAULT_MEMORY` (Linux 6.10), which kvm-ioctls does not wrap: maps a guest-physical
/// range in KVM's nested page tables.
mod ioctls {
    #![allow(missing_docs)]
    use kvm_bindings::kvm_pre_fault_memory;
    vmm_sys_util::ioctl_iowr_nr!(
        KVM_PRE_FAULT_MEMORY,
        kvm_bindings::KVMIO,
        0xd5,
        kvm_pre_fault_memory
    );
}

/// The snapshot a VM was loaded from, as a working set names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedSnapshot {
    /// The snapshot's id (state file and memory file trailer).
    pub snapshot_id: u64,
    /// Guest memory size in bytes.
    pub mem_size: u64,
}

/// A working set file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkingSet {
    /// The format version, [`VERSION`].
    pub kiln_working_set: u32,
    /// The snapshot it was recorded on.
    pub snapshot_id: u64,
    /// That snapshot's guest memory size.
    pub mem_size: u64,
    /// Guest-physical `[start, length]` byte ranges the guest wrote.
    pub written: Vec<[u64; 2]>,
    /// Guest-physical `[start, length]` byte ranges it only read.
    pub read: Vec<[u64; 2]>,
}

/// What a prefault did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefaulted {
    /// Pages made private copies ahead.
    pub written: u64,
    /// Pages mapped from the memory file ahead.
    pub read: u64,
}

impl WorkingSet {
    /// The pages of `mem` this process has mapped, as a working set of `loaded`.
    pub fn record(mem: &GuestMemoryMmap, loaded: LoadedSnapshot) -> std::io::Result<Self> {
        let mut pagemap = Pagemap::open()?;
        let mut set = WorkingSet {
            kiln_working_set: VERSION,
            snapshot_id: loaded.snapshot_id,
            mem_size: loaded.mem_size,
            written: Vec::new(),
            read: Vec::new(),
        };
        for region in mem.iter() {
            let gpa = region.start_addr().0;
            let host = region.as_ptr() as u64;
            pagemap.entries(host, region.len() / PAGE, |i, entry| {
                let at = gpa + i * PAGE;
                if is_private_copy(entry) {
                    extend(&mut set.written, at);
                } else if is_mapped(entry) {
                    extend(&mut set.read, at);
                }
            })?;
        }
        Ok(set)
    }

    /// Writes the set to `path` as JSON, replacing any file there only once it is whole.
    pub fn save(&self, path: &Path) -> Result<(), PersistError> {
        let file = kiln_snapshot::AtomicFile::create(path).map_err(|err| PersistError::File {
            path: path.to_path_buf(),
            err,
        })?;
        let mut out = std::io::BufWriter::new(file.file());
        serde_json::to_writer(&mut out, self)
            .map_err(std::io::Error::from)
            .and_then(|()| out.flush())
            .map_err(|err| PersistError::Write {
                path: path.to_path_buf(),
                err,
            })?;
        drop(out);
        file.commit().map_err(|err| PersistError::File {
            path: path.to_path_buf(),
            err,
        })
    }

    /// Reads the working set at `path` and checks it against the snapshot being loaded and its
    /// memory: the same snapshot, every range page aligned and inside one region of `mem`.
    pub fn load(
        path: &Path,
        snapshot: LoadedSnapshot,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, PersistError> {
        let bad = |why: String| {
            PersistError::Refused(format!("working_set_path {}: {why}", path.display()))
        };
        let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        let len = file.metadata().map_err(|e| bad(e.to_string()))?.size();
        if len > MAX_FILE {
            return Err(bad(format!(
                "{len} bytes is too large for a working set (at most {MAX_FILE})"
            )));
        }
        let set: WorkingSet = serde_json::from_reader(std::io::BufReader::new(file))
            .map_err(|e| bad(format!("not a working set: {e}")))?;
        if set.kiln_working_set != VERSION {
            return Err(bad(format!(
                "format version {} is not {VERSION}, the one this kiln-vmm reads",
                set.kiln_working_set
            )));
        }
        if (set.snapshot_id, set.mem_size) != (snapshot.snapshot_id, snapshot.mem_size) {
            return Err(bad(format!(
                "it was recorded on snapshot {:016x} ({} MiB), not on this one, {:016x} ({} MiB)",
                set.snapshot_id,
                set.mem_size >> 20,
                snapshot.snapshot_id,
                snapshot.mem_size >> 20
            )));
        }
        for &[start, len] in set.written.iter().chain(&set.read) {
            host_range(mem, start, len).map_err(bad)?;
        }
        Ok(set)
    }

    /// Maps every page of the set into `mem` ahead of the guest: written pages as private
    /// copies, read pages from the memory file.
    pub fn prefault(&self, mem: &GuestMemoryMmap) -> Result<Prefaulted, PersistError> {
        let t0 = Instant::now();
        let mut done = Prefaulted {
            written: 0,
            read: 0,
        };
        for (ranges, advice, count) in [
            (&self.written, MADV_POPULATE_WRITE, &mut done.written),
            (&self.read, MADV_POPULATE_READ, &mut done.read),
        ] {
            for &[start, len] in ranges {
                let host = host_range(mem, start, len).map_err(PersistError::Refused)?;
                // SAFETY: `host` is `len` bytes of guest memory mapped by this process (checked
                // by host_range); populating pages changes no byte of them.
                if unsafe { libc::madvise(host.cast(), len as usize, advice) } != 0 {
                    let err = std::io::Error::last_os_error();
                    return Err(PersistError::Refused(format!(
                        "working set: cannot map in guest memory at {start:#x} (+{len:#x}): {err}{}",
                        if err.raw_os_error() == Some(libc::EINVAL) {
                            " (MADV_POPULATE_READ/WRITE need Linux 5.14 or later)"
                        } else {
                            ""
                        }
                    )));
                }
                *count += len / PAGE;
            }
        }
        log::info!(
            "working set: {} pages mapped in ahead ({} written, {} read) in {} ms",
            done.written + done.read,
            done.written,
            done.read,
            t0.elapsed().as_millis()
        );
        Ok(done)
    }

    /// Maps every page of the set in KVM's nested page tables through `vcpu`
    /// (`KVM_PRE_FAULT_MEMORY`, Linux 6.10), after [`WorkingSet::prefault`] mapped them in this
    /// process: otherwise the guest's first touch of each is still an exit to KVM (in a nested
    /// lab, to the outer hypervisor and back) to map it there. Call it with the vCPUs' state
    /// restored and before they run. Returns the pages mapped, or `None` when this KVM cannot
    /// (older Linux, or no two-dimensional paging): the pages then fault in as the guest
    /// touches them, as before. Any other error is returned; the VM is sound either way.
    pub fn prefault_kvm(&self, vcpu: &VcpuFd) -> std::io::Result<Option<u64>> {
        let t0 = Instant::now();
        let mut pages = 0;
        for &[start, len] in self.written.iter().chain(&self.read) {
            let mut range = kvm_pre_fault_memory {
                gpa: start,
                size: len,
                ..Default::default()
            };
            while range.size > 0 {
                let before = range.size;
                // SAFETY: the ioctl reads and updates the `kvm_pre_fault_memory` it is given, a
                // valid exclusive reference, and touches no memory of this process.
                let rc =
                    unsafe { ioctl_with_mut_ref(vcpu, ioctls::KVM_PRE_FAULT_MEMORY(), &mut range) };
                if rc >= 0 && range.size < before {
                    continue;
                }
                if rc >= 0 {
                    return Err(std::io::Error::other(format!(
                        "KVM_PRE_FAULT_MEMORY made no progress at {:#x}",
                        range.gpa
                    )));
                }
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR | libc::EAGAIN) => {}
                    Some(libc::ENOTTY | libc::EOPNOTSUPP) => {
                        log::info!(
                            "working set: this KVM cannot map pages ahead (KVM_PRE_FAULT_MEMORY, \
                             Linux 6.10); the guest faults them in"
                        );
                        return Ok(None);
                    }
                    _ => return Err(err),
                }
            }
            pages += len / PAGE;
        }
        log::info!(
            "working set: {pages} pages mapped in KVM ahead in {} ms",
            t0.elapsed().as_millis()
        );
        Ok(Some(pages))
    }
}

/// Adds the page at `at` to `ranges`, growing the last range when it ends there.
fn extend(ranges: &mut Vec<[u64; 2]>, at: u64) {
    match ranges.last_mut() {
        Some([start, len]) if *start + *len == at => *len += PAGE,
        _ => ranges.push([at, PAGE]),
    }
}

/// The host address of guest range `start`..`start + len`, which must be page aligned, not
/// empty, and inside one region of `mem`.
fn host_range(mem: &GuestMemoryMmap, start: u64, len: u64) -> Result<*mut u8, String> {
    let what = || format!("range {start:#x} (+{len:#x})");
    if len == 0 || !start.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        return Err(format!("{} is not whole pages", what()));
    }
    let region = mem
        .find_region(GuestAddress(start))
        .ok_or_else(|| format!("{} is outside guest memory", what()))?;
    let offset = start - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(format!("{} runs past the end of its memory region", what()));
    }
    region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|e| format!("{}: {e}", what()))
}

#[cfg(test)]
#[path = "working_set_tests.rs"]
mod tests;
