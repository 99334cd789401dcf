//! The running half of the protocol that both ends share: a socket handle, a writer thread that
//! owns the sending side ([`Outbox`]), and flow control ([`Window`] for what we send, [`Budget`] for
//! what the peer sends us). Readers never write to the socket themselves, so a reader is never
//! stuck behind a full send buffer and two peers cannot deadlock each other.

mod outbox;
mod socket;
mod window;

pub use outbox::Outbox;
pub use socket::Socket;
pub use window::{Budget, Credit, Window};
