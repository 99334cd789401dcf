//! The one error type of the API: every variant is a request the VMM will not act on (answered
//! 400 with the message as `fault_message`, as Firecracker does) or a socket that cannot be served.

use std::io;
use std::path::PathBuf;

/// Why a request was refused, or why the API socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No resource lives at this path.
    #[error("unknown path {0}")]
    UnknownPath(String),
    /// The resource exists but not with this method (one of GET, PUT, PATCH): 400, as Firecracker.
    #[error("{path} does not accept {method}")]
    MethodNotAllowed {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },
    /// A method Firecracker's server takes on no path (POST, DELETE, HEAD, ...): 405 with the
    /// methods this path takes.
    #[error("{method} is not a method this API takes; {path} takes {allow}")]
    UnsupportedMethod {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
        /// The methods the path takes, comma-separated (the `Allow` header).
        allow: String,
    },
    /// A Firecracker resource whose device Kiln does not have by design.
    #[error("{0}")]
    NotInKiln(String),
    /// The request needs a JSON body and came with none.
    #[error("{method} {path} needs a JSON body")]
    MissingBody {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },
    /// The request takes no body and came with one.
    #[error("{method} {path} takes no body")]
    UnexpectedBody {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },
    /// The body did not parse or broke a rule of its resource; the message names the field.
    #[error("{resource}: {message}")]
    BadBody {
        /// The resource, as in its path (`drives`, `snapshot/load`, ...).
        resource: &'static str,
        /// What is wrong, naming the field.
        message: String,
    },
    /// Something is already at the socket path; like Firecracker, Kiln never removes it.
    #[error("API socket path {0} already exists; remove it or choose another")]
    SocketExists(PathBuf),
    /// The socket could not be created.
    #[error("cannot bind API socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The descriptors the server loop waits on could not be created.
    #[error("cannot set up the API socket's event loop ({what}): {source}")]
    Setup {
        /// Which descriptor or setting.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Waiting for events failed; the server stops.
    #[error("the API socket's event loop failed: {0}")]
    Serve(io::Error),
}

impl ApiError {
    /// A [`ApiError::BadBody`] for `resource`.
    pub fn bad_body(resource: &'static str, message: impl ToString) -> Self {
        ApiError::BadBody {
            resource,
            message: message.to_string(),
        }
    }
}
