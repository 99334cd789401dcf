//! virtio-net on a TAP device: one receive and one transmit queue, a 12-byte
//! `virtio_net_hdr_v1` in front of every frame, checksum and TSO offloads in both directions and
//! mergeable receive buffers.
//!
//! The TAP is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte header, so frames
//! move between guest memory and the TAP with one `readv`/`writev` each, no copy in between: the
//! guest's header goes to the host kernel as it is (which checks it), and the host kernel's
//! header lands in the guest's buffer, where the device adds `num_buffers`. The offloads the
//! driver accepted for its own receive path are passed to the TAP with `TUNSETOFFLOAD`.
//!
//! Receiving never reads a frame it cannot place: with mergeable buffers the device reads only
//! once the guest's free buffers can hold the largest frame the TAP may give (so nothing is cut
//! and nothing waits in the device), and otherwise stops watching the TAP until the guest frees
//! buffers, then drains it completely. Frames wait in the TAP's own queue meanwhile.
//!
//! [`tap`] opens the TAP, [`device`] has the features, configuration space and activation,
//! [`packet`] walks the guest's chains into I/O vectors, [`rxtx`] moves frames, [`event_handler`]
//! is the event-loop subscriber, [`hook`] lets a frame responder (MMDS) take frames the guest
//! sends before the TAP does, and [`persist`] is the snapshot state. Each rate limiter
//! ([`crate::rate_limiter`]) gates one direction; each event-loop call moves at most
//! [`RX_BUDGET`] or [`TX_BUDGET`] frames, so one busy queue cannot starve the API.

mod device;
mod event_handler;
pub mod hook;
pub mod packet;
mod persist;
mod rxtx;
pub mod tap;

#[cfg(test)]
#[path = "device_tests.rs"]
mod device_tests;
#[cfg(test)]
mod test_utils;

pub use device::{Net, NetConfig};
pub use hook::FrameHook;
pub use persist::{NetRestoreArgs, NetState};
pub use tap::{Tap, TapError};

/// Index of the receive queue.
pub const RXQ: usize = 0;
/// Index of the transmit queue.
pub const TXQ: usize = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The queue sizes the device offers: rx, tx.
pub const NET_QUEUE_SIZES: &[u16] = &[QUEUE_SIZE; 2];

/// Bytes of `virtio_net_hdr_v1` in front of every frame (virtio 1.x always has `num_buffers`).
pub const HDR_LEN: usize = 12;
/// Where `num_buffers` sits in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// The largest Ethernet frame with segmentation offloads: a 64 KiB IP packet, the Ethernet
/// header and a VLAN tag.
pub const MAX_GSO_FRAME: usize = 65535 + 14 + 4;
/// The largest Ethernet frame without them: a 1500-byte MTU, the Ethernet header and a VLAN tag
/// (Linux's `GOOD_PACKET_LEN`).
pub const MAX_PLAIN_FRAME: usize = 1500 + 14 + 4;
/// The smallest frame worth sending: an Ethernet header.
pub const MIN_FRAME: usize = 14;

/// Frames the receive path moves in one event-loop call before it lets other work run.
pub const RX_BUDGET: usize = 256;
/// Frames the transmit path moves in one event-loop call before it lets other work run.
pub const TX_BUDGET: usize = 256;
/// I/O vectors one frame may use (Linux's `UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// Feature bits the device offers (virtio 1.2, 5.1.3).
pub mod features {
    pub use virtio_bindings::bindings::virtio_net::{
        VIRTIO_NET_F_CSUM as CSUM, VIRTIO_NET_F_GUEST_CSUM as GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4 as GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6 as GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4 as HOST_TSO4, VIRTIO_NET_F_HOST_TSO6 as HOST_TSO6,
        VIRTIO_NET_F_MAC as MAC, VIRTIO_NET_F_MRG_RXBUF as MRG_RXBUF,
        VIRTIO_NET_F_STATUS as STATUS,
    };
}

/// Errors creating or restoring a network device; each names the interface.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP could not be opened or set up.
    #[error("network interface {id}: {err}")]
    Tap {
        /// The interface id.
        id: String,
        /// Why.
        err: TapError,
    },
    /// A rate limiter's configuration is out of range.
    #[error("network interface {id}: {err}")]
    RateLimiter {
        /// The interface id.
        id: String,
        /// Why.
        err: crate::rate_limiter::RateLimiterError,
    },
    /// An eventfd or timerfd could not be created.
    #[error("network interface {id}: cannot create the {what}: {err}")]
    Fd {
        /// The interface id.
        id: String,
        /// Which descriptor.
        what: &'static str,
        /// Why.
        err: std::io::Error,
    },
    /// A saved device cannot be put back.
    #[error("network interface {id}: cannot restore: {why}")]
    Restore {
        /// The interface id.
        id: String,
        /// Why.
        why: String,
    },
}

/// Kinds of guest misbehaviour and host trouble, each logged at `warn` once per device and at
/// `debug` afterwards, so a hostile guest cannot flood the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehaviour {
    /// A transmit chain that is not a frame (writable buffers, too short, too long, outside
    /// guest memory).
    BadTxChain = 0,
    /// A receive chain that cannot take a frame (readable buffers, outside guest memory).
    BadRxChain,
    /// The TAP refused a frame the guest sent (a header the host kernel does not accept).
    TapWrite,
    /// Reading the TAP failed for another reason than having nothing to read.
    TapRead,
    /// `TUNSETOFFLOAD` failed.
    Offload,
}

/// Remembers which [`Misbehaviour`]s were already logged.
#[derive(Debug, Default)]
pub struct LogOnce(u32);

impl LogOnce {
    /// Logs `msg` for interface `id` at `warn` the first time `kind` happens, at `debug` after.
    pub fn warn(&mut self, id: &str, kind: Misbehaviour, msg: std::fmt::Arguments<'_>) {
        let bit = 1u32 << (kind as u32);
        if self.0 & bit == 0 {
            self.0 |= bit;
            log::warn!("virtio-net {id}: {msg} (further ones are logged at debug level)");
        } else {
            log::debug!("virtio-net {id}: {msg}");
        }
    }
}

/// What the device counted since it was created, for tests and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames the guest sent that reached the TAP.
    pub tx_frames: u64,
    /// Their bytes (Ethernet frames, headers excluded).
    pub tx_bytes: u64,
    /// Frames the guest sent that a [`FrameHook`] took.
    pub tx_hooked: u64,
    /// Frames from the guest that were dropped (bad chains, TAP refusals).
    pub tx_dropped: u64,
    /// Frames given to the guest.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames read from the TAP that could not be placed (a guest buffer too small).
    pub rx_dropped: u64,
}

/// Parses a MAC address written `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Writes a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        assert_eq!(
            parse_mac("06:00:AC:10:00:02"),
            Some([6, 0, 0xac, 0x10, 0, 2])
        );
        assert_eq!(format_mac(&[6, 0, 0xac, 0x10, 0, 2]), "06:00:ac:10:00:02");
        for bad in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "6:00:ac:10:00:02",
            "zz:00:ac:10:00:02",
            "06-00-ac-10-00-02",
            "+6:00:ac:10:00:02",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }
}
