//! The balloon device: its features and queues (which depend on what was configured), the
//! configuration space (the target the host sets, the size the guest reports), activation, and
//! the host's controls (target, statistics interval).
//!
//! `activate`, `reset`, `read_config` and `write_config` run on a vCPU thread under the device's
//! lock, so they only store values and signal eventfds; the statistics timer is set from the event
//! handler and the API, which run on the VMM thread.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{BalloonError, GuestPages, LogOnce, Misbehaviour, PAGES_PER_MIB, QUEUE_SIZE, features};
use crate::virtio::device::read_config_space;
use crate::virtio::{
    ActivateError, GuestMemoryMmap, Interrupt, Queue, TYPE_BALLOON, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
};

/// What the host configured (Firecracker's `balloon` object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonConfig {
    /// Target size in MiB.
    pub amount_mib: u32,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 leaves the stats queue out.
    pub stats_polling_interval_s: u16,
    /// Offer VIRTIO_BALLOON_F_REPORTING.
    pub free_page_reporting: bool,
}

/// The guest's latest statistics, by Firecracker's names; `None` for those it never sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    /// Bytes swapped in.
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    pub swap_out: Option<u64>,
    /// Major page faults.
    pub major_faults: Option<u64>,
    /// Minor page faults.
    pub minor_faults: Option<u64>,
    /// Free memory, bytes.
    pub free_memory: Option<u64>,
    /// Total memory, bytes.
    pub total_memory: Option<u64>,
    /// Available memory, bytes.
    pub available_memory: Option<u64>,
    /// Disk caches, bytes.
    pub disk_caches: Option<u64>,
    /// Hugetlb allocations.
    pub hugetlb_allocations: Option<u64>,
    /// Hugetlb allocation failures.
    pub hugetlb_failures: Option<u64>,
    /// OOM killer invocations.
    pub oom_kill: Option<u64>,
    /// Allocation stalls.
    pub alloc_stall: Option<u64>,
    /// Pages scanned by kswapd.
    pub async_scan: Option<u64>,
    /// Pages scanned directly.
    pub direct_scan: Option<u64>,
    /// Pages reclaimed by kswapd.
    pub async_reclaim: Option<u64>,
    /// Pages reclaimed directly.
    pub direct_reclaim: Option<u64>,
}

impl GuestStats {
    /// Records one entry; false when the tag is unknown.
    pub fn set(&mut self, tag: u16, value: u64) -> bool {
        let slot = match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            10 => &mut self.oom_kill,
            11 => &mut self.alloc_stall,
            12 => &mut self.async_scan,
            13 => &mut self.direct_scan,
            14 => &mut self.async_reclaim,
            15 => &mut self.direct_reclaim,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// What the device did since it was created, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Pages the guest put in the balloon.
    pub inflated_pages: u64,
    /// Pages the guest took back.
    pub deflated_pages: u64,
    /// Bytes the guest reported free.
    pub reported_bytes: u64,
    /// Bytes of host memory given back (as [`GuestPages::discard`] counted them).
    pub given_back_bytes: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
}

/// Which queue is which: the stats and reporting queues exist only when configured, and the
/// driver numbers the queues it uses without gaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct QueueIndex {
    pub(super) stats: Option<usize>,
    pub(super) reporting: Option<usize>,
    pub(super) count: usize,
}

/// Index of the inflate queue.
pub(super) const INFLATEQ: usize = 0;
/// Index of the deflate queue.
pub(super) const DEFLATEQ: usize = 1;

impl QueueIndex {
    fn of(config: &BalloonConfig) -> Self {
        let mut count = 2;
        let mut next = || {
            count += 1;
            count - 1
        };
        let stats = (config.stats_polling_interval_s > 0).then(&mut next);
        let reporting = config.free_page_reporting.then(&mut next);
        Self {
            stats,
            reporting,
            count,
        }
    }
}

/// The queues handed over by the driver, with the memory they live in.
pub(super) struct Active {
    pub(super) mem: GuestMemoryMmap,
    pub(super) queues: Vec<Queue>,
}

/// A virtio-balloon device.
pub struct Balloon {
    pub(super) config: BalloonConfig,
    mem_mib: u64,
    pub(super) actual_pages: u32,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    pub(super) index: QueueIndex,
    pub(super) queue_events: Vec<EventFd>,
    pub(super) activate_evt: EventFd,
    pub(super) stats_timer: TimerFd,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) active: Option<Active>,
    /// The queue eventfds are registered with the event loop (done once, at first activation).
    pub(super) queues_registered: bool,
    pub(super) pages: Arc<dyn GuestPages>,
    pub(super) stats: GuestStats,
    /// The head of the stats buffer the device holds, to hand back when it wants new numbers.
    pub(super) stats_desc: Option<u16>,
    pub(super) log: LogOnce,
    pub(super) counters: Counters,
    pub(super) metrics: Arc<crate::metrics::BalloonMetrics>,
}

impl Balloon {
    /// A balloon for a guest with `mem_mib` of memory, configured by `config`; discarded pages go
    /// to `pages`; `irqfd` is the interrupt's eventfd (an irqfd in KVM).
    pub fn new(
        config: BalloonConfig,
        mem_mib: u64,
        pages: Arc<dyn GuestPages>,
        irqfd: EventFd,
    ) -> Result<Self, BalloonError> {
        check_amount(config.amount_mib, mem_mib)?;
        let index = QueueIndex::of(&config);
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX);
        if config.deflate_on_oom {
            avail_features |= 1 << features::DEFLATE_ON_OOM;
        }
        if index.stats.is_some() {
            avail_features |= 1 << features::STATS_VQ;
        }
        if index.reporting.is_some() {
            avail_features |= 1 << features::REPORTING;
        }
        let fd = |what, err| BalloonError::Fd { what, err };
        let evt = |what| EventFd::new(libc::EFD_NONBLOCK).map_err(|e| fd(what, e));
        let queue_events = (0..index.count)
            .map(|_| evt("queue eventfd"))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config,
            mem_mib,
            actual_pages: 0,
            avail_features,
            acked_features: 0,
            queue_sizes: vec![QUEUE_SIZE; index.count],
            index,
            queue_events,
            activate_evt: evt("activation eventfd")?,
            stats_timer: TimerFd::new().map_err(|e| fd("statistics timer", e.into()))?,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            active: None,
            queues_registered: false,
            pages,
            stats: GuestStats::default(),
            stats_desc: None,
            log: LogOnce::default(),
            counters: Counters::default(),
            metrics: Arc::new(crate::metrics::BalloonMetrics::default()),
        })
    }

    /// The configuration, with the current target and statistics interval.
    pub fn config(&self) -> BalloonConfig {
        self.config
    }

    /// The target, in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.config.amount_mib.saturating_mul(PAGES_PER_MIB)
    }

    /// Guest memory, in MiB (the bound on the target).
    pub fn mem_mib(&self) -> u64 {
        self.mem_mib
    }

    /// The balloon's size as the guest last reported it, in 4 KiB pages.
    pub fn actual_pages(&self) -> u32 {
        self.actual_pages
    }

    /// The guest's latest statistics, or `None` when statistics are off.
    pub fn stats(&self) -> Option<&GuestStats> {
        self.index.stats.map(|_| &self.stats)
    }

    /// What the device did so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The counters for kiln-vmm's metrics file (Firecracker's `balloon` group).
    pub fn metrics(&self) -> Arc<crate::metrics::BalloonMetrics> {
        self.metrics.clone()
    }

    /// What the guest did wrong so far.
    pub fn misbehaviour(&self) -> &LogOnce {
        &self.log
    }

    /// Sets a new target; an active guest hears of it through a configuration interrupt.
    pub fn set_target(&mut self, amount_mib: u32) -> Result<(), BalloonError> {
        check_amount(amount_mib, self.mem_mib)?;
        if amount_mib != self.config.amount_mib {
            self.config.amount_mib = amount_mib;
            if self.active.is_some() {
                self.interrupt.signal_config();
            }
        }
        Ok(())
    }

    /// Changes the statistics interval (they cannot be turned on or off once configured) and asks
    /// the guest for fresh numbers at once.
    pub fn set_stats_interval(&mut self, secs: u16) -> Result<(), BalloonError> {
        match (self.config.stats_polling_interval_s, secs) {
            (0, 0) => return Ok(()),
            (0, asked) => return Err(BalloonError::StatsWereOff(asked)),
            (_, 0) => return Err(BalloonError::StatsWereOn),
            _ => {}
        }
        self.config.stats_polling_interval_s = secs;
        if self.active.is_some() {
            self.arm_stats_timer()?;
            self.request_stats();
        }
        Ok(())
    }

    /// Sets the statistics timer to the configured interval (stops it when statistics are off).
    pub(super) fn arm_stats_timer(&mut self) -> Result<(), BalloonError> {
        let secs = self.config.stats_polling_interval_s;
        let res = if secs == 0 {
            self.stats_timer.clear()
        } else {
            let every = Duration::from_secs(u64::from(secs));
            self.stats_timer.reset(every, Some(every))
        };
        res.map_err(|e| BalloonError::Timer(e.into()))
    }

    /// Hands the held stats buffer back to the guest, which refills it and returns it.
    pub fn request_stats(&mut self) {
        let (Some(q), Some(head)) = (self.index.stats, self.stats_desc) else {
            return;
        };
        let Some(active) = self.active.as_mut() else {
            return;
        };
        use virtio_queue::QueueT;
        match active.queues[q].add_used(&active.mem, head, 0) {
            Ok(()) => {
                self.stats_desc = None;
                self.interrupt
                    .signal_used_if_needed(&mut active.queues[q], &active.mem);
            }
            Err(e) => {
                log::warn!(
                    "virtio-balloon: cannot return the stats buffer ({e:?}); device needs reset"
                );
                self.interrupt.set_needs_reset();
            }
        }
    }

    /// The configuration space: num_pages, actual, free_page_hint_cmd_id, poison_val.
    fn config_space(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0..4].copy_from_slice(&self.target_pages().to_le_bytes());
        c[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        c
    }
}

fn check_amount(amount_mib: u32, mem_mib: u64) -> Result<(), BalloonError> {
    if u64::from(amount_mib) > mem_mib {
        return Err(BalloonError::TooLarge {
            amount_mib,
            mem_mib,
        });
    }
    Ok(())
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        let end = offset.saturating_add(data.len() as u64);
        if offset < 4 || end > 8 {
            self.log.warn(
                Misbehaviour::ConfigWrite,
                format_args!(
                    "write of {} bytes at config offset {offset:#x} ignored; only `actual` (4..8) is writable",
                    data.len()
                ),
            );
            return;
        }
        let mut actual = self.actual_pages.to_le_bytes();
        let at = (offset - 4) as usize;
        actual[at..at + data.len()].copy_from_slice(data);
        self.actual_pages = u32::from_le_bytes(actual);
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        if self.active.is_some() {
            self.metrics.activate_fails.inc();
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != self.index.count {
            self.metrics.activate_fails.inc();
            return Err(ActivateError::QueueCount {
                want: self.index.count,
                got: queues.len(),
            });
        }
        self.active = Some(Active { mem, queues });
        self.activate_evt.write(1).map_err(|e| {
            self.metrics.activate_fails.inc();
            ActivateError::Signal(e)
        })
    }

    fn reset(&mut self) {
        // The stats buffer belonged to the old queue; the timer finds nothing to return.
        self.active = None;
        self.acked_features = 0;
        self.stats_desc = None;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn active_queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues)
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
