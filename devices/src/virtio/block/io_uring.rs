//! `io_engine: "Async"`: a drive's reads, writes and flushes go to an io_uring instead of
//! running on the VMM thread. A request's chain stays in flight (not yet used) until its
//! completion arrives; the ring's eventfd wakes the event loop, which then writes the status
//! byte, marks what a read brought in as dirty guest memory, and hands the chain back.
//!
//! At most [`super::QUEUE_SIZE`] requests are in flight (a driver that re-posts chains still in
//! flight waits for slots); a flush drains the ring first (`IOSQE_IO_DRAIN`), so it covers every
//! write submitted before it. Before a snapshot and on reset everything in flight is waited for.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{IoUring, opcode, squeue, types};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::request::RequestType;
use crate::virtio::GuestMemoryMmap;

/// What a request in flight needs at its completion.
#[derive(Debug)]
pub struct InFlight {
    /// Head of its descriptor chain.
    pub head: u16,
    /// Where its status byte goes.
    pub status: GuestAddress,
    /// Read, write or flush.
    pub kind: RequestType,
    /// Bytes the operation must move to succeed (0 for a flush).
    pub bytes: u64,
    /// Guest buffers (a read fills them).
    pub data: Vec<(GuestAddress, u32)>,
    /// The buffers as the kernel sees them; kept until the completion.
    _iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovecs point into guest memory, which outlives every request in flight (requests
// are waited for before the device lets go of its memory); they are only handed to the kernel.
unsafe impl Send for InFlight {}

/// A finished request: what was in flight, and the kernel's result (bytes moved, or -errno).
pub type Completion = (InFlight, i32);

/// An io_uring with its completion eventfd and the requests in flight on it.
pub struct AsyncIo {
    ring: IoUring,
    event: EventFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Entries pushed since the last submit.
    queued: u32,
}

impl std::fmt::Debug for AsyncIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncIo")
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl AsyncIo {
    /// A ring for `depth` requests in flight, its completions signalled on an eventfd.
    pub fn new(depth: u16) -> io::Result<Self> {
        let ring = IoUring::new(u32::from(depth))?;
        let event = EventFd::new(libc::EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        let depth = usize::from(depth);
        Ok(Self {
            ring,
            event,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            queued: 0,
        })
    }

    /// Signalled when completions are waiting.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// No slot is free: the next request waits for a completion.
    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    /// Queues a read (`kind` In) or write (Out) of `data` at `offset` of `fd`. On error nothing
    /// is queued (the request fails at once).
    pub fn queue_rw(
        &mut self,
        fd: RawFd,
        offset: u64,
        mem: &GuestMemoryMmap,
        request: (u16, GuestAddress, RequestType),
        data: &[(GuestAddress, u32)],
    ) -> io::Result<()> {
        let (head, status, kind) = request;
        let mut iovecs = Vec::with_capacity(data.len());
        let mut bytes = 0u64;
        for &(addr, len) in data {
            for slice in mem.get_slices(addr, len as usize) {
                let slice = slice.map_err(io::Error::other)?;
                iovecs.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
            bytes += u64::from(len);
        }
        let count = u32::try_from(iovecs.len()).map_err(io::Error::other)?;
        let entry = match kind {
            RequestType::In => opcode::Readv::new(types::Fd(fd), iovecs.as_ptr(), count)
                .offset(offset)
                .build(),
            _ => opcode::Writev::new(types::Fd(fd), iovecs.as_ptr(), count)
                .offset(offset)
                .build(),
        };
        self.push(
            entry,
            InFlight {
                head,
                status,
                kind,
                bytes,
                data: data.to_vec(),
                _iovecs: iovecs,
            },
        )
    }

    /// Queues an fdatasync of `fd` that starts once everything queued before it has finished.
    pub fn queue_flush(&mut self, fd: RawFd, head: u16, status: GuestAddress) -> io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .flags(squeue::Flags::IO_DRAIN);
        self.push(
            entry,
            InFlight {
                head,
                status,
                kind: RequestType::Flush,
                bytes: 0,
                data: Vec::new(),
                _iovecs: Vec::new(),
            },
        )
    }

    fn push(&mut self, entry: squeue::Entry, request: InFlight) -> io::Result<()> {
        let Some(slot) = self.free.pop() else {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "every io_uring slot is in flight",
            ));
        };
        let entry = entry.user_data(slot as u64);
        // SAFETY: the entry's iovec array and the guest buffers it names stay valid until its
        // completion: the array is kept in the slot (a Vec's heap buffer does not move when the
        // Vec does), guest memory stays mapped while requests are in flight.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // The submission queue has as many entries as there are slots, and queued entries
            // are submitted at every pass's end; refuse rather than lose track.
            self.free.push(slot);
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "the io_uring submission queue is full",
            ));
        }
        self.slots[slot] = Some(request);
        self.queued += 1;
        Ok(())
    }

    /// Hands what was queued to the kernel. Entries it did not take stay queued for next time.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.queued == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.queued = 0;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Completions that have arrived, appended to `out`.
    pub fn completions(&mut self, out: &mut Vec<Completion>) {
        let _ = self.event.read();
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, result) in done {
            let Some(request) = usize::try_from(slot)
                .ok()
                .and_then(|s| self.slots.get_mut(s))
                .and_then(Option::take)
            else {
                log::error!("io_uring: a completion for unknown slot {slot}");
                continue;
            };
            self.free.push(slot as usize);
            out.push((request, result));
        }
    }

    /// Submits what is queued and waits until nothing is in flight; every completion is
    /// appended to `out`.
    pub fn wait_all(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        self.queued = 0;
        while self.in_flight() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.completions(out);
        }
        Ok(())
    }
}

/// Marks a finished read's buffers as written by the device, so dirty tracking (diff
/// snapshots, free page bookkeeping) sees what the kernel wrote behind vm-memory's back.
pub fn mark_dirty(mem: &GuestMemoryMmap, data: &[(GuestAddress, u32)]) {
    for &(addr, len) in data {
        for slice in mem.get_slices(addr, len as usize).flatten() {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

#[cfg(test)]
#[path = "io_uring_tests.rs"]
mod tests;
