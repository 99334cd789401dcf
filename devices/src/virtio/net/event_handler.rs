//! The network device's event-manager subscriber. It watches its wake-up event and the two rate
//! limiter timers from the start, and the queue eventfds and the TAP once the driver activated
//! the device. The TAP is watched only while the guest has room for what it brings and the
//! receive limiter lets frames through; otherwise frames wait in the TAP's queue (epoll is
//! level-triggered: a TAP watched again reports what is waiting at once).

use std::os::fd::AsRawFd;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Net;
use super::rxtx::Stop;
use super::{Misbehaviour, RXQ, TXQ};
use crate::virtio::device::VirtioDevice;

const WAKE: u32 = 0;
const RX_QUEUE: u32 = 1;
const TX_QUEUE: u32 = 2;
const TAP: u32 = 3;
const RX_TIMER: u32 = 4;
const TX_TIMER: u32 = 5;

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let watched = [
            ops.add(Events::with_data(&self.wake_evt, WAKE, EventSet::IN)),
            ops.add(Events::with_data(&self.rx_timer, RX_TIMER, EventSet::IN)),
            ops.add(Events::with_data(&self.tx_timer, TX_TIMER, EventSet::IN)),
        ];
        for res in watched {
            if let Err(e) = res {
                log::error!(
                    "virtio-net {}: cannot watch an event: {e:?}",
                    self.config.id
                );
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let (mut rx, mut tx) = (false, false);
        match events.data() {
            WAKE => {
                let _ = self.wake_evt.read();
                if self.is_activated() && !self.registered {
                    self.register(ops);
                }
                if self.is_activated() {
                    self.apply_offloads();
                }
                (rx, tx) = (true, true);
            }
            RX_QUEUE => {
                let _ = self.queue_events[RXQ].read();
                self.metrics.rx_queue_event_count.inc();
                rx = true;
            }
            TX_QUEUE => {
                let _ = self.queue_events[TXQ].read();
                self.metrics.tx_queue_event_count.inc();
                tx = true;
            }
            TAP => {
                self.metrics.rx_tap_event_count.inc();
                if events
                    .event_set()
                    .intersects(EventSet::ERROR | EventSet::HANG_UP)
                {
                    self.log.warn(
                        &self.config.id,
                        Misbehaviour::TapRead,
                        format_args!(
                            "TAP {} reported an error or hang-up; no longer reading it",
                            self.tap.name()
                        ),
                    );
                    self.tap_dead = true;
                }
                rx = true;
            }
            RX_TIMER => {
                let _ = self.rx_timer.clear();
                self.metrics.rx_event_rate_limiter_count.inc();
                rx = true;
            }
            TX_TIMER => {
                let _ = self.tx_timer.clear();
                self.metrics.tx_rate_limiter_event_count.inc();
                tx = true;
            }
            other => log::debug!("virtio-net {}: unexpected event {other}", self.config.id),
        }
        let mut again = false;
        if tx {
            match self.process_tx() {
                Stop::Budget => again = true,
                Stop::Limited => {
                    let wait = self.tx_limiter.wait();
                    arm(&mut self.tx_timer, wait, &self.config.id);
                }
                _ => {}
            }
            // What the guest sent may have been answered by the hook.
            rx |= self.hook.as_ref().is_some_and(|h| h.has_frame_for_guest());
        }
        let mut watch_tap = self.is_activated() && !self.tap_dead;
        if rx {
            match self.process_rx() {
                Stop::Budget => again = true,
                Stop::Limited => {
                    watch_tap = false;
                    let wait = self.rx_limiter.wait();
                    arm(&mut self.rx_timer, wait, &self.config.id);
                }
                Stop::NoBuffers | Stop::Inactive => watch_tap = false,
                Stop::Done => {}
            }
        } else {
            // Nothing ran that could have changed whether the TAP should be watched.
            watch_tap &= self.tap_watched;
        }
        self.watch_tap(ops, watch_tap);
        if again {
            // Let the loop serve everything else first, then come back.
            self.wake();
        }
    }
}

/// Sets `timer` to fire after `wait` (at least a millisecond, so it does not spin).
fn arm(timer: &mut vmm_sys_util::timerfd::TimerFd, wait: Option<Duration>, id: &str) {
    let wait = wait.unwrap_or_default().max(Duration::from_millis(1));
    if let Err(e) = timer.reset(wait, None) {
        log::error!("virtio-net {id}: cannot set a rate limiter timer: {e}");
    }
}

impl Net {
    fn register(&mut self, ops: &mut EventOps) {
        for (evt, data) in self.queue_events.iter().zip([RX_QUEUE, TX_QUEUE]) {
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                log::error!(
                    "virtio-net {}: cannot watch queue {data}: {e:?}; device needs reset",
                    self.config.id
                );
                self.interrupt().set_needs_reset();
                return;
            }
        }
        // Registered with no interest; `watch_tap` turns it on.
        let tap = Events::with_data_raw(self.tap.as_raw_fd(), TAP, EventSet::empty());
        if let Err(e) = ops.add(tap) {
            log::error!(
                "virtio-net {}: cannot watch TAP {}: {e:?}; device needs reset",
                self.config.id,
                self.tap.name()
            );
            self.interrupt().set_needs_reset();
            return;
        }
        self.registered = true;
        self.tap_in_loop = true;
    }

    /// Watches the TAP for frames, or stops; a dead TAP is taken out of the loop for good.
    fn watch_tap(&mut self, ops: &mut EventOps, on: bool) {
        if !self.tap_in_loop {
            return;
        }
        let fd = self.tap.as_raw_fd();
        if self.tap_dead {
            let _ = ops.remove(Events::with_data_raw(fd, TAP, EventSet::empty()));
            self.tap_in_loop = false;
            self.tap_watched = false;
            return;
        }
        if on == self.tap_watched {
            return;
        }
        let set = if on { EventSet::IN } else { EventSet::empty() };
        match ops.modify(Events::with_data_raw(fd, TAP, set)) {
            Ok(()) => self.tap_watched = on,
            Err(e) => log::error!(
                "virtio-net {}: cannot change what is watched on TAP {}: {e:?}",
                self.config.id,
                self.tap.name()
            ),
        }
    }

    /// Passes the driver's receive offloads to the TAP (`TUNSETOFFLOAD`).
    fn apply_offloads(&mut self) {
        let flags = self.tap_offloads();
        if let Err(e) = self.tap.set_offload(flags) {
            self.log.warn(
                &self.config.id,
                Misbehaviour::Offload,
                format_args!(
                    "TUNSETOFFLOAD {flags:#x} on TAP {} failed: {e}",
                    self.tap.name()
                ),
            );
        }
    }
}
