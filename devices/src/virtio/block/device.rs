//! The block device: its features, configuration space and activation.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::cow::CowOverlay;
use super::disk::{Backend, Disk};
use super::io_uring::AsyncIo;
use super::{BlockError, ID_BYTES, IoEngine, QUEUE_SIZE, QUEUE_SIZES, SECTOR_SIZE, features};
use crate::metrics::BlockMetrics;
use crate::rate_limiter::{BucketUpdate, MonotonicClock, RateLimiterConfig, TimedRateLimiter};
use crate::virtio::device::read_config_space;
use crate::virtio::{
    ActivateError, GuestMemoryMmap, Interrupt, LogOnce, Queue, TYPE_BLOCK, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
};

/// What the VMM knows about a drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The drive id (also the GET_ID answer, truncated to 20 bytes).
    pub id: String,
    /// The backing file; with an overlay, the read-only base image.
    pub path: PathBuf,
    /// A sparse copy-on-write overlay over `path` that takes every write (the drive cannot
    /// then be read-only).
    pub cow_overlay: Option<PathBuf>,
    /// Refuse writes and advertise VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Token buckets on the drive's bytes and requests.
    pub rate_limiter: RateLimiterConfig,
    /// Where reads, writes and flushes run.
    pub io_engine: IoEngine,
}

/// A queue handed over by the driver, with the memory it lives in.
pub(super) struct Active {
    pub(super) mem: GuestMemoryMmap,
    pub(super) queue: Queue,
}

/// A virtio-blk device.
pub struct Block {
    pub(super) config: BlockConfig,
    pub(super) disk: Disk,
    /// The io_uring of an `Async` drive.
    pub(super) engine: Option<AsyncIo>,
    avail_features: u64,
    acked_features: u64,
    pub(super) queue_events: Vec<EventFd>,
    pub(super) activate_evt: EventFd,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) active: Option<Active>,
    /// The queue eventfd is registered with the event loop (done once, at first activation).
    pub(super) queue_registered: bool,
    /// Spends the drive's budget before each request; its timer wakes the device when a
    /// throttled request may go.
    pub(super) limiter: TimedRateLimiter,
    pub(super) metrics: Arc<BlockMetrics>,
    /// What the driver got wrong, logged once per kind.
    pub(super) log: LogOnce,
}

impl Block {
    /// Opens the drive's backing file; `irqfd` is the interrupt's eventfd (an irqfd in KVM).
    pub fn new(config: BlockConfig, irqfd: EventFd) -> Result<Self, BlockError> {
        if config.io_engine == IoEngine::Async && config.cow_overlay.is_some() {
            return Err(BlockError::AsyncOverlay(config.id.clone()));
        }
        let (backend, len) = match &config.cow_overlay {
            Some(_) if config.read_only => {
                return Err(BlockError::ReadOnlyOverlay(config.id.clone()));
            }
            Some(overlay) => {
                let cow =
                    CowOverlay::open(&config.path, overlay).map_err(|err| BlockError::Cow {
                        id: config.id.clone(),
                        err,
                    })?;
                let len = cow.len();
                (Backend::Cow(cow), len)
            }
            None => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(!config.read_only)
                    .open(&config.path)
                    .map_err(|err| BlockError::Open {
                        id: config.id.clone(),
                        path: config.path.clone(),
                        err,
                    })?;
                let len = file
                    .metadata()
                    .map_err(|err| BlockError::Size {
                        id: config.id.clone(),
                        path: config.path.clone(),
                        err,
                    })?
                    .len();
                (Backend::File(file), len)
            }
        };
        if len % SECTOR_SIZE != 0 {
            log::warn!(
                "drive {}: {} is {len} bytes, not a whole number of 512-byte sectors; the tail is not visible",
                config.id,
                config.path.display()
            );
        }
        let mut id = [0u8; ID_BYTES];
        let n = config.id.len().min(ID_BYTES);
        id[..n].copy_from_slice(&config.id.as_bytes()[..n]);
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << features::SEG_MAX)
            | (1 << features::BLK_SIZE)
            | (1 << features::FLUSH);
        if config.read_only {
            avail_features |= 1 << features::RO;
        }
        let evt = |what| {
            EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| BlockError::EventFd(format!("{} ({what})", config.id), e))
        };
        let engine = match config.io_engine {
            IoEngine::Sync => None,
            IoEngine::Async => {
                Some(AsyncIo::new(QUEUE_SIZE).map_err(|err| BlockError::IoUring {
                    id: config.id.clone(),
                    err,
                })?)
            }
        };
        let limiter =
            TimedRateLimiter::new(&config.rate_limiter, Arc::new(MonotonicClock::default()))
                .map_err(|e| {
                    BlockError::EventFd(format!("{} (rate limiter timer)", config.id), e)
                })?;
        Ok(Self {
            limiter,
            metrics: Arc::new(BlockMetrics::default()),
            disk: Disk {
                backend,
                size: len - len % SECTOR_SIZE,
                read_only: config.read_only,
                id,
            },
            engine,
            avail_features,
            acked_features: 0,
            queue_events: vec![evt("queue")?],
            activate_evt: evt("activation")?,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            active: None,
            queue_registered: false,
            log: LogOnce::default(),
            config,
        })
    }

    /// The drive's configuration.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// The disk the requests run against.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Waits for the requests in flight on an `Async` drive and finishes them (status, used
    /// ring, interrupt): called on a paused VM before its snapshot is taken, so no request is
    /// lost between the saved queue and the restored one.
    pub fn complete_in_flight(&mut self) {
        self.wait_in_flight(true);
    }

    /// The drive's counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// Changes the rate limits after boot (`PATCH /drives`): each bucket that is set is
    /// replaced (a zero size or refill time lifts its limit), the others keep theirs; requests
    /// waiting for the old limits are tried again at once.
    pub fn update_rate_limiter(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        self.limiter.update(bandwidth, ops);
        self.config.rate_limiter = self.limiter.config();
        self.metrics.update_count.inc();
        self.process_queue();
    }

    /// The configuration space (virtio_blk_config up to blk_size).
    fn config_space(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&(self.disk.size / SECTOR_SIZE).to_le_bytes()); // capacity
        c[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!(
            "virtio-blk {}: write to read-only config space at {offset:#x} ignored",
            self.config.id
        );
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                want: QUEUE_SIZES.len(),
                got: queues.len(),
            });
        }
        let queue = queues.remove(0);
        self.active = Some(Active { mem, queue });
        self.activate_evt.write(1).map_err(ActivateError::Signal)
    }

    fn reset(&mut self) {
        // Nothing may still be writing into memory the driver is about to reuse.
        self.wait_in_flight(false);
        self.active = None;
        self.acked_features = 0;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn active_queues(&self) -> &[Queue] {
        self.active
            .as_ref()
            .map_or(&[], |a| std::slice::from_ref(&a.queue))
    }
}
