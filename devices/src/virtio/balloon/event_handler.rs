//! The balloon's event-manager subscriber: the activation event and the statistics timer from
//! the start, the queue eventfds once the driver activated the device.
//!
//! Each queue event takes at most [`CHAINS_PER_CALL`] chains, and stops early once they name
//! [`RANGES_PER_CALL`] ranges to give back (each is a system call); the pages they name go to
//! [`super::GuestPages::discard`] in one call (one look at the dirty log per batch, not per
//! chain), and only then are the chains used, since the guest may reuse reported pages as soon as
//! it sees its report used. A queue with more work left wakes itself up again, after the rest of
//! the event loop had its turn.

use std::ops::Range;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestAddress;

use super::device::{Balloon, DEFLATEQ, INFLATEQ};
use super::request::{pfn_ranges, report_ranges, stats_entries};
use super::{CHAINS_PER_CALL, Misbehaviour, PAGE_SIZE, RANGES_PER_CALL};
use crate::virtio::chain::{self, QueueError};
use crate::virtio::device::VirtioDevice;

const ACTIVATE: u32 = 0;
const STATS_TIMER: u32 = 1;
/// Queue `i`'s events carry `QUEUE_BASE + i`.
const QUEUE_BASE: u32 = 2;

/// What a queue's chains are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, data, what) in [
            (
                &self.activate_evt as &dyn std::os::fd::AsRawFd,
                ACTIVATE,
                "activation event",
            ),
            (&self.stats_timer, STATS_TIMER, "statistics timer"),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd.as_raw_fd(), data, EventSet::IN)) {
                log::error!("virtio-balloon: cannot watch the {what}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE => {
                let _ = self.activate_evt.read();
                if !self.is_activated() {
                    return;
                }
                if !self.queues_registered {
                    self.register_queues(ops);
                }
                if let Err(e) = self.arm_stats_timer() {
                    log::error!("{e}");
                }
                // The driver may have queued chains before the loop saw the activation.
                for q in 0..self.index.count {
                    self.process_queue(q);
                }
            }
            STATS_TIMER => {
                let _ = self.stats_timer.wait();
                self.request_stats();
            }
            data => {
                let q = (data - QUEUE_BASE) as usize;
                match self.queue_events.get(q) {
                    Some(evt) => {
                        let _ = evt.read();
                        self.process_queue(q);
                    }
                    None => log::debug!("virtio-balloon: unexpected event {data}"),
                }
            }
        }
    }
}

impl Balloon {
    fn register_queues(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, QUEUE_BASE + i as u32, EventSet::IN)) {
                log::error!("virtio-balloon: cannot watch queue {i}: {e:?}; device needs reset");
                self.interrupt().set_needs_reset();
                return;
            }
        }
        self.queues_registered = true;
    }

    fn kind(&self, q: usize) -> Kind {
        match q {
            INFLATEQ => Kind::Inflate,
            DEFLATEQ => Kind::Deflate,
            _ if Some(q) == self.index.stats => Kind::Stats,
            _ => Kind::Reporting,
        }
    }

    /// Handles what the driver made available on queue `q`, within the budget.
    pub(super) fn process_queue(&mut self, q: usize) {
        if !self.is_activated() || self.interrupt().needs_reset() || q >= self.index.count {
            return;
        }
        let kind = self.kind(q);
        let mut budget = CHAINS_PER_CALL;
        let mut used_any = false;
        loop {
            let ranges_ran_out = match self.drain(q, kind, budget) {
                Ok((n, full)) => {
                    used_any |= n > 0;
                    budget -= n;
                    full
                }
                Err(e) => {
                    log::warn!(
                        "virtio-balloon: the driver broke {kind:?} queue {q} ({e}); device needs reset"
                    );
                    self.metrics.event_fails.inc();
                    self.interrupt().set_needs_reset();
                    return;
                }
            };
            if budget == 0 || ranges_ran_out {
                // More may be waiting: come back after the rest of the event loop.
                if let Err(e) = self.queue_events[q].write(1) {
                    log::error!("virtio-balloon: cannot wake queue {q} again: {e}");
                }
                break;
            }
            let Some(active) = self.active.as_mut() else {
                return;
            };
            // With EVENT_IDX this re-arms notifications and reports chains that raced in.
            match active.queues[q].enable_notification(&active.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::warn!("virtio-balloon: cannot re-enable notifications ({e:?})");
                    self.interrupt().set_needs_reset();
                    return;
                }
            }
        }
        if used_any {
            // Firecracker counts passes that found work; stats buffers are counted in drain.
            match kind {
                Kind::Inflate => self.metrics.inflate_count.inc(),
                Kind::Deflate => self.metrics.deflate_count.inc(),
                Kind::Reporting => self.metrics.free_page_report_count.inc(),
                Kind::Stats => {}
            }
        }
        if used_any && let Some(active) = self.active.as_mut() {
            self.interrupt
                .signal_used_if_needed(&mut active.queues[q], &active.mem);
        }
    }

    /// Takes chains from queue `q` until `budget` chains, or [`RANGES_PER_CALL`] ranges to give
    /// back, carries them out and uses them (except a stats buffer, which the device keeps);
    /// returns how many chains it took and whether the ranges ran out first. A chain the walker
    /// refuses (INDIRECT, a loop, an index out of range) is used untouched and ends the pass
    /// with an error, after the chains before it were carried out.
    fn drain(&mut self, q: usize, kind: Kind, budget: usize) -> Result<(usize, bool), QueueError> {
        let Balloon {
            active,
            log,
            counters,
            stats,
            stats_desc,
            pages: guest_pages,
            metrics,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            return Ok((0, false));
        };
        let mem = active.mem.clone();
        active.queues[q].disable_notification(&mem)?;
        let table = GuestAddress(active.queues[q].desc_table());
        let size = active.queues[q].size();
        let mut broken = None;
        let mut taken = 0;
        let mut heads = Vec::new();
        let mut discard: Vec<Range<u64>> = Vec::new();
        // One chain at a time: how many more to take depends on what the last ones named. The
        // iterator borrows the queue until its last use; add_used needs it back, after.
        let mut chains = active.queues[q].iter(&mem)?;
        while taken < budget && discard.len() < RANGES_PER_CALL {
            let Some(chain) = chains.next() else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            let chain = match chain::walk(&mem, table, size, head) {
                Ok(descs) => descs,
                Err(e) => {
                    heads.push(head);
                    broken = Some(e);
                    break;
                }
            };
            match kind {
                Kind::Inflate => {
                    let ranges = pfn_ranges(&chain, &mem, log);
                    counters.inflated_pages += page_count(&ranges);
                    discard.extend(ranges);
                }
                Kind::Deflate => {
                    // Without MUST_TELL_HOST the guest may already be using these pages; the
                    // dirty log tells snapshots when it writes them. Only checked and counted.
                    let ranges = pfn_ranges(&chain, &mem, log);
                    counters.deflated_pages += page_count(&ranges);
                }
                Kind::Reporting => {
                    let ranges = report_ranges(&chain, &mem, log);
                    let bytes = page_count(&ranges) * PAGE_SIZE;
                    counters.reported_bytes += bytes;
                    metrics.free_page_report_freed.add(bytes);
                    discard.extend(ranges);
                }
                Kind::Stats => {
                    let mut unknown = false;
                    for (tag, value) in stats_entries(&chain, &mem, log) {
                        if !stats.set(tag, value) {
                            unknown = true;
                            log.warn(
                                Misbehaviour::UnknownStat,
                                format_args!(
                                    "unknown statistics tag {tag} (value {value}) ignored"
                                ),
                            );
                        }
                    }
                    counters.stats_updates += 1;
                    metrics.stats_updates_count.inc();
                    if unknown {
                        metrics.stats_update_fails.inc();
                    }
                    if let Some(older) = stats_desc.replace(head) {
                        log.warn(
                            Misbehaviour::ExtraStatsBuffer,
                            format_args!(
                                "a second stats buffer ({head}) while buffer {older} is held; the older one is returned"
                            ),
                        );
                        heads.push(older);
                    }
                    continue;
                }
            }
            heads.push(head);
        }
        let full = discard.len() >= RANGES_PER_CALL;
        if !discard.is_empty() {
            match guest_pages.discard(&discard) {
                Ok(bytes) => counters.given_back_bytes += bytes,
                // The pages are still the guest's to give; only the host keeps their memory.
                Err(e) => {
                    if kind == Kind::Reporting {
                        metrics.free_page_report_fails.inc();
                    }
                    log::warn!("virtio-balloon: {e}");
                }
            }
        }
        for head in heads {
            active.queues[q].add_used(&mem, head, 0)?;
        }
        match broken {
            Some(e) => Err(e.into()),
            None => Ok((taken, full)),
        }
    }
}

fn page_count(ranges: &[Range<u64>]) -> u64 {
    ranges.iter().map(|r| (r.end - r.start) / PAGE_SIZE).sum()
}
