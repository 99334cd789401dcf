//! The block device's event-manager subscriber: the activation event, queue notifications,
//! the rate limiter's timer and, for an `Async` drive, the io_uring's completions. Each notification is served within a budget so a guest that keeps
//! the queue full cannot keep the VMM thread, and each request spends the drive's rate-limit
//! budget before it runs; a request over that goes back on the queue and waits for the timer.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, QueueT};

use vm_memory::{Bytes, GuestAddress};

use super::device::Block;
use super::io_uring::{Completion, mark_dirty};
use super::request::{self, RequestType};
use super::{BYTES_PER_PASS, CHAINS_PER_PASS, status};
use crate::metrics::BlockMetrics;
use crate::virtio::budget::Budget;
use crate::virtio::chain::{self, QueueError};
use crate::virtio::device::VirtioDevice;

const ACTIVATE: u32 = 0;
const QUEUE: u32 = 1;
const RATE_LIMITER: u32 = 2;
const COMPLETIONS: u32 = 3;

/// How one pass over the queue ended.
enum Pass {
    /// The driver made nothing more available.
    Empty,
    /// The pass budget ran out with work maybe left: come back after the rest of the loop.
    BudgetSpent,
    /// The rate limiter stopped it: its timer brings the device back.
    Throttled,
    /// Every io_uring slot is in flight: a completion brings the device back.
    Waiting,
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            ACTIVATE,
            EventSet::IN,
        )) {
            log::error!(
                "virtio-blk {}: cannot watch the activation event: {e:?}",
                self.config.id
            );
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE => {
                let _ = self.activate_evt.read();
                if !self.queue_registered {
                    let watched = ops
                        .add(Events::with_data(
                            &self.queue_events[0],
                            QUEUE,
                            EventSet::IN,
                        ))
                        .and_then(|()| {
                            ops.add(Events::with_data(
                                self.limiter.timer(),
                                RATE_LIMITER,
                                EventSet::IN,
                            ))
                        })
                        .and_then(|()| match &self.engine {
                            Some(engine) => ops.add(Events::with_data(
                                engine.event(),
                                COMPLETIONS,
                                EventSet::IN,
                            )),
                            None => Ok(()),
                        });
                    match watched {
                        Ok(()) => self.queue_registered = true,
                        Err(e) => {
                            log::error!(
                                "virtio-blk {}: cannot watch the queue: {e:?}",
                                self.config.id
                            );
                            self.metrics.activate_fails.inc();
                            self.interrupt.set_needs_reset();
                            return;
                        }
                    }
                }
                // The driver may have queued requests before the loop saw the activation.
                self.process_queue();
            }
            QUEUE => {
                let _ = self.queue_events[0].read();
                self.metrics.queue_event_count.inc();
                // While throttled, the timer (not the guest) says when to go on.
                if !self.limiter.is_blocked() {
                    self.process_queue();
                }
            }
            RATE_LIMITER => {
                self.limiter.on_timer();
                self.metrics.rate_limiter_event_count.inc();
                self.process_queue();
            }
            COMPLETIONS => {
                let mut done = Vec::new();
                if let Some(engine) = self.engine.as_mut() {
                    engine.completions(&mut done);
                }
                self.finish(done);
                // Slots came free: requests that waited for one may go.
                if !self.limiter.is_blocked() {
                    self.process_queue();
                }
            }
            other => log::debug!("virtio-blk {}: unexpected event {other}", self.config.id),
        }
    }
}

impl Block {
    /// Runs the requests the driver made available, at most one pass's budget of them
    /// ([`CHAINS_PER_PASS`] chains or [`BYTES_PER_PASS`] bytes of I/O) and as the rate limiter
    /// allows, then interrupts the guest if it asked. With work left over budget, the queue's
    /// eventfd is signalled again and the handler returns, so the event loop serves the API and
    /// other devices between passes however fast the guest posts requests.
    pub(super) fn process_queue(&mut self) {
        if !self.is_activated() || self.interrupt.needs_reset() {
            return;
        }
        let id = self.config.id.clone();
        let mut budget = Budget::new(CHAINS_PER_PASS, BYTES_PER_PASS);
        let mut used_any = false;
        let outcome = loop {
            match self.drain_once(&mut budget) {
                Ok((n, pass)) => {
                    used_any |= n > 0;
                    match pass {
                        Pass::Empty => {}
                        end => break Ok(end),
                    }
                }
                Err(e) => break Err(e),
            }
            let Some(active) = self.active.as_mut() else {
                return;
            };
            // With EVENT_IDX this re-arms notifications and reports requests that raced in.
            match active.queue.enable_notification(&active.mem) {
                Ok(true) => continue,
                Ok(false) => break Ok(Pass::Empty),
                Err(e) => break Err(e.into()),
            }
        };
        match outcome {
            Ok(Pass::BudgetSpent) => {
                if let Err(e) = self.queue_events[0].write(1) {
                    log::error!("virtio-blk {id}: cannot re-signal the queue: {e}");
                }
            }
            // Throttled: notifications stay off until the timer fires (or, Waiting, until a
            // completion frees a slot).
            Ok(Pass::Empty | Pass::Throttled | Pass::Waiting) => {}
            Err(e) => {
                self.log.warn(
                    0,
                    &format!("virtio-blk {id}"),
                    format_args!("the driver broke the queue ({e}); device needs reset"),
                );
                self.interrupt.set_needs_reset();
            }
        }
        if let Some(engine) = self.engine.as_mut()
            && let Err(e) = engine.submit()
        {
            self.log.warn(
                1,
                &format!("virtio-blk {id}"),
                format_args!("io_uring refused the requests ({e}); device needs reset"),
            );
            self.interrupt.set_needs_reset();
        }
        if used_any {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            self.interrupt
                .signal_used_if_needed(&mut active.queue, &active.mem);
        }
    }

    /// Finishes requests the io_uring completed: status byte, dirty marks for what a read
    /// brought in, the chain back to the driver, and an interrupt if it asked. After a reset
    /// (no queue) they are dropped.
    pub(super) fn finish(&mut self, done: Vec<Completion>) {
        if done.is_empty() {
            return;
        }
        let id = self.config.id.clone();
        let metrics = self.metrics.clone();
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        for (req, result) in done {
            let ok = u64::try_from(result).is_ok_and(|n| n == req.bytes);
            if !ok {
                log::debug!(
                    "virtio-blk {id}: {:?} of {} bytes ended with {result}",
                    req.kind,
                    req.bytes
                );
            }
            let used_len = match (req.kind, ok) {
                (RequestType::In, true) => {
                    mark_dirty(&mem, &req.data);
                    u32::try_from(req.bytes)
                        .unwrap_or(u32::MAX)
                        .saturating_add(1)
                }
                _ => 1,
            };
            count_in(&metrics, req.kind, ok, req.bytes);
            write_status(
                &mem,
                req.status,
                if ok { status::OK } else { status::IOERR },
            );
            if let Err(e) = active.queue.add_used(&mem, req.head, used_len) {
                self.log.warn(
                    0,
                    &format!("virtio-blk {id}"),
                    format_args!("the driver broke the queue ({e}); device needs reset"),
                );
                self.interrupt.set_needs_reset();
                return;
            }
        }
        self.interrupt
            .signal_used_if_needed(&mut active.queue, &active.mem);
    }

    /// Waits for every request in flight on the io_uring; with `deliver` they are finished as
    /// usual (before a snapshot, so none is lost), otherwise dropped (on reset).
    pub(super) fn wait_in_flight(&mut self, deliver: bool) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        let mut done = Vec::new();
        if let Err(e) = engine.wait_all(&mut done) {
            log::error!(
                "virtio-blk {}: waiting for {} requests in flight: {e}",
                self.config.id,
                engine.in_flight()
            );
        }
        if deliver {
            self.finish(done);
        }
    }

    /// Takes available chains one by one while the pass budget lasts and the rate limiter
    /// allows, runs them and returns how many were used and why it stopped. A throttled chain
    /// goes back on the queue.
    fn drain_once(&mut self, budget: &mut Budget) -> Result<(usize, Pass), QueueError> {
        let Some(active) = self.active.as_mut() else {
            return Ok((0, Pass::Empty));
        };
        let mem = active.mem.clone();
        active.queue.disable_notification(&mem)?;
        let table = GuestAddress(active.queue.desc_table());
        let size = active.queue.size();
        let mut count = 0;
        loop {
            if budget.spent() {
                return Ok((count, Pass::BudgetSpent));
            }
            if self.engine.as_ref().is_some_and(|e| e.is_full()) {
                return Ok((count, Pass::Waiting));
            }
            // A lying avail index shows up here as an error rather than being silently ignored.
            let Some(head) = active.queue.iter(&mem)?.next().map(|c| c.head_index()) else {
                return Ok((count, Pass::Empty));
            };
            let descs = match chain::walk(&mem, table, size, head) {
                Ok(descs) => descs,
                Err(e) => {
                    // Nothing in a broken chain can be trusted, its status byte included.
                    active.queue.add_used(&mem, head, 0)?;
                    return Err(e.into());
                }
            };
            let (status_byte, used_len, status_addr) = match request::parse(&descs, &mem) {
                Ok(req) => {
                    let bytes = match req.kind {
                        RequestType::In | RequestType::Out => req.data_len().unwrap_or(0),
                        _ => 0,
                    };
                    if !self.limiter.consume(bytes) {
                        active.queue.go_to_previous_position();
                        self.metrics.rate_limiter_throttled_events.inc();
                        return Ok((count, Pass::Throttled));
                    }
                    budget.charge(req.data_len().unwrap_or(u64::MAX));
                    let done = match self.engine.as_mut() {
                        Some(engine) => req.start_async(&mut self.disk, engine, &mem, head),
                        None => Some(req.execute(&mut self.disk, &mem)),
                    };
                    // In flight: its completion finishes it.
                    let Some((s, n)) = done else {
                        continue;
                    };
                    count_in(&self.metrics, req.kind, s == status::OK, bytes);
                    (s, n, Some(req.status))
                }
                Err((e, addr)) => {
                    budget.charge(0);
                    log::debug!("virtio-blk {}: malformed request: {e}", self.config.id);
                    self.metrics.invalid_reqs_count.inc();
                    (status::IOERR, u32::from(addr.is_some()), addr)
                }
            };
            if let Some(addr) = status_addr {
                write_status(&mem, addr, status_byte);
            }
            active.queue.add_used(&mem, head, used_len)?;
            count += 1;
        }
    }
}

/// Counts a finished request in the drive's metrics.
fn count_in(m: &BlockMetrics, kind: RequestType, ok: bool, bytes: u64) {
    match (kind, ok) {
        (RequestType::In, true) => {
            m.read_count.inc();
            m.read_bytes.add(bytes);
        }
        (RequestType::Out, true) => {
            m.write_count.inc();
            m.write_bytes.add(bytes);
        }
        (RequestType::Flush, true) => m.flush_count.inc(),
        (_, false) => m.execute_fails.inc(),
        _ => {}
    }
}

fn write_status(mem: &crate::virtio::GuestMemoryMmap, addr: GuestAddress, status: u8) {
    if mem.write_obj(status, addr).is_err() {
        log::debug!(
            "virtio-blk: status byte at {:#x} is outside guest memory",
            addr.0
        );
    }
}
