//! The vsock device: its features, configuration space (the guest CID), activation, and the walks
//! over its three queues that the event handler runs.

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::muxer::Muxer;
use super::packet::{self, Chain};
use super::{
    BYTES_PER_PASS, CHAINS_PER_PASS, EVENT_TRANSPORT_RESET, EVQ, LogOnce, MIN_GUEST_CID,
    Misbehaviour, RXQ, TXQ, VSOCK_QUEUE_SIZES, VsockError,
};
use crate::virtio::Budget;
use crate::virtio::chain::{self, QueueError};
use crate::virtio::device::read_config_space;
use crate::virtio::{
    ActivateError, GuestMemoryMmap, Interrupt, Queue, TYPE_VSOCK, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
};

/// The queues handed over by the driver, with the memory they live in.
pub(super) struct Active {
    pub(super) mem: GuestMemoryMmap,
    pub(super) queues: Vec<Queue>,
}

/// A virtio-vsock device backed by Unix sockets on the host.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    /// Device and inode of the socket file this device created (removed on drop if unchanged).
    socket_id: Option<(u64, u64)>,
    pub(super) muxer: Muxer,
    avail_features: u64,
    acked_features: u64,
    pub(super) queue_events: Vec<EventFd>,
    /// Wakes the event handler: after activation, and after connections were dropped outside it.
    pub(super) activate_evt: EventFd,
    pub(super) timer: TimerFd,
    /// The deadline the timer is set for.
    pub(super) timer_armed: Option<Instant>,
    interrupt: Arc<Interrupt>,
    pub(super) active: Option<Active>,
    /// The queue eventfds are registered with the event loop (done once, at first activation).
    pub(super) queues_registered: bool,
    log: LogOnce,
    pub(super) metrics: Arc<crate::metrics::VsockMetrics>,
}

impl Vsock {
    /// A device for the guest `guest_cid`, listening for host connections at `uds_path`; `irqfd`
    /// is the interrupt's eventfd (an irqfd in KVM).
    pub fn new(guest_cid: u64, uds_path: PathBuf, irqfd: EventFd) -> Result<Self, VsockError> {
        // CIDs are 32 bits in Linux and u32::MAX is VMADDR_CID_ANY.
        if !(MIN_GUEST_CID..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::ReservedCid(guest_cid));
        }
        let bind_err = |err| VsockError::Bind {
            path: uds_path.clone(),
            err,
        };
        let listener = UnixListener::bind(&uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let socket_id = std::fs::symlink_metadata(&uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let fd_err = |what, err| VsockError::Fd {
            path: uds_path.clone(),
            what,
            err,
        };
        let evt = |what| EventFd::new(libc::EFD_NONBLOCK).map_err(|e| fd_err(what, e));
        let queue_events = vec![
            evt("rx queue eventfd")?,
            evt("tx queue eventfd")?,
            evt("event queue eventfd")?,
        ];
        let activate_evt = evt("activation eventfd")?;
        let timer = TimerFd::new().map_err(|e| fd_err("timerfd", e.into()))?;
        Ok(Self {
            guest_cid,
            muxer: Muxer::new(guest_cid, uds_path.clone(), listener),
            uds_path,
            socket_id,
            avail_features: (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX),
            acked_features: 0,
            queue_events,
            activate_evt,
            timer,
            timer_armed: None,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            active: None,
            queues_registered: false,
            log: LogOnce::default(),
            metrics: Arc::new(crate::metrics::VsockMetrics::default()),
        })
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<crate::metrics::VsockMetrics> {
        self.metrics.clone()
    }

    /// Where the device listens for host connections.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The connection table.
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    /// Drops every connection and, if the guest left an event buffer, tells it with
    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (so it resets its sockets too). Returns whether the event
    /// was delivered. Used around snapshots, when the host ends of all connections go away.
    pub fn send_transport_reset(&mut self) -> bool {
        self.muxer.drop_all();
        // The event loop must stop watching the dropped sockets before they close.
        if let Err(e) = self.activate_evt.write(1) {
            log::error!("virtio-vsock: cannot wake the event handler: {e}");
        }
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[EVQ];
        let mut chain = match pop(queue, mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => {
                log::warn!("virtio-vsock: no event buffer for a transport reset");
                return false;
            }
            Err(e) => {
                log::warn!(
                    "virtio-vsock: the driver broke the event queue ({e}); device needs reset"
                );
                self.interrupt.set_needs_reset();
                return false;
            }
        };
        let head = chain.head_index();
        let table = GuestAddress(queue.desc_table());
        let written = match chain::walk(mem, table, queue.size(), head)
            .ok()
            .and_then(|_| chain.next())
        {
            Some(d) if d.is_write_only() && d.len() >= 4 => mem
                .write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                .is_ok(),
            _ => false,
        };
        if !written {
            self.log.warn(
                Misbehaviour::BadEventChain,
                format_args!("event buffer unusable for a transport reset"),
            );
        }
        if let Err(e) = queue.add_used(mem, head, if written { 4 } else { 0 }) {
            log::warn!("virtio-vsock: the driver broke the event queue ({e}); device needs reset");
            self.interrupt.set_needs_reset();
            return false;
        }
        self.interrupt.signal_used_if_needed(queue, mem);
        written
    }

    /// Routes the packets the guest put on the tx queue, a budget's worth per pass
    /// ([`CHAINS_PER_PASS`], [`BYTES_PER_PASS`]); with more waiting, the queue is signalled again
    /// so the event loop comes back after serving the rest.
    pub(super) fn process_tx(&mut self, now: Instant) {
        if self.interrupt.needs_reset() {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[TXQ];
        let table = GuestAddress(queue.desc_table());
        let size = queue.size();
        let mut budget = Budget::new(CHAINS_PER_PASS, BYTES_PER_PASS);
        let mut used = false;
        let result = (|| -> Result<bool, QueueError> {
            loop {
                queue.disable_notification(mem)?;
                while !budget.spent() {
                    let Some(mut chain) = pop(queue, mem)? else {
                        break;
                    };
                    let head = chain.head_index();
                    if let Err(e) = chain::walk(mem, table, size, head) {
                        queue.add_used(mem, head, 0)?;
                        return Err(e.into());
                    }
                    match packet::parse_tx(mem, &mut chain) {
                        Ok(pkt) => {
                            self.metrics.tx_packets_count.inc();
                            self.metrics.tx_bytes_count.add(u64::from(pkt.len()));
                            budget.charge(u64::from(pkt.len()));
                            self.muxer.recv_tx(&pkt, now)
                        }
                        Err(e) => {
                            budget.charge(0);
                            self.log.warn(
                                Misbehaviour::BadTxChain,
                                format_args!("tx chain refused: {e}"),
                            )
                        }
                    }
                    queue.add_used(mem, head, 0)?;
                    used = true;
                }
                if budget.spent() {
                    return Ok(true);
                }
                // With EVENT_IDX this re-arms notifications and reports chains that raced in.
                if !queue.enable_notification(mem)? {
                    return Ok(false);
                }
            }
        })();
        self.finish(TXQ, used, result);
    }

    /// Gives the guest what the muxer has for it, as long as there are rx buffers and the pass's
    /// budget lasts.
    pub(super) fn process_rx(&mut self, now: Instant) {
        if self.interrupt.needs_reset() || !self.muxer.has_rx() {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[RXQ];
        let table = GuestAddress(queue.desc_table());
        let size = queue.size();
        let mut budget = Budget::new(CHAINS_PER_PASS, BYTES_PER_PASS);
        let mut used = false;
        let result = (|| -> Result<bool, QueueError> {
            loop {
                // Notifications stay off while the device needs no buffers; only running out
                // turns them on.
                queue.disable_notification(mem)?;
                while self.muxer.has_rx() && !budget.spent() {
                    let Some(mut chain) = pop(queue, mem)? else {
                        break;
                    };
                    let head = chain.head_index();
                    if let Err(e) = chain::walk(mem, table, size, head) {
                        queue.add_used(mem, head, 0)?;
                        return Err(e.into());
                    }
                    let len = match packet::parse_rx(mem, &mut chain) {
                        Ok(mut pkt) => match self.muxer.fill_rx(&mut pkt, now) {
                            Some(len) => {
                                self.metrics.rx_packets_count.inc();
                                self.metrics.rx_bytes_count.add(u64::from(len));
                                budget.charge(u64::from(len));
                                packet::used_len(len)
                            }
                            None => {
                                // Nothing after all: the buffer stays available.
                                queue.go_to_previous_position();
                                return Ok(false);
                            }
                        },
                        Err(e) => {
                            budget.charge(0);
                            self.log.warn(
                                Misbehaviour::BadRxChain,
                                format_args!("rx chain refused: {e}"),
                            );
                            0
                        }
                    };
                    queue.add_used(mem, head, len)?;
                    used = true;
                }
                if budget.spent() {
                    return Ok(self.muxer.has_rx());
                }
                if !self.muxer.has_rx() || !queue.enable_notification(mem)? {
                    return Ok(false);
                }
            }
        })();
        self.finish(RXQ, used, result);
    }

    /// Ends a pass over queue `index`: a broken queue needs a reset; a pass that ran out of
    /// budget with work left signals the queue again; used buffers interrupt the guest.
    fn finish(&mut self, index: usize, used: bool, result: Result<bool, QueueError>) {
        match result {
            Err(e) => {
                self.log.warn(
                    Misbehaviour::BrokenQueue,
                    format_args!("the driver broke queue {index} ({e}); device needs reset"),
                );
                self.interrupt.set_needs_reset();
            }
            Ok(true) => {
                if let Err(e) = self.queue_events[index].write(1) {
                    log::error!("virtio-vsock: cannot re-signal queue {index}: {e}");
                }
            }
            Ok(false) => {}
        }
        if let (true, Some(active)) = (used, self.active.as_mut()) {
            self.interrupt
                .signal_used_if_needed(&mut active.queues[index], &active.mem);
        }
    }
}

/// The next chain the driver made available. A lying avail index is an error here (virtio-queue's
/// `pop_descriptor_chain` would only log it).
fn pop<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<Chain<'m>>, virtio_queue::Error> {
    Ok(queue.iter(mem)?.next())
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        VSOCK_QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-vsock: write to read-only config space at {offset:#x} ignored");
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != VSOCK_QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                want: VSOCK_QUEUE_SIZES.len(),
                got: queues.len(),
            });
        }
        self.active = Some(Active { mem, queues });
        self.activate_evt.write(1).map_err(ActivateError::Signal)
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        // The guest forgot its connections; the event loop forgets the host sockets when woken.
        self.muxer.drop_all();
        if let Err(e) = self.activate_evt.write(1) {
            log::error!("virtio-vsock: cannot wake the event handler: {e}");
        }
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn active_queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| a.queues.as_slice())
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // Remove the socket file if it is still the one this device bound.
        let same = std::fs::symlink_metadata(&self.uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if same.is_some() && same == self.socket_id {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
