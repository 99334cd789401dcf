//! virtio-vsock with Firecracker's host-side protocol: guest stream sockets reach Unix sockets on
//! the host.
//!
//! The device listens on a Unix socket at `uds_path`. A host process that connects there and
//! writes `CONNECT <port>\n` gets a connection to the guest's `port` (answered `OK <host_port>\n`
//! once the guest accepts it); a guest that connects to the host (CID 2) on port `P` reaches
//! whatever listens on `<uds_path>_<P>`. [`muxer::Muxer`] keeps the connection table and routes
//! packets; [`connection::Connection`] is one connection's state machine and credit accounting;
//! [`packet`] checks what the guest put on the queues (with the `virtio-vsock` crate's packet
//! type). Nothing is buffered without bound: a connection holds at most [`CONN_BUF_SIZE`] bytes
//! the host has not read yet, and host bytes are read only into the guest's own rx buffers.

pub mod connection;
mod device;
mod event_handler;
mod host_socket;
pub mod muxer;
pub mod packet;
mod persist;

#[cfg(test)]
mod test_utils;

use std::path::PathBuf;
use std::time::Duration;

pub use device::Vsock;
pub use persist::{VsockRestoreArgs, VsockState};

/// Index of the queue on which the device gives packets to the guest.
pub const RXQ: usize = 0;
/// Index of the queue on which the guest sends packets.
pub const TXQ: usize = 1;
/// Index of the event queue (transport reset).
pub const EVQ: usize = 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The queue sizes the device offers: rx, tx, event.
pub const VSOCK_QUEUE_SIZES: &[u16] = &[QUEUE_SIZE; 3];

/// The host's context id: what a guest connects to.
pub const HOST_CID: u64 = 2;
/// The lowest context id a guest may have (0, 1 and 2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;

/// The largest payload the device accepts in one packet from the guest (Linux sends at most
/// 64 KiB) and puts into one packet for the guest.
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// Bytes of guest data a connection holds for a host reader that is slower than the guest; this
/// is the `buf_alloc` the device advertises, so a guest that respects credit never exceeds it.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// The device tells the guest about consumed bytes (CREDIT_UPDATE) once this many were forwarded
/// since it last told it.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;
/// Host-initiated connections (including host sockets still sending their CONNECT line) the
/// device keeps at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Guest-initiated connections the device keeps at once, counted apart from the host's, so a
/// guest opening connections to host listeners can neither pin much host memory nor crowd out
/// the host's connections to its agent.
pub const MAX_GUEST_CONNECTIONS: usize = 64;
/// The buffer (`buf_alloc`) a guest-initiated connection gets for data its host reader has not
/// taken yet. Guest-initiated connections together hold at most
/// `MAX_GUEST_CONNECTIONS * GUEST_CONN_BUF_SIZE` (4 MiB).
pub const GUEST_CONN_BUF_SIZE: u32 = 64 * 1024;
/// RST packets waiting for an rx buffer; more are dropped (the guest times those connections out).
pub const MAX_PENDING_RST: usize = 2 * MAX_CONNECTIONS;
/// Chains one pass over a queue handles at most before the handler yields to the event loop.
pub const CHAINS_PER_PASS: usize = 64;
/// Payload bytes one pass over a queue moves at most.
pub const BYTES_PER_PASS: u64 = 4 << 20;
/// The longest `CONNECT <port>\n` line accepted, newline included.
pub const CONNECT_LINE_MAX: usize = 32;
/// How long a host socket may take to send its CONNECT line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the guest may take to answer a host-initiated REQUEST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closing connection may take to finish (flush to the host, or the guest's RST).
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Host-initiated connections get local ports from here up (guest-initiated ones use the port
/// the guest asked for).
pub const FIRST_HOST_PORT: u32 = 1 << 30;

/// Packet operations (virtio 1.2, 5.10.6).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (refused, or torn down).
    pub const RST: u16 = 3;
    /// The sender will not send and/or receive any more.
    pub const SHUTDOWN: u16 = 4;
    /// Payload.
    pub const RW: u16 = 5;
    /// The sender's receive credit (unsolicited or answering CREDIT_REQUEST).
    pub const CREDIT_UPDATE: u16 = 6;
    /// The sender asks for the receiver's credit.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
    /// Both.
    pub const BOTH: u32 = RCV | SEND;
}

/// The only socket type the device supports (no SEQPACKET feature is offered).
pub const TYPE_STREAM: u16 = 1;
/// The event-queue event id of a transport reset.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved (0 to 2, or VMADDR_CID_ANY) or does not fit in 32 bits.
    #[error("guest CID {0} is reserved or out of range; a guest CID is from 3 to 4294967294")]
    ReservedCid(u64),
    /// The listening socket cannot be created.
    #[error("cannot listen on vsock socket {path}: {err}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// An eventfd or timerfd could not be created.
    #[error("vsock {path}: cannot create the {what}: {err}")]
    Fd {
        /// The device's socket path.
        path: PathBuf,
        /// Which descriptor.
        what: &'static str,
        /// Why.
        err: std::io::Error,
    },
    /// A saved device cannot be put back.
    #[error("vsock {path}: cannot restore: {why}")]
    Restore {
        /// The device's socket path.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// Kinds of guest misbehaviour, each logged at `warn` once per device and at `debug` afterwards,
/// so a hostile guest cannot flood the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehaviour {
    /// A tx chain the packet parser refused.
    BadTxChain = 0,
    /// An rx chain the packet parser refused.
    BadRxChain,
    /// A packet whose source CID is not the guest's.
    WrongSrcCid,
    /// A packet for a CID other than the host's.
    WrongDstCid,
    /// A packet of an unsupported socket type.
    WrongType,
    /// An unknown operation, or one not allowed in the connection's state.
    BadOp,
    /// Data beyond the credit the device advertised.
    CreditOverrun,
    /// An event-queue buffer too small for an event.
    BadEventChain,
    /// The rings or a chain broken (a lying avail index, INDIRECT, a loop): needs reset.
    BrokenQueue,
}

/// Remembers which [`Misbehaviour`]s were already logged.
#[derive(Debug, Default)]
pub struct LogOnce(crate::virtio::LogOnce);

impl LogOnce {
    /// Logs `msg` at `warn` the first time `kind` happens, at `debug` after that.
    pub fn warn(&mut self, kind: Misbehaviour, msg: std::fmt::Arguments<'_>) {
        self.0.warn(kind as u32, "virtio-vsock", msg);
    }
}
