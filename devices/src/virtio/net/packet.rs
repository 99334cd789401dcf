//! What the guest put on the queues: a transmit chain is one frame (vnet header first) in
//! device-readable buffers, a receive chain is device-writable room for a frame or, with
//! mergeable buffers, for part of one. Either becomes [`Segments`]: the guest memory slices it
//! covers, checked to lie in guest memory, ready to be handed to `readv`/`writev` as I/O vectors
//! and kept alive for the call. Bytes the device writes itself (`num_buffers`, a hook's frames)
//! go through the slices, which count them as dirty for diff snapshots; bytes the host kernel
//! writes are marked dirty afterwards ([`Segments::mark_written`]).

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::{AtomicBitmap, BS, Bitmap};
use vm_memory::{Bytes, GuestMemoryBackend, VolatileSlice};

use super::{HDR_LEN, MAX_GSO_FRAME, MAX_IOVECS, MIN_FRAME};
use crate::virtio::GuestMemoryMmap;

/// A descriptor chain from one of the device's queues.
pub type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

/// A piece of guest memory, carrying guest memory's dirty bitmap.
pub type Slice<'m> = VolatileSlice<'m, BS<'m, AtomicBitmap>>;

/// Why a chain cannot carry a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A transmit chain with a device-writable buffer, or a receive chain with a readable one.
    #[error("a {0} buffer in a {1} chain")]
    Direction(&'static str, &'static str),
    /// A buffer outside guest memory.
    #[error("buffer at {addr:#x} ({len} bytes) is outside guest memory")]
    Memory {
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A frame shorter than the vnet header and an Ethernet header.
    #[error("a {0}-byte frame is shorter than the {HDR_LEN}-byte header and an Ethernet header")]
    TooShort(usize),
    /// A frame longer than any the TAP takes.
    #[error("a {0}-byte frame is longer than the {HDR_LEN}-byte header and {MAX_GSO_FRAME} bytes")]
    TooLong(usize),
    /// More pieces than one system call takes.
    #[error("the chain has more than {MAX_IOVECS} pieces")]
    TooManyPieces,
}

/// The guest memory one or more chains cover, in order.
pub struct Segments<'m> {
    slices: Vec<Slice<'m>>,
    len: usize,
}

impl<'m> Segments<'m> {
    /// No memory yet.
    pub fn empty() -> Self {
        Self {
            slices: Vec::new(),
            len: 0,
        }
    }

    /// Adds the guest memory at `addr`, `len` bytes long (in one or more slices).
    fn push(
        &mut self,
        mem: &'m GuestMemoryMmap,
        addr: vm_memory::GuestAddress,
        len: u32,
    ) -> Result<(), ChainError> {
        let out = ChainError::Memory { addr: addr.0, len };
        for slice in mem.get_slices(addr, len as usize) {
            let slice = slice.map_err(|_| out.clone())?;
            if self.slices.len() == MAX_IOVECS {
                return Err(ChainError::TooManyPieces);
            }
            self.len += slice.len();
            self.slices.push(slice);
        }
        Ok(())
    }

    /// Appends another chain's segments.
    pub fn extend(&mut self, other: Segments<'m>) -> Result<(), ChainError> {
        if self.slices.len() + other.slices.len() > MAX_IOVECS {
            return Err(ChainError::TooManyPieces);
        }
        self.len += other.len;
        self.slices.extend(other.slices);
        Ok(())
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of slices.
    pub fn pieces(&self) -> usize {
        self.slices.len()
    }

    /// I/O vectors over the slices, valid while `self` is.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        self.slices
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            })
            .collect()
    }

    /// Copies bytes from `offset` on into `buf`; returns how many were copied.
    pub fn read_at(&self, mut offset: usize, buf: &mut [u8]) -> usize {
        let mut done = 0;
        for s in &self.slices {
            if done == buf.len() {
                break;
            }
            if offset >= s.len() {
                offset -= s.len();
                continue;
            }
            let n = (s.len() - offset).min(buf.len() - done);
            if s.read_slice(&mut buf[done..done + n], offset).is_err() {
                break;
            }
            done += n;
            offset = 0;
        }
        done
    }

    /// Copies `data` to `offset` on (marking it dirty); returns how many bytes fit.
    pub fn write_at(&self, mut offset: usize, data: &[u8]) -> usize {
        let mut done = 0;
        for s in &self.slices {
            if done == data.len() {
                break;
            }
            if offset >= s.len() {
                offset -= s.len();
                continue;
            }
            let n = (s.len() - offset).min(data.len() - done);
            if s.write_slice(&data[done..done + n], offset).is_err() {
                break;
            }
            done += n;
            offset = 0;
        }
        done
    }

    /// Marks the first `len` bytes dirty: the host kernel wrote them through the I/O vectors,
    /// which the bitmap does not see.
    pub fn mark_written(&self, mut len: usize) {
        for s in &self.slices {
            if len == 0 {
                break;
            }
            let n = len.min(s.len());
            s.bitmap().mark_dirty(0, n);
            len -= n;
        }
    }
}

/// The frame a transmit chain carries: every buffer device-readable, header and frame between
/// [`HDR_LEN`] + [`MIN_FRAME`] and [`HDR_LEN`] + [`MAX_GSO_FRAME`] bytes.
pub fn tx_frame<'m>(
    mem: &'m GuestMemoryMmap,
    chain: Chain<'m>,
) -> Result<Segments<'m>, ChainError> {
    let mut segs = Segments::empty();
    for desc in chain {
        if desc.is_write_only() {
            return Err(ChainError::Direction("device-writable", "transmit"));
        }
        segs.push(mem, desc.addr(), desc.len())?;
        if segs.len() > HDR_LEN + MAX_GSO_FRAME {
            return Err(ChainError::TooLong(segs.len()));
        }
    }
    if segs.len() < HDR_LEN + MIN_FRAME {
        return Err(ChainError::TooShort(segs.len()));
    }
    Ok(segs)
}

/// The room a receive chain offers: every buffer device-writable.
pub fn rx_room<'m>(mem: &'m GuestMemoryMmap, chain: Chain<'m>) -> Result<Segments<'m>, ChainError> {
    let mut segs = Segments::empty();
    for desc in chain {
        if !desc.is_write_only() {
            return Err(ChainError::Direction("device-readable", "receive"));
        }
        segs.push(mem, desc.addr(), desc.len())?;
    }
    Ok(segs)
}

#[cfg(test)]
#[path = "packet_tests.rs"]
mod tests;
