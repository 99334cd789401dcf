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
use crate::virtio::{GuestMemoryMmap, Queue, VirtioDevice, used};

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

/// Asks the driver to notify when it adds a buffer, the walk having taken every buffer it saw
/// (too little room). Returns whether buffers the walk has not seen are available: the driver
/// may have added some since the walk read its index, and it will not notify for those (it
/// notifies only when its index passes the avail event, set here); they must be taken now, or
/// the receive path waits for a notification that never comes. Otherwise the avail event is the
/// walk's position, which is then the driver's index too.
fn notify_on_next_buffer(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    let avail = queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)?
        .0;
    if avail != queue.next_avail() {
        return Ok(true);
    }
    // Sets the event at the position, fences, and reads the index again.
    queue.enable_notification(mem)
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
    fn use_front(&mut self, mut n: usize) -> Vec<(u16, u32)> {
        let mut used = Vec::new();
        while n > 0 {
            let Some((index, segs)) = self.chains.pop_front() else {
                break;
            };
            let take = n.min(segs.len());
            self.len -= segs.len();
            self.pieces -= segs.pieces();
            // At most one frame's bytes, so it fits.
            used.push((index, take as u32));
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
        let first_used = queue.next_used();
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
                    used::publish(queue, mem, &[(index, 0)])?;
                    sent += 1;
                }
                // With EVENT_IDX this re-arms notifications and reports chains that raced in.
                if !queue.enable_notification(mem)? {
                    return Ok(Stop::Done);
                }
            }
        })();
        self.finish(TXQ, first_used, result)
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
        let first_used = queue.next_used();
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
                // All of the frame's buffers at once: the driver must never see some of them.
                used::publish(queue, mem, &taken.use_front(n))?;
                delivered += 1;
                metrics.rx_packets_count.inc();
                metrics.rx_bytes_count.add((n - HDR_LEN.min(n)) as u64);
                rx_limiter.consume((n - HDR_LEN.min(n)) as u64);
            }
        })();
        // What no frame filled goes back, to be taken first next time.
        unpop(queue, taken.chains.len());
        self.finish(RXQ, first_used, result)
    }

    /// Interrupts the guest if it wants to hear about the buffers used since the used index was
    /// `first_used`; a broken queue asks for a reset.
    fn finish(
        &mut self,
        index: usize,
        first_used: u16,
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
        if let Some(active) = self.active.as_ref() {
            self.interrupt()
                .signal_used_since(&active.queues[index], &active.mem, first_used);
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
/// chain (without). A malformed chain met first is used empty; one met later (or one whose pieces
/// would pass [`super::MAX_IOVECS`]) is put back to be met first next time, and what was taken
/// before it is the room for this frame (buffers behind it cannot join it, so waiting for them
/// would stall the receive path for good). With mergeable buffers, too little room is
/// [`Gathered::Short`] (it stays taken), unless it is every buffer the ring can hold: then it is
/// all the guest will ever give, and is used as is.
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
        used::publish(queue, mem, &[(index, 0)])?;
        return Ok(Gathered::BadChain);
    }
    if taken.chains.is_empty() {
        return Ok(Gathered::Short);
    }
    if put_back > 0 {
        return Ok(Gathered::Room);
    }
    if mrg && taken.len < need && taken.chains.len() < usize::from(queue.size()) {
        return Ok(Gathered::Short);
    }
    Ok(Gathered::Room)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::used::TestRing;

    #[test]
    fn buffers_the_walk_has_not_seen_are_taken_rather_than_waited_for() {
        let (mem, mut queue, ring) = TestRing::queue(16);
        queue.set_event_idx(true);
        // The walk took 3 buffers; the driver added 2 more since it read the index, and will not
        // notify for them.
        queue.set_next_avail(3);
        TestRing::set_avail_idx(&mem, 5);
        assert!(notify_on_next_buffer(&mut queue, &mem).unwrap());
        assert_eq!(queue.next_avail(), 3, "the walk goes on from where it was");
        // Every buffer seen: the driver is asked to notify for its next one.
        queue.set_next_avail(5);
        assert!(!notify_on_next_buffer(&mut queue, &mem).unwrap());
        assert_eq!(ring.avail_event(&mem), 5);
    }
}
