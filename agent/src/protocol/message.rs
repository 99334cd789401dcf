//! What frames mean: the hello, requests, events, data, end-of-stream and credit frames, and the
//! JSON bodies of the first three. Decoding turns any malformed frame into a [`DecodeError`] that
//! names the request it belongs to, so the receiver can answer that request and carry on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::frame::{RawFrame, encode_frame};
use super::ops::{MkdirSpec, ProcessInfo, Selector, UserInfo};
use super::restore::RestoreSpec;
pub use super::shapes::{DirEntry, ExitStatus, FileKind, FileStat};

/// Frame kind: the first frame each side sends, with a JSON [`Hello`].
pub const KIND_HELLO: u8 = 1;
/// Frame kind: a JSON [`Request`] from the host, starting request `id`.
pub const KIND_REQUEST: u8 = 2;
/// Frame kind: a JSON [`Event`] from the agent about request `id`.
pub const KIND_EVENT: u8 = 3;
/// Frame kind: `u8 stream | bytes`, data on one stream of request `id`.
pub const KIND_DATA: u8 = 4;
/// Frame kind: `u8 stream`, the sender will send no more data on that stream.
pub const KIND_EOF: u8 = 5;
/// Frame kind: `u8 stream | u32 LE bytes`, the receiver consumed that much data on the stream.
pub const KIND_CREDIT: u8 = 6;

/// A data stream of a request. Each flows one way: stdin and file data being written go to the
/// agent; stdout, stderr and file data being read come from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Stream {
    /// An exec's standard input (host to agent).
    Stdin = 0,
    /// An exec's standard output, or a tty's output (agent to host).
    Stdout = 1,
    /// An exec's standard error (agent to host).
    Stderr = 2,
    /// File contents: host to agent for a write, agent to host for a read.
    File = 3,
}

impl Stream {
    /// All streams, indexed by their wire value.
    pub const ALL: [Stream; 4] = [Stream::Stdin, Stream::Stdout, Stream::Stderr, Stream::File];

    fn from_wire(b: u8) -> Option<Stream> {
        Stream::ALL.get(b as usize).copied()
    }
}

/// The first frame of each side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's [`super::PROTOCOL_VERSION`].
    pub version: u32,
    /// Free text naming the sender's software and version, for logs.
    #[serde(default)]
    pub software: String,
    /// The sender's [`super::PROTOCOL_REVISION`]; absent (0) from senders older than revision 2.
    #[serde(default)]
    pub revision: u32,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// What to run and how.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// Program and arguments; the program is looked up on `PATH` unless it contains a `/`.
    pub argv: Vec<String>,
    /// Variables added to (or replacing) the default environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// `name`, `uid`, `name:group` or `uid:gid` (default: the agent's own user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Run on a new pseudo-terminal of this size; stdout then carries the terminal's output and
    /// stderr stays empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
    /// Kill the process group this many milliseconds after the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Whether the host will send stdin; without it the process reads `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// A name to find the process by (`attach`, `signal_process`, ...); unique among running
    /// processes. Revision 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The process outlives this request: cancelling it or closing the connection detaches
    /// instead of killing, and its output is kept (within bounds) for a later `attach`.
    /// Revision 2.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep: bool,
}

impl ExecSpec {
    /// A spec running `argv` with everything else defaulted.
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> ExecSpec {
        ExecSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            ..ExecSpec::default()
        }
    }
}

fn yes() -> bool {
    true
}

/// A request from the host. The JSON carries the operation in `"op"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Answered with [`Event::Pong`].
    Ping,
    /// Run a process: [`Event::Started`], data on stdout/stderr, then [`Event::Exit`]; or an
    /// [`Event::Error`] of kind [`ErrorKind::CouldNotStart`].
    Exec(ExecSpec),
    /// Send `signal` to the process group of the running exec `target`.
    Signal {
        /// The exec's request id.
        target: u64,
        /// Signal number.
        signal: i32,
    },
    /// Change the terminal size of the running tty exec `target`.
    Resize {
        /// The exec's request id.
        target: u64,
        /// The new size.
        size: TtySize,
    },
    /// Abandon request `target`: an exec's process group is killed, a transfer stops.
    Cancel {
        /// The request id.
        target: u64,
    },
    /// Write a file from the data that follows on [`Stream::File`], ended by an EOF frame.
    WriteFile {
        /// Absolute path.
        path: String,
        /// Permission bits (default 0o644 for a new file).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
        /// Create missing parent directories (default true).
        #[serde(default = "yes")]
        parents: bool,
        /// Append instead of truncating.
        #[serde(default)]
        append: bool,
        /// Who owns the file and the directories made for it (`name`, `uid`, `name:group`,
        /// `uid:gid`); the agent's user when absent. Revision 2.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    /// Read a file: [`Event::Opened`], data on [`Stream::File`], then [`Event::Done`].
    ReadFile {
        /// Absolute path.
        path: String,
    },
    /// List a directory: [`Event::Entries`] batches, then [`Event::Done`].
    ListDir {
        /// Absolute path.
        path: String,
    },
    /// Describe a path, following symlinks: [`Event::Stat`].
    Stat {
        /// Absolute path.
        path: String,
    },
    /// Remove a file, symlink or directory.
    Remove {
        /// Absolute path.
        path: String,
        /// Remove a non-empty directory and everything in it.
        #[serde(default)]
        recursive: bool,
    },
    /// Acknowledge with [`Event::Done`], then stop every process, sync, unmount and reset the VM.
    Shutdown,
    /// After a snapshot restore: mix in host entropy and reseed the kernel RNG, step the clock,
    /// set the default environment. [`Event::Restored`], or an error naming the failed step.
    Restored(RestoreSpec),
    /// Follow a running process from any connection: [`Event::Started`], its output (first what
    /// was kept while nobody followed it), then [`Event::Exit`]. Cancelling only stops following.
    /// Revision 2.
    Attach {
        /// Which process.
        process: Selector,
    },
    /// List the running processes: [`Event::Processes`]. Revision 2.
    Processes,
    /// Send `signal` to a running process's group. Revision 2.
    SignalProcess {
        /// Which process.
        process: Selector,
        /// Signal number.
        signal: i32,
    },
    /// Write the data that follows on [`Stream::Stdin`] (ended by an EOF frame) to a running
    /// process's stdin: [`Event::Done`] with the bytes written. Revision 2.
    WriteStdin {
        /// Which process.
        process: Selector,
    },
    /// Close a running process's stdin (on a terminal: send ^D). Revision 2.
    CloseStdin {
        /// Which process.
        process: Selector,
    },
    /// Make a directory. Revision 2.
    Mkdir(MkdirSpec),
    /// Rename a path, making the destination's missing parents. Revision 2.
    Rename {
        /// Absolute source path.
        from: String,
        /// Absolute destination path.
        to: String,
    },
    /// Resolve a user of the guest: [`Event::User`]. Revision 2.
    ResolveUser {
        /// `name`, `uid`, `name:group` or `uid:gid`.
        user: String,
    },
}

/// The `"op"` names this version understands; any other is [`ErrorKind::UnknownRequest`].
pub const KNOWN_OPS: &[&str] = &[
    "ping",
    "exec",
    "signal",
    "resize",
    "cancel",
    "write_file",
    "read_file",
    "list_dir",
    "stat",
    "remove",
    "shutdown",
    "restored",
    "attach",
    "processes",
    "signal_process",
    "write_stdin",
    "close_stdin",
    "mkdir",
    "rename",
    "resolve_user",
];

/// The class of a failure, for programs; the message is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Malformed framing or a frame that makes no sense here.
    Protocol,
    /// The two sides speak different protocol versions.
    VersionMismatch,
    /// A request whose body could not be parsed or whose values are invalid.
    BadRequest,
    /// A request `"op"` this agent does not know.
    UnknownRequest,
    /// A request id that is 0 or already in use, or a target that is not running.
    NoSuchRequest,
    /// Too many requests at once on this connection.
    Busy,
    /// The process could not be started (program, directory or user problem).
    CouldNotStart,
    /// The path does not exist.
    NotFound,
    /// Permission denied.
    PermissionDenied,
    /// The path exists already.
    AlreadyExists,
    /// A directory where a file was expected.
    IsADirectory,
    /// A file where a directory was expected.
    NotADirectory,
    /// The directory is not empty.
    DirectoryNotEmpty,
    /// The request was cancelled.
    Cancelled,
    /// Any other I/O failure.
    Io,
    /// A kind this side does not know (sent by a newer peer).
    #[serde(other)]
    Other,
}

/// A failure report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Its class.
    pub kind: ErrorKind,
    /// What failed, naming the value.
    pub message: String,
    /// The errno behind it, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
}

impl ErrorInfo {
    /// An error without an errno.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ErrorInfo {
        ErrorInfo {
            kind,
            message: message.into(),
            errno: None,
        }
    }
}

/// Something the agent reports about a request. The JSON carries its name in `"event"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Answer to [`Request::Ping`].
    Pong {
        /// The agent's software version.
        agent: String,
    },
    /// The exec's process is running.
    Started {
        /// Its pid inside the guest.
        pid: u32,
    },
    /// The exec is over; all its output was sent before this. Final.
    Exit {
        /// How it ended.
        status: ExitStatus,
    },
    /// A file read is starting.
    Opened {
        /// The file's size when opened.
        size: u64,
    },
    /// Some entries of a listing.
    Entries {
        /// The entries.
        entries: Vec<DirEntry>,
    },
    /// Answer to [`Request::Stat`]. Final.
    Stat {
        /// The metadata.
        stat: FileStat,
    },
    /// The request succeeded. Final.
    Done {
        /// Bytes transferred, for file reads and writes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
    },
    /// Answer to [`Request::Processes`]. Final.
    Processes {
        /// The running processes.
        processes: Vec<ProcessInfo>,
    },
    /// Answer to [`Request::ResolveUser`]. Final.
    User {
        /// The user.
        user: UserInfo,
    },
    /// Answer to [`Request::Restored`]: every step was done. Final.
    Restored {
        /// How far `CLOCK_REALTIME` was stepped, in nanoseconds (negative: backwards).
        clock_step_ns: i64,
        /// How many bytes of entropy were mixed in (and credited).
        entropy_bytes: u32,
    },
    /// The request failed. Final. On request id 0 it concerns the whole connection, which the
    /// agent closes after sending it.
    Error(ErrorInfo),
}

impl Event {
    /// Whether this event ends its request.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Event::Pong { .. }
                | Event::Exit { .. }
                | Event::Stat { .. }
                | Event::Done { .. }
                | Event::Restored { .. }
                | Event::Processes { .. }
                | Event::User { .. }
                | Event::Error(_)
        )
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The opening frame.
    Hello(Hello),
    /// A new request with its id.
    Request(u64, Request),
    /// An event about a request.
    Event(u64, Event),
    /// Data on a stream of a request.
    Data(u64, Stream, Vec<u8>),
    /// End of a stream.
    Eof(u64, Stream),
    /// Credit returned for a stream.
    Credit(u64, Stream, u32),
}

/// A frame that is well framed but means nothing valid. Each names the request id it came with,
/// so the receiver can fail that request alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The kind byte is not one of this version's.
    #[error("request {id}: unknown frame kind {kind}")]
    UnknownKind {
        /// Request id.
        id: u64,
        /// The kind byte.
        kind: u8,
    },
    /// The stream byte is not one of this version's.
    #[error("request {id}: unknown stream {stream}")]
    UnknownStream {
        /// Request id.
        id: u64,
        /// The stream byte.
        stream: u8,
    },
    /// A fixed-size payload has the wrong length.
    #[error("request {id}: {what} frame payload is {len} bytes")]
    BadLength {
        /// Request id.
        id: u64,
        /// Which frame.
        what: &'static str,
        /// The payload length.
        len: usize,
    },
    /// A JSON body that does not parse (including bad UTF-8).
    #[error("request {id}: bad {what}: {message}")]
    BadJson {
        /// Request id.
        id: u64,
        /// Which body.
        what: &'static str,
        /// The parser's complaint.
        message: String,
    },
    /// A request with an `"op"` this version does not know.
    #[error("request {id}: unknown request type {op:?}")]
    UnknownRequest {
        /// Request id.
        id: u64,
        /// The op name.
        op: String,
    },
}

impl DecodeError {
    /// The request id the bad frame carried.
    pub fn id(&self) -> u64 {
        match self {
            DecodeError::UnknownKind { id, .. }
            | DecodeError::UnknownStream { id, .. }
            | DecodeError::BadLength { id, .. }
            | DecodeError::BadJson { id, .. }
            | DecodeError::UnknownRequest { id, .. } => *id,
        }
    }

    /// The error kind to answer with.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DecodeError::UnknownRequest { .. } => ErrorKind::UnknownRequest,
            DecodeError::BadJson { .. } => ErrorKind::BadRequest,
            _ => ErrorKind::Protocol,
        }
    }
}

fn json<'a, T: Deserialize<'a>>(
    id: u64,
    what: &'static str,
    bytes: &'a [u8],
) -> Result<T, DecodeError> {
    serde_json::from_slice(bytes).map_err(|e| DecodeError::BadJson {
        id,
        what,
        message: e.to_string(),
    })
}

fn request(id: u64, bytes: &[u8]) -> Result<Request, DecodeError> {
    #[derive(Deserialize)]
    struct OpOnly {
        op: String,
    }
    json(id, "request", bytes).map_err(|err| match serde_json::from_slice::<OpOnly>(bytes) {
        Ok(OpOnly { op }) if !KNOWN_OPS.contains(&op.as_str()) => {
            DecodeError::UnknownRequest { id, op }
        }
        _ => err,
    })
}

fn stream(id: u64, payload: &[u8]) -> Result<Stream, DecodeError> {
    let b = *payload.first().ok_or(DecodeError::BadLength {
        id,
        what: "stream",
        len: 0,
    })?;
    Stream::from_wire(b).ok_or(DecodeError::UnknownStream { id, stream: b })
}

impl Message {
    /// Gives a raw frame its meaning.
    pub fn decode(raw: RawFrame) -> Result<Message, DecodeError> {
        let RawFrame { kind, id, payload } = raw;
        Ok(match kind {
            KIND_HELLO => Message::Hello(json(id, "hello", &payload)?),
            KIND_REQUEST => Message::Request(id, request(id, &payload)?),
            KIND_EVENT => Message::Event(id, json(id, "event", &payload)?),
            KIND_DATA => {
                let s = stream(id, &payload)?;
                let mut data = payload;
                data.remove(0);
                Message::Data(id, s, data)
            }
            KIND_EOF if payload.len() == 1 => Message::Eof(id, stream(id, &payload)?),
            KIND_CREDIT if payload.len() == 5 => {
                let s = stream(id, &payload)?;
                let n = u32::from_le_bytes([payload[1], payload[2], payload[3], payload[4]]);
                Message::Credit(id, s, n)
            }
            KIND_EOF | KIND_CREDIT => {
                return Err(DecodeError::BadLength {
                    id,
                    what: if kind == KIND_EOF { "eof" } else { "credit" },
                    len: payload.len(),
                });
            }
            kind => return Err(DecodeError::UnknownKind { id, kind }),
        })
    }

    /// The frame bytes for this message.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Message::Hello(h) => encode_json(KIND_HELLO, 0, h),
            Message::Request(id, r) => encode_json(KIND_REQUEST, *id, r),
            Message::Event(id, e) => encode_json(KIND_EVENT, *id, e),
            Message::Data(id, s, d) => encode_data(*id, *s, d),
            Message::Eof(id, s) => encode_frame(KIND_EOF, *id, &[&[*s as u8]]),
            Message::Credit(id, s, n) => {
                encode_frame(KIND_CREDIT, *id, &[&[*s as u8], &n.to_le_bytes()])
            }
        }
    }
}

/// A data frame, without first copying `data` into a [`Message`].
pub fn encode_data(id: u64, stream: Stream, data: &[u8]) -> Vec<u8> {
    encode_frame(KIND_DATA, id, &[&[stream as u8], data])
}

fn encode_json(kind: u8, id: u64, value: &impl Serialize) -> Vec<u8> {
    // Serializing these plain types cannot fail.
    let body = serde_json::to_vec(value).unwrap_or_default();
    encode_frame(kind, id, &[&body])
}

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;
