//! The vsock device's event-manager subscriber. It watches the activation event, the listening
//! socket and the timer from the start, the queue eventfds once the driver activated the device,
//! and each host socket for what its connection currently needs (see `Muxer::sync_epoll`).

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Vsock;
use super::muxer::Poller;
use super::{EVQ, RXQ, TXQ};
use crate::virtio::device::VirtioDevice;

const ACTIVATE: u32 = 0;
const RX_QUEUE: u32 = 1;
const TX_QUEUE: u32 = 2;
const EVENT_QUEUE: u32 = 3;
const LISTENER: u32 = 4;
const TIMER: u32 = 5;
const HOST_STREAM: u32 = 6;

/// The muxer's view of the event manager.
struct Ops<'a, 'b>(&'a mut EventOps<'b>);

impl Poller for Ops<'_, '_> {
    fn add(&mut self, fd: RawFd, set: EventSet) -> bool {
        let res = self.0.add(Events::with_data_raw(fd, HOST_STREAM, set));
        res.map_err(|e| log::warn!("virtio-vsock: cannot watch host socket {fd}: {e:?}"))
            .is_ok()
    }

    fn modify(&mut self, fd: RawFd, set: EventSet) -> bool {
        let res = self.0.modify(Events::with_data_raw(fd, HOST_STREAM, set));
        res.map_err(|e| log::warn!("virtio-vsock: cannot re-watch host socket {fd}: {e:?}"))
            .is_ok()
    }

    fn remove(&mut self, fd: RawFd, set: EventSet) {
        if let Err(e) = self.0.remove(Events::with_data_raw(fd, HOST_STREAM, set)) {
            log::warn!("virtio-vsock: cannot stop watching host socket {fd}: {e:?}");
        }
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        let listener = self.muxer.listener().as_raw_fd();
        let watched = [
            ops.add(Events::with_data(
                &self.activate_evt,
                ACTIVATE,
                EventSet::IN,
            )),
            ops.add(Events::with_data_raw(listener, LISTENER, EventSet::IN)),
            ops.add(Events::with_data(&self.timer, TIMER, EventSet::IN)),
        ];
        for res in watched {
            if let Err(e) = res {
                log::error!(
                    "virtio-vsock {}: cannot watch an event: {e:?}",
                    self.uds_path().display()
                );
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let now = Instant::now();
        let mut timer_fired = false;
        match events.data() {
            ACTIVATE => {
                let _ = self.activate_evt.read();
                if self.is_activated() && !self.queues_registered {
                    self.register_queues(ops);
                }
                self.process_tx(now);
                self.process_rx(now);
            }
            RX_QUEUE => {
                let _ = self.queue_events[RXQ].read();
                self.metrics.rx_queue_event_count.inc();
                self.process_rx(now);
            }
            TX_QUEUE => {
                let _ = self.queue_events[TXQ].read();
                self.metrics.tx_queue_event_count.inc();
                self.process_tx(now);
                self.process_rx(now);
            }
            EVENT_QUEUE => {
                // New event buffers: only a transport reset uses them, when asked.
                let _ = self.queue_events[EVQ].read();
            }
            LISTENER => self.muxer.accept(now),
            TIMER => {
                timer_fired = true;
                self.muxer.on_timer(now);
                self.process_rx(now);
            }
            HOST_STREAM => {
                self.muxer
                    .on_host_event(events.fd(), events.event_set(), now);
                self.process_rx(now);
            }
            other => log::debug!("virtio-vsock: unexpected event {other}"),
        }
        self.muxer.sync_epoll(&mut Ops(ops));
        self.rearm_timer(now, timer_fired);
    }
}

impl Vsock {
    fn register_queues(&mut self, ops: &mut EventOps) {
        for (evt, data) in self
            .queue_events
            .iter()
            .zip([RX_QUEUE, TX_QUEUE, EVENT_QUEUE])
        {
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                log::error!("virtio-vsock: cannot watch queue {data}: {e:?}; device needs reset");
                self.metrics.activate_fails.inc();
                self.interrupt().set_needs_reset();
                return;
            }
        }
        self.queues_registered = true;
    }

    /// Sets the timer for the muxer's earliest deadline. Re-setting it also clears an expiry the
    /// loop was told about, so `force` after the timer fired keeps it from firing again at once.
    fn rearm_timer(&mut self, now: Instant, force: bool) {
        let next = self.muxer.next_deadline();
        if !force && next == self.timer_armed {
            return;
        }
        let res = match next {
            Some(t) => self.timer.reset(
                t.saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
                None,
            ),
            None => self.timer.clear(),
        };
        if let Err(e) = res {
            log::error!("virtio-vsock: cannot set the timer: {e}");
        }
        self.timer_armed = next;
    }
}
