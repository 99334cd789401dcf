//! virtio-balloon: the guest hands memory back to the host, and tells it how memory is used.
//!
//! - **Inflate and deflate** (queues 0 and 1): the host sets a target (`num_pages` in the config
//!   space); the guest's driver allocates that many pages and sends their page frame numbers on the
//!   inflate queue, and sends them back on the deflate queue when the target drops (or, with
//!   `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`, when it runs out of memory).
//! - **Statistics** (`VIRTIO_BALLOON_F_STATS_VQ`): the driver leaves one buffer of `(tag, value)`
//!   pairs on the stats queue; the device keeps it and hands it back every polling interval, and
//!   the driver answers with fresh numbers in the same buffer.
//! - **Free page reporting** (`VIRTIO_BALLOON_F_REPORTING`): the guest reports blocks of free
//!   memory (2-4 MiB each) as it frees them and does not touch them until the device used the
//!   report.
//!
//! Pages inflated or reported go to [`GuestPages::discard`], which the VMM implements: it gives
//! their host memory back and remembers them as free, so snapshots leave them out. The device does
//! not offer `VIRTIO_BALLOON_F_PAGE_POISON` (the host never promises what a freed page holds) nor
//! free page hinting or `MUST_TELL_HOST` (deflated pages need nothing from the host).
//!
//! A guest is hostile: page frame numbers outside guest memory, descriptors of the wrong direction,
//! oversized chains and unknown statistics tags are ignored, each kind logged once at `warn`
//! ([`LogOnce`]); none stops the device. Chains are walked by [`crate::virtio::chain::walk`] as
//! the other devices' are: one that uses INDIRECT (never offered), loops or points outside its
//! table is broken rings, and the device needs a reset. Each event handles at most [`CHAINS_PER_CALL`] chains
//! per queue, and at most about [`RANGES_PER_CALL`] ranges to give back, before it lets the event
//! loop serve others.

mod device;
mod event_handler;
mod persist;
mod request;

#[cfg(test)]
mod test_utils;

use std::ops::Range;

pub use device::{Balloon, BalloonConfig, GuestStats};
pub use persist::{BalloonRestoreArgs, BalloonState};
pub use request::{pfn_ranges, report_ranges, stats_entries};

/// The page size page frame numbers count in (`VIRTIO_BALLOON_PFN_SHIFT`), whatever the guest's.
pub const PAGE_SIZE: u64 = 4096;
/// Pages in one MiB, for the API's `amount_mib`.
pub const PAGES_PER_MIB: u32 = 256;
/// Size of each queue. Linux needs at least 32 entries on the reporting queue
/// (`PAGE_REPORTING_CAPACITY`) and sends at most 256 page frame numbers per inflate chain.
pub const QUEUE_SIZE: u16 = 256;
/// Chains of one queue handled per event before the device yields to the rest of the event
/// loop (and wakes itself up to carry on).
pub const CHAINS_PER_CALL: usize = 64;
/// Ranges to give back gathered per event before the device yields: each costs a system call
/// (4-9 us measured), so a guest naming scattered pages cannot hold the event loop for long
/// (16384 ranges, well under 0.2 s; Linux's own chains are 64 per event of at most 256 pages).
pub const RANGES_PER_CALL: usize = 16384;
/// Bytes of page frame numbers read from one inflate or deflate chain (4096 pages, 16 MiB);
/// Linux sends 1 KiB. Anything past this is ignored.
pub const MAX_PFN_BYTES: u32 = 16 * 1024;
/// Ranges read from one free page report; Linux sends at most 32. The rest are ignored.
pub const MAX_REPORT_RANGES: usize = 256;
/// Bytes of one statistics entry: a le16 tag and a le64 value, packed.
pub const STATS_ENTRY_BYTES: usize = 10;
/// Bytes of statistics read from the stats buffer (room for every tag a few times over).
pub const MAX_STATS_BYTES: u32 = 64 * STATS_ENTRY_BYTES as u32;

/// Feature bits (virtio 1.2, 5.5.3).
pub mod features {
    /// The host must be told before the guest uses deflated pages. Not offered.
    pub const MUST_TELL_HOST: u32 = 0;
    /// A statistics queue is present.
    pub const STATS_VQ: u32 = 1;
    /// The guest deflates the balloon when it runs out of memory.
    pub const DEFLATE_ON_OOM: u32 = 2;
    /// Free page hinting. Not offered.
    pub const FREE_PAGE_HINT: u32 = 3;
    /// The guest fills freed pages with `poison_val`. Not offered.
    pub const PAGE_POISON: u32 = 4;
    /// Free page reporting: a reporting queue is present.
    pub const REPORTING: u32 = 5;
}

/// Statistics tags (virtio 1.2, 5.5.6.3, and Linux's later additions).
pub mod stats_tag {
    /// Bytes swapped in.
    pub const SWAP_IN: u16 = 0;
    /// Bytes swapped out.
    pub const SWAP_OUT: u16 = 1;
    /// Major page faults.
    pub const MAJFLT: u16 = 2;
    /// Minor page faults.
    pub const MINFLT: u16 = 3;
    /// Free memory, bytes.
    pub const MEMFREE: u16 = 4;
    /// Total memory, bytes.
    pub const MEMTOT: u16 = 5;
    /// Available memory, bytes.
    pub const AVAIL: u16 = 6;
    /// Disk caches, bytes.
    pub const CACHES: u16 = 7;
    /// Hugetlb page allocations.
    pub const HTLB_PGALLOC: u16 = 8;
    /// Hugetlb page allocation failures.
    pub const HTLB_PGFAIL: u16 = 9;
    /// OOM killer invocations.
    pub const OOM_KILL: u16 = 10;
    /// Allocation stalls.
    pub const ALLOC_STALL: u16 = 11;
    /// Pages scanned by kswapd.
    pub const ASYNC_SCAN: u16 = 12;
    /// Pages scanned directly.
    pub const DIRECT_SCAN: u16 = 13;
    /// Pages reclaimed by kswapd.
    pub const ASYNC_RECLAIM: u16 = 14;
    /// Pages reclaimed directly.
    pub const DIRECT_RECLAIM: u16 = 15;
}

/// Errors creating, changing or restoring the balloon.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// The target is larger than guest memory.
    #[error("balloon amount_mib {amount_mib} is larger than guest memory ({mem_mib} MiB)")]
    TooLarge {
        /// The target asked for.
        amount_mib: u32,
        /// Guest memory.
        mem_mib: u64,
    },
    /// Statistics were off when the device was configured; they cannot be turned on later.
    #[error(
        "balloon statistics were off when the device was configured (stats_polling_interval_s 0); they cannot be turned on with stats_polling_interval_s {0} after boot"
    )]
    StatsWereOff(u16),
    /// Statistics were on when the device was configured; they cannot be turned off later.
    #[error(
        "balloon statistics were on when the device was configured; stats_polling_interval_s 0 cannot turn them off after boot"
    )]
    StatsWereOn,
    /// The stats timer could not be set.
    #[error("balloon: cannot set the statistics timer: {0}")]
    Timer(std::io::Error),
    /// An eventfd or timerfd could not be created.
    #[error("balloon: cannot create the {what}: {err}")]
    Fd {
        /// Which descriptor.
        what: &'static str,
        /// Why.
        err: std::io::Error,
    },
    /// A saved balloon cannot be put back.
    #[error("balloon: cannot restore: {0}")]
    Restore(String),
}

/// Host memory behind guest pages could not be given back.
#[derive(Debug, thiserror::Error)]
#[error("cannot give back guest memory {:#x}..{:#x}: {err}", .range.start, .range.end)]
pub struct DiscardError {
    /// The guest physical range.
    pub range: Range<u64>,
    /// Why.
    pub err: std::io::Error,
}

/// The owner of guest memory, as the balloon sees it (the VMM implements it).
pub trait GuestPages: Send + Sync {
    /// The guest gave up the pages in `ranges` (guest physical byte ranges of whole pages, each
    /// inside one memory region): remember them as free, so snapshots leave them out until the
    /// guest writes them again, and give their host memory back. Returns the bytes given back.
    /// The guest does not touch these pages until the device has used the chain naming them.
    fn discard(&self, ranges: &[Range<u64>]) -> Result<u64, DiscardError>;
}

/// Kinds of guest misbehaviour, each logged at `warn` once per device and at `debug` afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehaviour {
    /// A page frame number outside guest memory.
    PfnOutOfRange = 0,
    /// A descriptor the device should write is read-only, or the other way round.
    WrongDirection,
    /// A descriptor whose buffer is not in guest memory.
    BadBuffer,
    /// More page frame numbers, report ranges or statistics than the device reads at once.
    Oversized,
    /// A reported range that is not whole pages inside one memory region.
    BadReport,
    /// A statistics tag the device does not know.
    UnknownStat,
    /// A write to a read-only part of the configuration space.
    ConfigWrite,
    /// A second stats buffer while the device still held one.
    ExtraStatsBuffer,
}

/// Remembers which [`Misbehaviour`]s were already logged.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LogOnce(u32);

impl LogOnce {
    /// Logs `msg` at `warn` the first time `kind` happens, at `debug` after that.
    pub fn warn(&mut self, kind: Misbehaviour, msg: std::fmt::Arguments<'_>) {
        let bit = 1u32 << (kind as u32);
        if self.0 & bit == 0 {
            self.0 |= bit;
            log::warn!("virtio-balloon: {msg} (further ones are logged at debug level)");
        } else {
            log::debug!("virtio-balloon: {msg}");
        }
    }

    /// Whether `kind` was seen (for tests).
    pub fn seen(&self, kind: Misbehaviour) -> bool {
        self.0 & (1 << (kind as u32)) != 0
    }
}
