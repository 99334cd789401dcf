//! The host side: connect to an agent (through a Firecracker-style vsock Unix socket, or a plain
//! Unix socket in tests), then run any number of requests at once over that one connection from
//! any number of threads. [`Client`] is cheap to clone; every clone shares the connection.
//!
//! The agent runs inside an untrusted guest: nothing it sends can make this side panic or buffer
//! without bound (see `conn.rs`), and no call waits on it without a deadline, except those whose
//! name says they wait for a process as long as it runs ([`Exec::next_output`], [`Exec::output`]
//! on an exec without a timeout).

mod conn;
mod connect;
mod exec;
mod files;
mod procs;
mod restore;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use conn::{MAX_QUEUED_EVENT_BYTES, MAX_QUEUED_EVENTS};
pub use connect::{HANDSHAKE_TIMEOUT, connect_unix, connect_vsock, from_socket, wait_ready};
pub use exec::{
    Exec, ExecControl, ExecOutput, ExecStdin, MAX_COLLECTED_STDERR, MAX_COLLECTED_STDOUT, Output,
    REPORT_GRACE, collect_capped,
};
pub use files::{MAX_LIST_ENTRIES, WriteOptions};
pub use restore::{
    RESTORE_ENTROPY, Restored, RestoredExec, host_entropy, restore_and_exec, restore_connect,
};

use crate::protocol::{ErrorInfo, ErrorKind, Event, Request};
use conn::{Conn, Inbound};

/// How long simple requests (ping, stat, signal, ...) wait for their answer by default.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// What can go wrong talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Unix socket could not be connected.
    #[error("connecting to {}: {source}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The vsock Unix socket did not accept `CONNECT <port>`.
    #[error("{} answered {reply:?} to \"CONNECT {port}\" (expected \"OK <port>\")", path.display())]
    ConnectRefused {
        /// The socket path.
        path: PathBuf,
        /// The guest port asked for.
        port: u32,
        /// What came back (possibly empty).
        reply: String,
    },
    /// The agent speaks another protocol version.
    #[error("the agent speaks protocol version {agent}, this host speaks {host}")]
    VersionMismatch {
        /// Ours.
        host: u32,
        /// The agent's.
        agent: u32,
    },
    /// The agent sent something that breaks the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection is gone.
    #[error("connection to the agent lost: {0}")]
    Closed(String),
    /// The process could not be started (bad program, directory or user).
    #[error("{message}")]
    CouldNotStart {
        /// The agent's explanation, naming the program.
        message: String,
        /// The errno, when there is one (ENOENT, EACCES, ...).
        errno: Option<i32>,
    },
    /// The agent reported a failure.
    #[error("agent: {message}")]
    Agent {
        /// Its class.
        kind: ErrorKind,
        /// The agent's explanation.
        message: String,
        /// The errno, when there is one.
        errno: Option<i32>,
    },
    /// No answer in time.
    #[error("no answer from the agent within {0:?}")]
    Timeout(Duration),
    /// The agent sent more than this side collects.
    #[error("{what} is larger than the {limit} this client collects")]
    TooLarge {
        /// What was being collected.
        what: String,
        /// The limit, with its unit.
        limit: String,
    },
    /// `wait_ready` gave up.
    #[error("no agent answered on {} within {waited:?}; last attempt: {last}", path.display())]
    NotReady {
        /// The socket path.
        path: PathBuf,
        /// How long it tried.
        waited: Duration,
        /// The last attempt's error.
        last: Box<Error>,
    },
    /// A local reader or writer failed.
    #[error("{what}: {source}")]
    Local {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
}

impl From<ErrorInfo> for Error {
    fn from(info: ErrorInfo) -> Error {
        match info.kind {
            ErrorKind::CouldNotStart => Error::CouldNotStart {
                message: info.message,
                errno: info.errno,
            },
            kind => Error::Agent {
                kind,
                message: info.message,
                errno: info.errno,
            },
        }
    }
}

/// A connection to an agent.
#[derive(Clone)]
pub struct Client {
    conn: Arc<Conn>,
    reply_timeout: Duration,
}

fn unexpected(what: &str, got: &Inbound) -> Error {
    let got = match got {
        Inbound::Event(e) => format!("{e:?}"),
        Inbound::Data(s, b) => format!("{} bytes of {s:?}", b.len()),
        Inbound::Eof(s) => format!("end of {s:?}"),
        Inbound::Closed(r) => format!("closed: {r}"),
    };
    Error::Protocol(format!("{what}: unexpected {got}"))
}

impl Client {
    fn new(conn: Arc<Conn>) -> Client {
        Client {
            conn,
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
        }
    }

    /// This client with another timeout for simple requests.
    pub fn with_reply_timeout(mut self, timeout: Duration) -> Client {
        self.reply_timeout = timeout;
        self
    }

    /// Sends `request` and waits for its final event; an error event becomes `Err`.
    fn call(&self, request: Request) -> Result<Event, Error> {
        let what = format!("{request:?}");
        let mut req = self.conn.start_request(request)?;
        let deadline = Instant::now() + self.reply_timeout;
        match req.recv(Some(deadline)) {
            Ok(Inbound::Event(Event::Error(info))) => Err(info.into()),
            Ok(Inbound::Event(e)) if e.is_final() => Ok(e),
            Ok(other) => Err(unexpected(&what, &other)),
            Err(Error::Timeout(_)) => {
                req.abandon();
                Err(Error::Timeout(self.reply_timeout))
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the connection ended: every request on it fails, and a new connection is needed
    /// (a snapshot's vsock transport reset ends every connection into the guest, for one).
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// Round trip; returns the agent's software version.
    pub fn ping(&self) -> Result<String, Error> {
        match self.call(Request::Ping)? {
            Event::Pong { agent } => Ok(agent),
            other => Err(Error::Protocol(format!("ping answered with {other:?}"))),
        }
    }

    /// Asks the agent to stop every process, sync, unmount and reset the VM. The connection
    /// closing before the acknowledgement counts as success: the VM is going down.
    pub fn shutdown(&self) -> Result<(), Error> {
        match self.call(Request::Shutdown) {
            Ok(_) | Err(Error::Closed(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
