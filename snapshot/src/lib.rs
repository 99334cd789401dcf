//! `kiln-snapshot`: what a Kiln snapshot is on disk. This crate owns the state file format
//! ([`save_state`], [`load_state`]: a magic, a version, a bincode payload and a CRC-64), the atomic
//! replacement of files ([`AtomicFile`]), sparse guest-memory files and their merging
//! ([`memfile`], with dirty-page bitmaps in [`PageBitmap`]), and the [`Persist`] trait that VMM
//! objects implement to be saved and restored.
//!
//! It is a pure library: it calls only `std`, `libc` (lseek, copy_file_range), serde, bincode,
//! crc and thiserror, and knows nothing of KVM, devices or the API. `kiln-vmm` calls it to write
//! and read snapshots (and implements [`Persist`] for its VM and devices); the `kiln` CLI calls it
//! to inspect and merge snapshot files.
//!
//! - [`format`](mod@format): the state file layout and its checks.
//! - [`atomic`]: write a temporary, fsync, rename over the final path.
//! - [`memfile`]: data ranges of sparse files, page writes, and [`memfile::merge`] of diffs.
//! - [`bitmap`]: dirty bitmaps as coalesced byte ranges.
//! - [`persist`]: the [`Persist`] trait.

pub mod atomic;
pub mod bitmap;
pub mod format;
pub mod memfile;
pub mod persist;

#[cfg(test)]
mod test_util;

pub use atomic::{AtomicFile, AtomicFileError, is_temporary_name};
pub use bitmap::{BitmapError, PAGE_SIZE, PageBitmap};
pub use format::{
    FORMAT_VERSION, MAGIC, MAX_STATE_FILE_SIZE, SnapshotError, frame_payload, from_bytes,
    load_state, save_state, to_bytes,
};
pub use memfile::{MemFileError, MergeStats, data_ranges, merge};
pub use persist::Persist;
