//! virtio-blk: a file-backed disk. Reads, writes, FLUSH (fdatasync) and GET_ID; read-only drives
//! advertise VIRTIO_BLK_F_RO and refuse writes; anything past the end of the disk gets IOERR and
//! unknown request types get UNSUPP. With [`IoEngine::Sync`] requests run on the VMM's event loop,
//! a bounded batch per pass ([`CHAINS_PER_PASS`], [`BYTES_PER_PASS`]); with [`IoEngine::Async`]
//! reads, writes and flushes go to an io_uring ([`AsyncIo`]) and complete when the kernel says.
//! A request moving more than [`MAX_REQUEST_BYTES`] gets IOERR, so no single request holds the
//! loop for long either.
//!
//! A drive is either one file or, with [`BlockConfig::cow_overlay`], a read-only base image
//! under a sparse copy-on-write overlay ([`CowOverlay`]), so that many VMs share one image and
//! each writes only its own file.

mod cow;
mod device;
mod disk;
mod event_handler;
mod io_uring;
mod persist;
mod request;

pub use cow::{CowError, CowOverlay, MAX_CLUSTER, MIN_CLUSTER};
pub use device::{Block, BlockConfig};
pub use disk::{Backend, Disk};
pub use io_uring::AsyncIo;
pub use persist::{BlockRestoreArgs, BlockState};
pub use request::{Request, RequestError, RequestType};

/// How a drive's I/O is done (Firecracker's `io_engine`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IoEngine {
    /// Blocking reads and writes on the VMM thread.
    #[default]
    Sync,
    /// io_uring: the VMM thread submits and later completes.
    Async,
}

/// Why a drive cannot have both `io_engine` Async and a copy-on-write overlay (the device refuses
/// it, and the configuration's checks refuse it first with the same words).
pub const ASYNC_OVERLAY: &str = "io_engine Async cannot be used with a cow_overlay_path (the \
    overlay's cluster map is updated in step with each write); use io_engine Sync";

/// Bytes in a virtio-blk sector, whatever the disk's own block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The queue sizes the device offers.
pub const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE];
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Requests one pass of the event handler runs at most before the loop serves others.
pub const CHAINS_PER_PASS: usize = 64;
/// Bytes of disk I/O one pass does at most (the request that crosses it still completes).
pub const BYTES_PER_PASS: u64 = 8 << 20;
/// The most data one request may move; larger ones get IOERR. Linux sends at most
/// `max_sectors_kb` (1280 KiB by default) per request.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;

/// Feature bits.
pub mod features {
    /// Maximum segments in a request is in `seg_max`.
    pub const SEG_MAX: u32 = 2;
    /// The disk is read-only.
    pub const RO: u32 = 5;
    /// The block size is in `blk_size`.
    pub const BLK_SIZE: u32 = 6;
    /// FLUSH is supported.
    pub const FLUSH: u32 = 9;
}

/// Request types (virtio 1.2, 5.2.6).
pub mod request_type {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device id string.
    pub const GET_ID: u32 = 8;
}

/// Request status bytes.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// I/O error (also: out of range, write to a read-only disk, malformed request).
    pub const IOERR: u8 = 1;
    /// Request type not supported.
    pub const UNSUPP: u8 = 2;
}

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file cannot be opened.
    #[error("drive {id}: cannot open {path}: {err}")]
    Open {
        /// Drive id.
        id: String,
        /// Backing file.
        path: std::path::PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The backing file's size cannot be read.
    #[error("drive {id}: cannot read the size of {path}: {err}")]
    Size {
        /// Drive id.
        id: String,
        /// Backing file.
        path: std::path::PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The copy-on-write overlay cannot be used.
    #[error("drive {id}: {err}")]
    Cow {
        /// Drive id.
        id: String,
        /// Why.
        err: CowError,
    },
    /// A read-only drive was given an overlay.
    #[error(
        "drive {0}: is_read_only with a cow_overlay_path: a drive with an overlay is writable \
         (its base is never written); drop one of them"
    )]
    ReadOnlyOverlay(String),
    /// io_engine Async on a drive with a copy-on-write overlay.
    #[error("drive {0}: {ASYNC_OVERLAY}")]
    AsyncOverlay(String),
    /// The io_uring could not be set up.
    #[error("drive {id}: io_engine Async: cannot set up an io_uring: {err}")]
    IoUring {
        /// Drive id.
        id: String,
        /// Why (EPERM: io_uring is disabled on this host, e.g. `kernel.io_uring_disabled`).
        err: std::io::Error,
    },
    /// An eventfd could not be created.
    #[error("drive {0}: cannot create an eventfd: {1}")]
    EventFd(String, std::io::Error),
    /// A saved drive cannot be put back.
    #[error("drive {id}: cannot restore: {why}")]
    Restore {
        /// Drive id.
        id: String,
        /// Why.
        why: String,
    },
}
