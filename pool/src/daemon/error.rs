//! What the daemon's operations fail with, each mapped to the HTTP status a client acts on.

use crate::db::DbError;
use crate::template::build::BuildError;
use crate::vm::VmError;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The named thing does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed or breaks a rule (400).
    #[error("{0}")]
    BadRequest(String),
    /// The thing is in the wrong state for it (409): a paused sandbox asked to exec, say.
    #[error("{0}")]
    Conflict(String),
    /// A host or pool limit would be exceeded (429); nothing was started.
    #[error("{0}")]
    Limit(String),
    /// The guest refused (permission, not a directory, ...): its kind decides the status.
    #[error("{message}")]
    Guest {
        /// The agent's error kind.
        kind: kiln_agent::protocol::ErrorKind,
        /// Its message.
        message: String,
    },
    /// A VM failed under the request (500); the sandbox may be gone.
    #[error("{0}")]
    Vm(String),
    /// The daemon's own failure (500).
    #[error("{0}")]
    Internal(String),
}

impl DaemonError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        use kiln_agent::protocol::ErrorKind as K;
        match self {
            DaemonError::NotFound(_) => 404,
            DaemonError::BadRequest(_) => 400,
            DaemonError::Conflict(_) => 409,
            DaemonError::Limit(_) => 429,
            DaemonError::Guest { kind, .. } => match kind {
                K::NotFound => 404,
                K::PermissionDenied => 403,
                K::AlreadyExists => 409,
                K::BadRequest
                | K::IsADirectory
                | K::NotADirectory
                | K::DirectoryNotEmpty
                | K::CouldNotStart => 400,
                K::Busy => 429,
                _ => 500,
            },
            DaemonError::Vm(_) | DaemonError::Internal(_) => 500,
        }
    }
}

impl From<DbError> for DaemonError {
    fn from(e: DbError) -> Self {
        DaemonError::Internal(e.to_string())
    }
}

impl From<VmError> for DaemonError {
    fn from(e: VmError) -> Self {
        match e {
            VmError::Net(e) => e.into(),
            e => DaemonError::Vm(e.to_string()),
        }
    }
}

impl From<crate::net::NetError> for DaemonError {
    fn from(e: crate::net::NetError) -> Self {
        match e {
            // A host port that cannot be had is the request's to change.
            crate::net::NetError::Publish(_) => DaemonError::BadRequest(e.to_string()),
            crate::net::NetError::Sandbox { .. } => DaemonError::Vm(e.to_string()),
        }
    }
}

impl From<BuildError> for DaemonError {
    fn from(e: BuildError) -> Self {
        DaemonError::BadRequest(e.to_string())
    }
}

impl From<kiln_agent::client::Error> for DaemonError {
    fn from(e: kiln_agent::client::Error) -> Self {
        use kiln_agent::client::Error as E;
        match e {
            E::Agent { kind, message, .. } => DaemonError::Guest { kind, message },
            E::CouldNotStart { message, .. } => DaemonError::Guest {
                kind: kiln_agent::protocol::ErrorKind::CouldNotStart,
                message,
            },
            other => DaemonError::Vm(format!("the sandbox's agent: {other}")),
        }
    }
}

impl From<tokio::task::JoinError> for DaemonError {
    fn from(e: tokio::task::JoinError) -> Self {
        DaemonError::Internal(format!("a worker task failed: {e}"))
    }
}
