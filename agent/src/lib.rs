//! `kiln-agent`: the program that runs inside every Kiln guest, the protocol it speaks, and the
//! host library that speaks it.
//!
//! - [`protocol`]: the versioned, framed wire format (specified in `agent/PROTOCOL.md`).
//! - [`link`]: the connection machinery both ends share (writer thread, flow control).
//! - [`guest`]: the agent itself: PID 1 duties, the child reaper, exec and file requests.
//! - [`client`]: the host side: connect through Firecracker-style vsock Unix sockets, multiplex
//!   concurrent requests over one connection.
//!
//! This crate calls only `std`, `libc` and serde. The `kiln` CLI and the end-to-end tests call
//! [`client`]; the `kiln-agent` binary calls [`guest`]. Nothing here assumes it runs on the host
//! or in a VM: the whole agent is testable over a Unix socket.

pub mod client;
pub mod guest;
pub mod link;
pub mod protocol;

pub use protocol::AGENT_PORT;
