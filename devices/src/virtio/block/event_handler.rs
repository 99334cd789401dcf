//! The block device's event-manager subscriber: the activation event, then queue notifications.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, QueueT};

use super::device::Block;
use super::request;
use super::status;
use crate::virtio::device::VirtioDevice;

const ACTIVATE: u32 = 0;
const QUEUE: u32 = 1;

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
                    match ops.add(Events::with_data(
                        &self.queue_events[0],
                        QUEUE,
                        EventSet::IN,
                    )) {
                        Ok(()) => self.queue_registered = true,
                        Err(e) => {
                            log::error!(
                                "virtio-blk {}: cannot watch the queue: {e:?}",
                                self.config.id
                            );
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
                self.process_queue();
            }
            other => log::debug!("virtio-blk {}: unexpected event {other}", self.config.id),
        }
    }
}

impl Block {
    /// Runs every request the driver has made available, then interrupts the guest if it asked.
    pub(super) fn process_queue(&mut self) {
        if !self.is_activated() || self.interrupt.needs_reset() {
            return;
        }
        let id = self.config.id.clone();
        let mut used_any = false;
        loop {
            match self.drain_once() {
                Ok(n) => used_any |= n > 0,
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

    /// Takes the available chains, runs them and returns how many were used.
    fn drain_once(&mut self) -> Result<usize, virtio_queue::Error> {
        let Some(active) = self.active.as_mut() else {
            return Ok(0);
        };
        let mem = active.mem.clone();
        active.queue.disable_notification(&mem)?;
        // Collect first: the iterator borrows the queue, add_used needs it back. A lying avail
        // index shows up here as an error rather than being silently ignored.
        let chains: Vec<_> = active.queue.iter(&mem)?.collect();
        let count = chains.len();
        for chain in chains {
            let head = chain.head_index();
            let (status_byte, used_len, status_addr) = match request::parse(chain, &mem) {
                Ok(req) => {
                    let (s, n) = req.execute(&mut self.disk, &mem);
                    (s, n, Some(req.status))
                }
                Err((e, addr)) => {
                    log::debug!("virtio-blk {}: malformed request: {e}", self.config.id);
                    (status::IOERR, u32::from(addr.is_some()), addr)
                }
            };
            if let Some(addr) = status_addr {
                write_status(&mem, addr, status_byte);
            }
            active.queue.add_used(&mem, head, used_len)?;
        }
        Ok(count)
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
