//! `kiln-api`: the API socket. This crate owns the API's JSON shapes and the HTTP layer; it is
//! called by kiln-vmm's API thread (which serves the socket) and by clients (the `kiln` CLI and
//! the tests).
//!
//! - [`requests`]: one file per resource with Firecracker's paths and bodies, the typed
//!   [`ApiRequest`] and the pure [`parse_request`] that produces it, and the [`ROUTES`] table.
//! - [`http`]: the small HTTP/1.1 server side: reading requests with size limits, writing
//!   responses with Firecracker's status codes.
//! - [`server`]: [`ApiServer`], which binds the Unix socket and serves every connection from one
//!   thread's epoll loop, with bounded connections, deadlines and buffers ([`Limits`]), handing
//!   each request to the VMM's handler, one at a time.
//! - [`echo`]: the bounds on what fault messages echo of a request.
//! - [`client`]: a small blocking client for tests and the CLI.
//!
//! The API is described for clients in `api/openapi.json`; a test keeps it and [`ROUTES`] equal.
//! This crate calls `std`, serde, thiserror, and libc and vmm-sys-util for the loop's epoll,
//! eventfd and socket calls; it knows nothing of the VMM, whose handler turns each
//! [`ApiRequest`] into an [`ApiResponse`].

pub mod client;
pub mod echo;
mod error;
pub mod http;
pub mod requests;
mod response;
pub mod server;

pub use error::ApiError;
pub use requests::{ApiRequest, ROUTES, Route, parse_request};
pub use response::ApiResponse;
pub use server::{ApiServer, Limits, Reply, Unwritten};
