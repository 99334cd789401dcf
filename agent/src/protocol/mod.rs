//! The wire protocol between a Kiln host and the in-guest agent, version [`PROTOCOL_VERSION`].
//!
//! `agent/PROTOCOL.md` is the specification; this module is its single implementation, shared by
//! the agent and the host client. [`frame`] cuts the byte stream into length-prefixed frames with a
//! hard size limit; [`message`] gives each frame its typed meaning; [`restore`] holds the body of
//! the post-restore request and its rules. Nothing here does I/O beyond reading and writing one
//! frame, and nothing here trusts its input.

pub mod frame;
pub mod message;
pub mod ops;
pub mod restore;
pub mod shapes;

pub use frame::{FrameError, RawFrame, read_frame};
pub use message::{
    DecodeError, DirEntry, ErrorInfo, ErrorKind, Event, ExecSpec, ExitStatus, FileKind, FileStat,
    Hello, Message, Request, Stream, TtySize,
};
pub use ops::{MkdirSpec, PROTOCOL_REVISION, ProcessInfo, Selector, UserInfo};
pub use restore::{Restore, RestoreSpec, RestoreSpecError};

/// The protocol version both ends announce in their hello; a mismatch ends the connection.
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the agent listens on inside the guest.
pub const AGENT_PORT: u32 = 1024;

/// The largest frame accepted, counted from the kind byte to the end of the payload. Anything
/// longer is a protocol error that closes the connection; nothing is allocated for it.
pub const MAX_FRAME_LEN: u32 = 1 << 20;

/// The largest data payload a sender puts in one frame.
pub const MAX_CHUNK: usize = 64 * 1024;

/// The credit each data stream starts with, in bytes: a sender may have this much data that the
/// receiver has not yet acknowledged with a credit frame.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
