//! The block device's event-manager subscriber: the activation event, then queue notifications
//! and the rate limiter's timer. Each request spends the drive's budget before it runs; a request
//! over budget goes back on the queue and waits for the timer.

use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, QueueT};

use super::device::Block;
use super::request::{self, RequestType};
use super::status;
use crate::virtio::device::VirtioDevice;

const ACTIVATE: u32 = 0;
const QUEUE: u32 = 1;
const RATE_LIMITER: u32 = 2;

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
            other => log::debug!("virtio-blk {}: unexpected event {other}", self.config.id),
        }
    }
}

impl Block {
    /// Runs every request the driver has made available (as the budget allows), then interrupts
    /// the guest if it asked.
    pub(super) fn process_queue(&mut self) {
        if !self.is_activated() || self.interrupt.needs_reset() {
            return;
        }
        let id = self.config.id.clone();
        let mut used_any = false;
        loop {
            match self.drain_once() {
                Ok((n, throttled)) => {
                    used_any |= n > 0;
                    if throttled {
                        // Notifications stay off: the timer brings the device back.
                        break;
                    }
                }
                Err(e) => {
                    log::warn!(
                        "virtio-blk {id}: the driver broke the queue ({e:?}); device needs reset"
                    );
                    self.interrupt.set_needs_reset();
                    return;
                }
            }
            let Some(active) = self.active.as_mut() else {
                return;
            };
            // With EVENT_IDX this re-arms notifications and reports requests that raced in.
            match active.queue.enable_notification(&active.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::warn!("virtio-blk {id}: cannot re-enable notifications ({e:?})");
                    self.interrupt.set_needs_reset();
                    return;
                }
            }
        }
        if used_any {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            self.interrupt
                .signal_used_if_needed(&mut active.queue, &active.mem);
        }
    }

    /// Takes available chains one at a time, runs them and returns how many were used, and
    /// whether the rate limiter stopped it (the last chain then went back on the queue).
    fn drain_once(&mut self) -> Result<(usize, bool), virtio_queue::Error> {
        let Some(active) = self.active.as_mut() else {
            return Ok((0, false));
        };
        let mem = active.mem.clone();
        active.queue.disable_notification(&mem)?;
        let mut count = 0;
        // A lying avail index shows up here as an error rather than being silently ignored
        // (popping alone would read it as an empty queue, and the notification re-check would
        // then ask for another pass, for ever).
        while let Some(chain) = active.queue.iter(&mem)?.next() {
            let head = chain.head_index();
            let (status_byte, used_len, status_addr) = match request::parse(chain, &mem) {
                Ok(req) => {
                    let bytes = match req.kind {
                        RequestType::In | RequestType::Out => req.data_len().unwrap_or(0),
                        _ => 0,
                    };
                    if !self.limiter.consume(bytes, Instant::now()) {
                        active.queue.go_to_previous_position();
                        self.metrics.rate_limiter_throttled_events.inc();
                        return Ok((count, true));
                    }
                    let (s, n) = req.execute(&mut self.disk, &mem);
                    let m = &self.metrics;
                    match (req.kind, s == status::OK) {
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
                    (s, n, Some(req.status))
                }
                Err((e, addr)) => {
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
        Ok((count, false))
    }
}

fn write_status(mem: &crate::virtio::GuestMemoryMmap, addr: vm_memory::GuestAddress, status: u8) {
    use vm_memory::Bytes;
    if mem.write_obj(status, addr).is_err() {
        log::debug!(
            "virtio-blk: status byte at {:#x} is outside guest memory",
            addr.0
        );
    }
}
