//! Moving frames: the transmit walk (guest chains to the TAP, or to the hook) and the receive
//! walk (the hook's frames, then the TAP's, into the guest's buffers). Each walk stops at its
//! budget, at its rate limiter, or when there is nothing left to move, and says which, so the
//! event handler knows what to wait for next.

use std::io::ErrorKind;

use virtio_queue::{QueueOwnedT, QueueT};

use super::device::Net;
use super::hook::HEAD_LEN;
use super::packet::{self, Segments};
use super::{
    HDR_LEN, MAX_PLAIN_FRAME, Misbehaviour, NUM_BUFFERS_OFFSET, RX_BUDGET, RXQ, TX_BUDGET, TXQ,
    features,
};
use crate::virtio::{GuestMemoryMmap, Queue, VirtioDevice};

/// Why a walk stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// Nothing is left to move (the queue, or the TAP and the hook, are empty).
    Done,
    /// The budget ran out with work left.
    Budget,
    /// The rate limiter holds the next frame back.
    Limited,
    /// The guest has no (or too little) receive buffer room; the driver will be heard from.
    NoBuffers,
    /// The device is not active, or needs a reset.
    Inactive,
}

/// Asks the driver to notify when it adds a buffer, even though some are available already
/// (too few to use). With EVENT_IDX the avail event is set at the driver's current index, which
/// `enable_notification` alone would not do (it uses the device's position). Returns whether
/// buffers were added meanwhile.
fn notify_on_next_buffer(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    let position = queue.next_avail();
    let avail = queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)?
        .0;
    queue.set_next_avail(avail);
    let more = queue.enable_notification(mem);
    queue.set_next_avail(position);
    more
}

/// Receive chains taken from the queue for one frame.
struct Room<'m> {
    /// Head index and bytes of each chain, in order.
    chains: Vec<(u16, usize)>,
    segments: Segments<'m>,
}

/// What gathering receive room found.
enum Gathered<'m> {
    /// Room for a frame (as much as was needed, or all the guest has).
    Room(Room<'m>),
    /// The first chain was malformed: it was used with length 0.
    BadChain,
    /// Not enough room, and none of it taken.
    Short,
}

impl Net {
    /// Sends what the guest queued, up to [`TX_BUDGET`] frames.
    pub(super) fn process_tx(&mut self) -> Stop {
        if self.interrupt().needs_reset() {
            return Stop::Inactive;
        }
        let Net {
            active,
            tap,
            tx_limiter,
            hook,
            log,
            tx_hooked,
            metrics,
            config,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            return Stop::Inactive;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[TXQ];
        let mut used = false;
        let mut sent = 0;
        let mut head_buf = [0u8; HDR_LEN + HEAD_LEN];
        let result = (|| -> Result<Stop, virtio_queue::Error> {
            loop {
                queue.disable_notification(mem)?;
                loop {
                    if sent == TX_BUDGET {
                        return Ok(Stop::Budget);
                    }
                    if !tx_limiter.ready() {
                        metrics.tx_rate_limiter_throttled.inc();
                        return Ok(Stop::Limited);
                    }
                    let Some(chain) = queue.iter(mem)?.next() else {
                        break;
                    };
                    let index = chain.head_index();
                    match packet::tx_frame(mem, chain) {
                        Ok(frame) => {
                            let len = frame.len() - HDR_LEN;
                            let claimed = hook.as_mut().is_some_and(|h| {
                                let n = frame.read_at(0, &mut head_buf);
                                n > HDR_LEN && h.claims(&head_buf[HDR_LEN..n])
                            });
                            if let (true, Some(h)) = (claimed, hook.as_mut()) {
                                let mut whole = vec![0u8; frame.len()];
                                let n = frame.read_at(0, &mut whole);
                                h.guest_frame(&whole[HDR_LEN..n]);
                                *tx_hooked += 1;
                            } else {
                                match tap.write_iov(&frame.iovecs()) {
                                    Ok(_) => {
                                        metrics.tx_packets_count.inc();
                                        metrics.tx_bytes_count.add(len as u64);
                                    }
                                    Err(e) => {
                                        metrics.tx_fails.inc();
                                        metrics.tap_write_fails.inc();
                                        log.warn(
                                            &config.id,
                                            Misbehaviour::TapWrite,
                                            format_args!(
                                                "TAP {} refused a {len}-byte frame: {e}",
                                                tap.name()
                                            ),
                                        );
                                    }
                                }
                            }
                            tx_limiter.consume(len as u64);
                        }
                        Err(e) => {
                            metrics.tx_fails.inc();
                            metrics.tx_malformed_frames.inc();
                            log.warn(
                                &config.id,
                                Misbehaviour::BadTxChain,
                                format_args!("transmit chain dropped: {e}"),
                            );
                        }
                    }
                    queue.add_used(mem, index, 0)?;
                    used = true;
                    sent += 1;
                }
                // With EVENT_IDX this re-arms notifications and reports chains that raced in.
                if !queue.enable_notification(mem)? {
                    return Ok(Stop::Done);
                }
            }
        })();
        self.finish(TXQ, used, result)
    }

    /// Gives the guest the hook's frames and then the TAP's, up to [`RX_BUDGET`] frames.
    pub(super) fn process_rx(&mut self) -> Stop {
        if self.interrupt().needs_reset() || self.active.is_none() {
            return Stop::Inactive;
        }
        let mrg = self.acked(features::MRG_RXBUF);
        let max_len = self.max_rx_len();
        let Net {
            active,
            tap,
            rx_limiter,
            hook,
            log,
            metrics,
            config,
            tap_dead,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            return Stop::Inactive;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[RXQ];
        let mut used = false;
        let mut delivered = 0;
        let mut frame_buf = Vec::new();
        let mut hook_dry = false;
        let result = (|| -> Result<Stop, virtio_queue::Error> {
            loop {
                if delivered == RX_BUDGET {
                    return Ok(Stop::Budget);
                }
                if !rx_limiter.ready() {
                    metrics.rx_rate_limiter_throttled.inc();
                    return Ok(Stop::Limited);
                }
                let from_hook = !hook_dry && hook.as_ref().is_some_and(|h| h.has_frame_for_guest());
                if !from_hook && *tap_dead {
                    return Ok(Stop::Done);
                }
                let need = if from_hook {
                    HDR_LEN + MAX_PLAIN_FRAME
                } else {
                    max_len
                };
                let room = match gather(queue, mem, mrg, need)? {
                    Gathered::Room(room) => room,
                    Gathered::BadChain => {
                        log.warn(
                            &config.id,
                            Misbehaviour::BadRxChain,
                            format_args!("receive chain with no usable room returned empty"),
                        );
                        used = true;
                        continue;
                    }
                    Gathered::Short => {
                        if notify_on_next_buffer(queue, mem)? {
                            continue;
                        }
                        metrics.no_rx_avail_buffer.inc();
                        return Ok(Stop::NoBuffers);
                    }
                };
                let got = if from_hook {
                    let Some(h) = hook.as_mut() else {
                        unpop(queue, room.chains.len());
                        hook_dry = true;
                        continue;
                    };
                    frame_buf.resize(room.segments.len().min(HDR_LEN + MAX_PLAIN_FRAME), 0);
                    match h.frame_for_guest(&mut frame_buf[HDR_LEN..]) {
                        Some(n) => {
                            // A hook's frame is complete: no offload flags, no GSO.
                            frame_buf[..HDR_LEN].fill(0);
                            let n = (HDR_LEN + n).min(frame_buf.len());
                            room.segments.write_at(0, &frame_buf[..n]);
                            Ok(n)
                        }
                        None => {
                            // It said it had one: do not ask again in this walk.
                            unpop(queue, room.chains.len());
                            hook_dry = true;
                            continue;
                        }
                    }
                } else {
                    tap.read_iov(&room.segments.iovecs())
                };
                let n = match got {
                    Ok(n) if n > room.segments.len() => {
                        // The TAP reports the whole length even when it cut the frame short.
                        room.segments.mark_written(room.segments.len());
                        metrics.rx_fails.inc();
                        log.warn(
                            &config.id,
                            Misbehaviour::TapRead,
                            format_args!(
                                "a {n}-byte frame did not fit the guest's {} bytes of buffers; dropped",
                                room.segments.len()
                            ),
                        );
                        unpop(queue, room.chains.len());
                        continue;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        unpop(queue, room.chains.len());
                        return Ok(Stop::Done);
                    }
                    Err(e) => {
                        unpop(queue, room.chains.len());
                        metrics.rx_fails.inc();
                        metrics.tap_read_fails.inc();
                        log.warn(
                            &config.id,
                            Misbehaviour::TapRead,
                            format_args!("reading TAP {} failed: {e}", tap.name()),
                        );
                        if e.raw_os_error() == Some(libc::EBADFD)
                            || e.raw_os_error() == Some(libc::EIO)
                        {
                            *tap_dead = true;
                        }
                        continue;
                    }
                };
                room.segments.mark_written(n);
                // Hand out the frame over as many chains as it fills; the rest go back.
                let mut left = n;
                let mut buffers = 0u16;
                let mut lens = Vec::with_capacity(room.chains.len());
                for &(index, len) in &room.chains {
                    if left == 0 {
                        break;
                    }
                    let take = left.min(len);
                    lens.push((index, take));
                    left -= take;
                    buffers += 1;
                }
                let num_buffers = if mrg { buffers } else { 1 };
                room.segments
                    .write_at(NUM_BUFFERS_OFFSET, &num_buffers.to_le_bytes());
                let unused = room.chains.len() - lens.len();
                unpop(queue, unused);
                for (index, len) in lens {
                    queue.add_used(mem, index, len as u32)?;
                }
                used = true;
                delivered += 1;
                metrics.rx_packets_count.inc();
                metrics.rx_bytes_count.add((n - HDR_LEN.min(n)) as u64);
                rx_limiter.consume((n - HDR_LEN.min(n)) as u64);
            }
        })();
        self.finish(RXQ, used, result)
    }

    /// Interrupts the guest if it wants to hear about used buffers; a broken queue asks for a
    /// reset.
    fn finish(
        &mut self,
        index: usize,
        used: bool,
        result: Result<Stop, virtio_queue::Error>,
    ) -> Stop {
        let stop = match result {
            Ok(stop) => stop,
            Err(e) => {
                log::warn!(
                    "virtio-net {}: the driver broke queue {index} ({e}); device needs reset",
                    self.config.id
                );
                self.metrics.event_fails.inc();
                self.interrupt().set_needs_reset();
                Stop::Inactive
            }
        };
        let interrupt = self.interrupt().clone();
        if let (true, Some(active)) = (used, self.active.as_mut()) {
            interrupt.signal_used_if_needed(&mut active.queues[index], &active.mem);
        }
        stop
    }
}

/// Puts the last `count` chains taken back, so they are taken again next time.
fn unpop(queue: &mut Queue, count: usize) {
    if count > 0 {
        queue.set_next_avail(queue.next_avail().wrapping_sub(count as u16));
    }
}

/// Takes receive chains until they hold `need` bytes (with mergeable buffers) or one chain
/// (without). A malformed chain met first is used empty; one met later is put back to be met
/// first next time. With mergeable buffers, too little room is put back entirely, unless it is
/// every buffer the ring can hold: then it is all the guest will ever give, and is used as is.
fn gather<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    mrg: bool,
    need: usize,
) -> Result<Gathered<'m>, virtio_queue::Error> {
    let mut room = Room {
        chains: Vec::new(),
        segments: Segments::empty(),
    };
    let mut bad = None;
    let mut put_back = 0;
    {
        let mut iter = queue.iter(mem)?;
        while room.chains.is_empty() || (mrg && room.segments.len() < need) {
            let Some(chain) = iter.next() else {
                break;
            };
            let index = chain.head_index();
            // Every buffer must hold at least the header (virtio 1.2, 5.1.6.3.1).
            let segs = packet::rx_room(mem, chain)
                .ok()
                .filter(|s| s.len() >= HDR_LEN);
            let len = segs.as_ref().map_or(0, Segments::len);
            match segs.map(|s| room.segments.extend(s)) {
                Some(Ok(())) => room.chains.push((index, len)),
                _ if room.chains.is_empty() => {
                    bad = Some(index);
                    break;
                }
                _ => {
                    put_back = 1;
                    break;
                }
            }
        }
    }
    unpop(queue, put_back);
    if let Some(index) = bad {
        queue.add_used(mem, index, 0)?;
        return Ok(Gathered::BadChain);
    }
    if room.chains.is_empty() {
        return Ok(Gathered::Short);
    }
    if mrg && room.segments.len() < need && room.chains.len() < usize::from(queue.size()) {
        unpop(queue, room.chains.len());
        return Ok(Gathered::Short);
    }
    Ok(Gathered::Room(room))
}
