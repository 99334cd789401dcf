//! What the guest put on the queues: tx chains become packets to route, rx chains become buffers
//! to fill. The `virtio-vsock` crate parses and bounds-checks the chains (header in the first
//! descriptor, payload in the same or the next one, each in one piece of guest memory); this file
//! adds the device's own rules (which CIDs, which type, how much payload) and writes the headers
//! of the packets the device sends.

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::{Error as ParseError, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;

use super::{HOST_CID, MAX_PKT_DATA, TYPE_STREAM};
use crate::virtio::GuestMemoryMmap;

/// A packet in guest memory, as the device sees it; its slices carry guest memory's dirty bitmap,
/// so the bytes the device writes (rx headers and payloads) count as dirty for diff snapshots.
/// Tests build packets over plain buffers, which have no bitmap (`B = ()`).
pub type Packet<'a, B = vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>> =
    virtio_vsock::packet::VsockPacket<'a, B>;

/// A descriptor chain from one of the device's queues.
pub type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

/// Parses a chain the guest put on the tx queue. Payloads over [`MAX_PKT_DATA`] are refused.
pub fn parse_tx<'m>(
    mem: &'m GuestMemoryMmap,
    chain: &mut Chain<'m>,
) -> Result<Packet<'m>, ParseError> {
    Packet::from_tx_virtq_chain(mem, chain, MAX_PKT_DATA)
}

/// Parses a buffer the guest put on the rx queue (its header is not read, only written).
pub fn parse_rx<'m>(
    mem: &'m GuestMemoryMmap,
    chain: &mut Chain<'m>,
) -> Result<Packet<'m>, ParseError> {
    Packet::from_rx_virtq_chain(mem, chain, MAX_PKT_DATA)
}

/// Why a well-formed tx packet cannot be routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It claims to come from another CID: dropped, since an answer could not reach the sender.
    WrongSrcCid(u64),
    /// It is for a CID other than the host's: answered with RST (nothing is there).
    WrongDstCid(u64),
    /// It is not a stream packet: answered with RST.
    WrongType(u16),
}

/// Checks the addressing and type of a packet from the guest whose CID is `guest_cid`.
pub fn check_tx<B: BitmapSlice>(pkt: &Packet<'_, B>, guest_cid: u64) -> Result<(), Refusal> {
    if pkt.src_cid() != guest_cid {
        return Err(Refusal::WrongSrcCid(pkt.src_cid()));
    }
    if pkt.dst_cid() != HOST_CID {
        return Err(Refusal::WrongDstCid(pkt.dst_cid()));
    }
    if pkt.type_() != TYPE_STREAM {
        return Err(Refusal::WrongType(pkt.type_()));
    }
    Ok(())
}

/// The fields of a packet the device sends to the guest (from the host CID to the guest's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// The host side's port.
    pub src_port: u32,
    /// The guest side's port.
    pub dst_port: u32,
    /// Operation (`op::*`).
    pub op: u16,
    /// SHUTDOWN flags, else 0.
    pub flags: u32,
    /// Payload bytes (already in the packet's data slice).
    pub len: u32,
    /// The device's receive buffer for this connection.
    pub buf_alloc: u32,
    /// Bytes of this connection the device has forwarded to the host.
    pub fwd_cnt: u32,
}

/// Writes every header field of `pkt` (the guest's buffer holds whatever it held before).
pub fn write_header<B: BitmapSlice>(pkt: &mut Packet<'_, B>, guest_cid: u64, h: &Header) {
    pkt.set_src_cid(HOST_CID)
        .set_dst_cid(guest_cid)
        .set_src_port(h.src_port)
        .set_dst_port(h.dst_port)
        .set_len(h.len)
        .set_type(TYPE_STREAM)
        .set_op(h.op)
        .set_flags(h.flags)
        .set_buf_alloc(h.buf_alloc)
        .set_fwd_cnt(h.fwd_cnt);
}

/// Payload bytes an rx buffer can take, capped at [`MAX_PKT_DATA`].
pub fn rx_capacity<B: BitmapSlice>(pkt: &Packet<'_, B>) -> usize {
    pkt.data_slice()
        .map_or(0, |s| s.len())
        .min(MAX_PKT_DATA as usize)
}

/// Bytes the device wrote into an rx buffer holding a packet with `len` payload bytes.
pub fn used_len(len: u32) -> u32 {
    PKT_HEADER_SIZE as u32 + len
}

#[cfg(test)]
#[path = "packet_tests.rs"]
mod tests;
