//! Frames the device answers itself instead of the TAP: the attachment point for a responder on
//! the transmit path, such as Firecracker's MMDS (a metadata service the guest reaches at
//! 169.254.169.254 without any host networking).
//!
//! The transmit path shows each frame's first bytes (Ethernet, IP and transport headers) to the
//! hook; a frame it claims is copied out of guest memory and handed to it instead of being
//! written to the TAP. The receive path gives the guest the hook's own frames (its answers)
//! before any frame from the TAP. [`frame_targets_ipv4`] is the test an MMDS hook needs: ARP
//! requests for its address and IPv4 packets to it.

/// How many leading bytes of a frame [`FrameHook::claims`] is shown: the Ethernet header, a
/// 20-byte IPv4 header and the first 20 bytes of the transport header (or an ARP packet).
pub const HEAD_LEN: usize = 14 + 20 + 20;

/// A responder that takes some of the guest's frames and answers with frames of its own.
pub trait FrameHook: Send {
    /// Whether the frame whose first bytes (at most [`HEAD_LEN`], fewer for a short frame) are
    /// `head` is for the hook rather than the TAP. Called for every frame the guest sends: keep
    /// it cheap.
    fn claims(&self, head: &[u8]) -> bool;
    /// A frame the hook claimed, whole (the Ethernet frame, without the virtio header).
    fn guest_frame(&mut self, frame: &[u8]);
    /// Whether the hook has a frame for the guest.
    fn has_frame_for_guest(&self) -> bool;
    /// Writes the hook's next frame for the guest (an Ethernet frame, no virtio header) into
    /// `buf` and returns its length; `None` when there is none. A frame longer than `buf` is
    /// the hook's to drop or cut.
    fn frame_for_guest(&mut self, buf: &mut [u8]) -> Option<usize>;
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;

/// True when `head` (a frame's first bytes) is an ARP request asking for `addr`, or an IPv4
/// packet to `addr`.
pub fn frame_targets_ipv4(head: &[u8], addr: [u8; 4]) -> bool {
    let Some(ethertype) = head.get(12..14) else {
        return false;
    };
    match u16::from_be_bytes([ethertype[0], ethertype[1]]) {
        // ARP for IPv4 over Ethernet: the target protocol address is at offset 24 of the packet.
        ETHERTYPE_ARP => head.get(14 + 24..14 + 28) == Some(&addr[..]),
        // The IPv4 destination is at offset 16 of the IP header.
        ETHERTYPE_IPV4 => head.get(14 + 16..14 + 20) == Some(&addr[..]),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn arp_and_ipv4_to_the_address_are_recognised() {
        let mmds = [169, 254, 169, 254];
        let mut arp = vec![0u8; 28];
        arp[24..28].copy_from_slice(&mmds);
        assert!(frame_targets_ipv4(&frame(ETHERTYPE_ARP, &arp), mmds));
        arp[24..28].copy_from_slice(&[10, 0, 0, 1]);
        assert!(!frame_targets_ipv4(&frame(ETHERTYPE_ARP, &arp), mmds));

        let mut ip = vec![0x45u8; 20];
        ip[16..20].copy_from_slice(&mmds);
        assert!(frame_targets_ipv4(&frame(ETHERTYPE_IPV4, &ip), mmds));
        ip[16..20].copy_from_slice(&[1, 1, 1, 1]);
        assert!(!frame_targets_ipv4(&frame(ETHERTYPE_IPV4, &ip), mmds));

        // Truncated frames and other protocols are not the hook's.
        assert!(!frame_targets_ipv4(
            &frame(ETHERTYPE_IPV4, &[0x45; 10]),
            mmds
        ));
        assert!(!frame_targets_ipv4(&[0; 5], mmds));
        assert!(!frame_targets_ipv4(&frame(0x86dd, &[0; 40]), mmds));
    }
}
