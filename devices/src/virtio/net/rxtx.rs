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

/// Receive chains taken from the queue and not used yet, in ring order: the last ones taken, so
/// that putting them back is winding the queue back by their number ([`unpop`]). A walk keeps
/// the chains a frame did not fill for the next frame, instead of putting them back and parsing
/// them again (with mergeable buffers a walk takes room for the largest frame, 64 KiB, and a
/// small frame fills one buffer of it).
#[derive(Default)]
struct Taken<'m> {
    /// Head index and memory of each chain.
    chains: std::collections::VecDeque<(u16, Segments<'m>)>,
    /// Bytes of all of them.
    len: usize,
    /// Memory pieces of all of them (at most [`super::MAX_IOVECS`], one `readv`).
    pieces: usize,
}

impl<'m> Taken<'m> {
    /// Bytes of the first `chains` chains.
    fn bytes(&self, chains: usize) -> usize {
        self.chains.iter().take(chains).map(|(_, s)| s.len()).sum()
    }

    /// I/O vectors over the first `chains` chains.
    fn iovecs(&self, chains: usize) -> Vec<libc::iovec> {
        let mut iov = Vec::with_capacity(self.pieces);
        for (_, segs) in self.chains.iter().take(chains) {
            iov.extend(segs.iovecs());
        }
        iov
    }

    /// Copies `data` to `offset` on in the chains, in order (marking it dirty).
    fn write_at(&self, mut offset: usize, data: &[u8]) {
        let mut done = 0;
        for (_, segs) in &self.chains {
            if done == data.len() {
                break;
            }
            if offset >= segs.len() {
                offset -= segs.len();
                continue;
            }
            done += segs.write_at(offset, &data[done..]);
            offset = 0;
        }
    }

    /// Marks the first `len` bytes dirty (the host kernel wrote them).
    fn mark_written(&self, mut len: usize) {
        for (_, segs) in &self.chains {
            if len == 0 {
                break;
            }
            let n = len.min(segs.len());
            segs.mark_written(n);
            len -= n;
        }
    }

    /// Takes the chains a frame of `n` bytes filled off the front: each one's head index and
    /// the bytes written in it.
    fn use_front(&mut self, mut n: usize) -> Vec<(u16, usize)> {
        let mut used = Vec::new();
        while n > 0 {
            let Some((index, segs)) = self.chains.pop_front() else {
                break;
            };
            let take = n.min(segs.len());
            self.len -= segs.len();
            self.pieces -= segs.pieces();
            used.push((index, take));
            n -= take;
        }
        used
    }
}

/// What gathering receive room found.
enum Gathered {
    /// Room for a frame (as much as was needed, or all the guest has).
    Room,
    /// The first chain was malformed: it was used with length 0.
    BadChain,
    /// Not enough room yet; what was taken stays taken.
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
        let mut taken = Taken::default();
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
                match gather(queue, mem, mrg, need, &mut taken)? {
                    Gathered::Room => {}
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
                }
                // Without mergeable buffers a frame goes into one chain.
                let chains = if mrg { taken.chains.len() } else { 1 };
                let room = taken.bytes(chains);
                let got = if from_hook {
                    let Some(h) = hook.as_mut() else {
                        hook_dry = true;
                        continue;
                    };
                    frame_buf.resize(room.min(HDR_LEN + MAX_PLAIN_FRAME), 0);
                    match h.frame_for_guest(&mut frame_buf[HDR_LEN..]) {
                        Some(n) => {
                            // A hook's frame is complete: no offload flags, no GSO.
                            frame_buf[..HDR_LEN].fill(0);
                            let n = (HDR_LEN + n).min(frame_buf.len());
                            taken.write_at(0, &frame_buf[..n]);
                            Ok(n)
                        }
                        None => {
                            // It said it had one: do not ask again in this walk.
                            hook_dry = true;
                            continue;
                        }
                    }
                } else {
                    tap.read_iov(&taken.iovecs(chains))
                };
                let n = match got {
                    Ok(n) if n > room => {
                        // The TAP reports the whole length even when it cut the frame short.
                        taken.mark_written(room);
                        metrics.rx_fails.inc();
                        log.warn(
                            &config.id,
                            Misbehaviour::TapRead,
                            format_args!(
                                "a {n}-byte frame did not fit the guest's {room} bytes of buffers; dropped"
                            ),
                        );
                        continue;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Stop::Done),
                    Err(e) => {
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
                taken.mark_written(n);
                // The frame is handed out over as many chains as it filled; the rest stay taken
                // for the next frame.
                let filled = if n == 0 {
                    0
                } else {
                    let mut left = n;
                    taken
                        .chains
                        .iter()
                        .take(chains)
                        .take_while(|(_, segs)| {
                            let more = left > 0;
                            left = left.saturating_sub(segs.len());
                            more
                        })
                        .count()
                };
                let num_buffers = if mrg { filled as u16 } else { 1 };
                taken.write_at(NUM_BUFFERS_OFFSET, &num_buffers.to_le_bytes());
                for (index, len) in taken.use_front(n) {
                    queue.add_used(mem, index, len as u32)?;
                }
                used = true;
                delivered += 1;
                metrics.rx_packets_count.inc();
                metrics.rx_bytes_count.add((n - HDR_LEN.min(n)) as u64);
                rx_limiter.consume((n - HDR_LEN.min(n)) as u64);
            }
        })();
        // What no frame filled goes back, to be taken first next time.
        unpop(queue, taken.chains.len());
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

/// Takes receive chains into `taken` until it holds `need` bytes (with mergeable buffers) or one
/// chain (without). A malformed chain met first is used empty; one met later is put back to be
/// met first next time. With mergeable buffers, too little room is [`Gathered::Short`] (it stays
/// taken), unless it is every buffer the ring can hold: then it is all the guest will ever give,
/// and is used as is.
fn gather<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    mrg: bool,
    need: usize,
    taken: &mut Taken<'m>,
) -> Result<Gathered, virtio_queue::Error> {
    let mut bad = None;
    let mut put_back = 0;
    {
        let mut iter = queue.iter(mem)?;
        while taken.chains.is_empty() || (mrg && taken.len < need) {
            let Some(chain) = iter.next() else {
                break;
            };
            let index = chain.head_index();
            // Every buffer must hold at least the header (virtio 1.2, 5.1.6.3.1).
            let segs = packet::rx_room(mem, chain)
                .ok()
                .filter(|s| s.len() >= HDR_LEN);
            match segs {
                Some(segs) if taken.pieces + segs.pieces() <= super::MAX_IOVECS => {
                    taken.len += segs.len();
                    taken.pieces += segs.pieces();
                    taken.chains.push_back((index, segs));
                }
                _ if taken.chains.is_empty() => {
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
    if taken.chains.is_empty() {
        return Ok(Gathered::Short);
    }
    if mrg && taken.len < need && taken.chains.len() < usize::from(queue.size()) {
        return Ok(Gathered::Short);
    }
    Ok(Gathered::Room)
}
