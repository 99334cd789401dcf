//! The HTTP/1.1 server side of the API socket, as small as the API needs: requests with a
//! `Content-Length` body (no chunked bodies), keep-alive by default, and Firecracker's three
//! responses (204, 200 with JSON, 400 with a fault message).
//!
//! Everything here works on byte buffers or on any `Read + Write`, so hostile inputs are tested
//! without sockets. A request is never allowed to grow past [`MAX_REQUEST_SIZE`] in memory.

mod request;
mod response;

use std::io;

pub use request::{CONTINUE, HttpRequest, Parsed, RequestHead, RequestReader, parse_head};
pub use response::{AnswerHeaders, encode_response, write_response};

/// Largest request head the API reads: 50 KiB.
pub const MAX_REQUEST_SIZE: usize = 50 * 1024;

/// Largest request body by default, as Firecracker's: 51,200 bytes (its
/// `--http-api-max-payload-size` changes it, and so does kiln-vmm's).
pub const DEFAULT_MAX_PAYLOAD: usize = 51_200;

/// Why a request could not be read; answered with 400 (unless the stream itself failed) and
/// the connection closed, since the next request's start can no longer be found.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The head alone exceeds [`MAX_REQUEST_SIZE`].
    #[error("request larger than {MAX_REQUEST_SIZE} bytes")]
    TooLarge,
    /// The body is larger than the server takes (Firecracker's message).
    #[error(
        "Request payload with size {size} is larger than the limit of {limit} allowed by server."
    )]
    PayloadTooLarge {
        /// The announced body size.
        size: usize,
        /// The largest body the server takes.
        limit: usize,
    },
    /// The request line or a header does not parse.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// `Content-Length` is not one plain decimal number.
    #[error("bad Content-Length {0:?}")]
    BadContentLength(String),
    /// A `Transfer-Encoding` header (chunked bodies): refused to keep the reader simple.
    #[error("Transfer-Encoding {0:?} is not supported; send the body with a Content-Length")]
    TransferEncoding(String),
    /// Neither HTTP/1.1 nor HTTP/1.0.
    #[error("unsupported HTTP version {0:?}")]
    Version(String),
    /// The peer closed the connection in the middle of a request.
    #[error("connection closed in the middle of a request")]
    Truncated,
    /// Reading or writing the stream failed.
    #[error("API connection I/O failed: {0}")]
    Io(#[from] io::Error),
}
