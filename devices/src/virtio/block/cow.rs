//! A copy-on-write disk: a read-only base image under a sparse overlay file of the same length.
//!
//! Why an overlay in the device rather than a reflink of the image: a reflink (`FICLONE`) costs
//! nothing only on filesystems that have it (XFS, btrfs), and Kiln's state usually lives on ext4
//! or tmpfs, where "copying" a 2 GiB image is 2 GiB of writes. A sparse overlay costs one empty
//! file on any filesystem with holes, the base stays shared by every sandbox in the page cache,
//! and a sandbox's disk costs exactly the clusters it wrote. Reflinks still help where they
//! exist: a sandbox's overlay is copied from its template's with `copy_file_range`, which
//! shares extents on XFS and btrfs.
//!
//! The overlay file alone is the persistent state: a cluster is in the overlay when the file has
//! data there, so the in-memory bitmap is rebuilt with `SEEK_DATA`/`SEEK_HOLE` each time the
//! drive opens (a restore in a new process, a resumed sandbox) and nothing else needs saving.
//! That rests on three rules:
//! - Whole clusters only: a write that covers part of a cluster not yet in the overlay first
//!   copies that cluster up from the base, so a cluster with data in the overlay is entirely the
//!   guest's. The cluster is at least 4 KiB and at least the overlay's `st_blksize`, so the
//!   filesystem never reports a block as data that holds only half a cluster.
//! - No holes punched: this device offers neither DISCARD nor WRITE_ZEROES, and if it ever does,
//!   they must write zeros into the overlay, since a hole would show the base again.
//! - A filesystem that reports holes: one that treats a whole file as data (no `SEEK_HOLE`
//!   support) would show a fresh overlay as all zeros, so [`CowOverlay::open`] refuses an
//!   overlay that claims more data than it has blocks allocated. Filesystems that turn written
//!   zeros back into holes (ZFS with compression) are not suitable for overlays either.
//!
//! The base is opened read-only and never written. All I/O after opening is `lseek`, `read`,
//! `write` and `fdatasync`, which the VMM thread's seccomp filter already allows.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_snapshot::PageBitmap;
use vm_memory::{Bytes, GuestAddress};

use crate::virtio::GuestMemoryMmap;

/// The smallest cluster: a page, the block size of every common Linux filesystem.
pub const MIN_CLUSTER: u64 = 4096;
/// The largest cluster; an overlay on a filesystem with larger blocks is refused.
pub const MAX_CLUSTER: u64 = 1 << 20;

/// Why an overlay cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// A file cannot be opened or examined.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The overlay's length differs from the base's.
    #[error(
        "overlay {overlay} is {overlay_len} bytes but the base {base} is {base_len}; an overlay \
         must be empty or the base's length"
    )]
    Length {
        /// The overlay.
        overlay: PathBuf,
        /// Its length.
        overlay_len: u64,
        /// The base.
        base: PathBuf,
        /// Its length.
        base_len: u64,
    },
    /// The overlay's data ranges cannot be read.
    #[error("overlay {path}: cannot find its data: {err}")]
    Scan {
        /// The overlay.
        path: PathBuf,
        /// Why.
        err: kiln_snapshot::MemFileError,
    },
    /// The overlay's filesystem reports data where nothing is allocated.
    #[error(
        "overlay {path}: its filesystem reports {data} bytes of data but only {allocated} are \
         allocated, so it does not report holes and cannot hold an overlay"
    )]
    NoHoles {
        /// The overlay.
        path: PathBuf,
        /// Bytes in data ranges.
        data: u64,
        /// Bytes allocated.
        allocated: u64,
    },
    /// The overlay's filesystem block is too large for a cluster.
    #[error("overlay {path}: its filesystem's block size {blksize} is over {MAX_CLUSTER} bytes")]
    BlockSize {
        /// The overlay.
        path: PathBuf,
        /// `st_blksize`.
        blksize: u64,
    },
}

/// A read-only base under a writable sparse overlay, with the bitmap of clusters the overlay
/// holds.
pub struct CowOverlay {
    base: File,
    overlay: File,
    overlay_path: PathBuf,
    /// The base's length, and the overlay's.
    len: u64,
    cluster: u64,
    /// Bit `c` set when cluster `c` is in the overlay.
    present: PageBitmap,
    /// One cluster, for copy-up.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for CowOverlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowOverlay")
            .field("overlay", &self.overlay_path)
            .field("len", &self.len)
            .field("cluster", &self.cluster)
            .field("present", &self.present.dirty_pages())
            .finish()
    }
}

impl CowOverlay {
    /// Opens `base` read-only and `overlay` read-write; an empty overlay is first extended
    /// (sparsely) to the base's length. Builds the bitmap from the overlay's data ranges.
    pub fn open(base: &Path, overlay: &Path) -> Result<Self, CowError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |err| CowError::Io { path, err }
        };
        let base_file = File::open(base).map_err(io(base))?;
        let len = base_file.metadata().map_err(io(base))?.len();
        let overlay_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(overlay)
            .map_err(io(overlay))?;
        let md = overlay_file.metadata().map_err(io(overlay))?;
        if md.len() == 0 && len > 0 {
            overlay_file.set_len(len).map_err(io(overlay))?;
        } else if md.len() != len {
            return Err(CowError::Length {
                overlay: overlay.to_path_buf(),
                overlay_len: md.len(),
                base: base.to_path_buf(),
                base_len: len,
            });
        }
        let blksize = md.blksize();
        if blksize > MAX_CLUSTER {
            return Err(CowError::BlockSize {
                path: overlay.to_path_buf(),
                blksize,
            });
        }
        let cluster = blksize.max(MIN_CLUSTER).next_power_of_two();
        let ranges =
            kiln_snapshot::data_ranges(&overlay_file, overlay).map_err(|err| CowError::Scan {
                path: overlay.to_path_buf(),
                err,
            })?;
        let data: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        let allocated = md.blocks() * 512;
        // Some slack: filesystems round allocation and data reports differently at the edges.
        if data > allocated + cluster {
            return Err(CowError::NoHoles {
                path: overlay.to_path_buf(),
                data,
                allocated,
            });
        }
        let mut present = PageBitmap::clean(len.div_ceil(cluster));
        for r in ranges {
            for c in r.start / cluster..r.end.div_ceil(cluster) {
                present.set_dirty(c);
            }
        }
        Ok(Self {
            base: base_file,
            overlay: overlay_file,
            overlay_path: overlay.to_path_buf(),
            len,
            cluster,
            present,
            scratch: vec![0; cluster as usize],
        })
    }

    /// The disk's length in bytes (the base's).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty base.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// How many clusters the overlay holds.
    pub fn clusters_present(&self) -> u64 {
        self.present.dirty_pages()
    }

    fn is_present(&self, cluster: u64) -> bool {
        self.present.is_dirty(cluster)
    }

    /// Reads `data`'s buffers from the disk at `offset`, each cluster from the overlay if it
    /// holds it and from the base otherwise, runs of clusters from one file in one read.
    /// The caller has checked that the range is inside the disk. Returns the bytes read.
    pub fn read_into(
        &mut self,
        mem: &GuestMemoryMmap,
        mut offset: u64,
        data: &[(GuestAddress, u32)],
    ) -> std::io::Result<u32> {
        let mut total = 0u32;
        for &(addr, len) in data {
            let mut addr = addr;
            let end = offset + u64::from(len);
            while offset < end {
                let from_overlay = self.is_present(offset / self.cluster);
                let mut run_end = (offset / self.cluster + 1) * self.cluster;
                while run_end < end && self.is_present(run_end / self.cluster) == from_overlay {
                    run_end += self.cluster;
                }
                let n = run_end.min(end) - offset;
                let file = if from_overlay {
                    &mut self.overlay
                } else {
                    &mut self.base
                };
                file.seek(SeekFrom::Start(offset))?;
                mem.read_exact_volatile_from(addr, file, n as usize)
                    .map_err(std::io::Error::other)?;
                addr = GuestAddress(addr.0 + n);
                offset += n;
            }
            total = total.saturating_add(len);
        }
        Ok(total)
    }

    /// Writes `data`'s buffers at `offset` into the overlay, first copying up from the base
    /// the clusters at either end that the write covers only in part, so that every cluster
    /// with data in the overlay is whole. The caller has checked the range.
    pub fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        data: &[(GuestAddress, u32)],
    ) -> std::io::Result<()> {
        let len: u64 = data.iter().map(|&(_, l)| u64::from(l)).sum();
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let first = offset / self.cluster;
        let last = (end - 1) / self.cluster;
        let head_partial = !offset.is_multiple_of(self.cluster) && !self.is_present(first);
        if head_partial {
            self.copy_up(first)?;
        }
        let last_end = ((last + 1) * self.cluster).min(self.len);
        if end < last_end && !self.is_present(last) && !(head_partial && last == first) {
            self.copy_up(last)?;
        }
        self.overlay.seek(SeekFrom::Start(offset))?;
        for &(addr, len) in data {
            mem.write_all_volatile_to(addr, &mut self.overlay, len as usize)
                .map_err(std::io::Error::other)?;
        }
        for c in first..=last {
            self.present.set_dirty(c);
        }
        Ok(())
    }

    /// Copies cluster `c` from the base into the overlay (not yet marking it present: the
    /// write that needed it does, once its own bytes are in).
    fn copy_up(&mut self, c: u64) -> std::io::Result<()> {
        let start = c * self.cluster;
        let n = self.cluster.min(self.len - start) as usize;
        self.base.seek(SeekFrom::Start(start))?;
        self.base.read_exact(&mut self.scratch[..n])?;
        self.overlay.seek(SeekFrom::Start(start))?;
        self.overlay.write_all(&self.scratch[..n])
    }

    /// Makes the overlay's writes durable (the base never changes).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.overlay.sync_data()
    }
}

#[cfg(test)]
#[path = "cow_tests.rs"]
mod tests;
