//! E2B compatibility: code written against E2B's SDKs runs on a Kiln host by pointing
//! `E2B_API_URL` and `E2B_SANDBOX_URL` at kilnd's E2B listener (`--e2b-listen`). One port serves
//! both halves of E2B:
//!
//! - [`rest`]: the control plane's REST API (create, list, get, kill, timeout, pause, connect,
//!   fork, snapshots ([`snapshots`]), templates), behind `X-API-Key`, with a create's network
//!   options in kilnd's terms ([`network`]);
//! - [`envd`]: the in-sandbox daemon's API, which E2B runs inside each VM and kilnd serves on the
//!   host instead: Connect RPC ([`connect`]) for `process.Process` ([`process`]) and
//!   `filesystem.Filesystem` ([`filesystem`]), `/files` ([`files`]) and `/health`, translated to
//!   the sandbox's agent over vsock (the guest needs no network). A request is envd's when it
//!   carries `E2b-Sandbox-Id`, which the SDKs send whenever `E2B_SANDBOX_URL` is set.
//!
//! This room calls the daemon ([`crate::daemon`]) and the agent client; nothing calls it but
//! `kilnd`'s main. [`state::ENVD_VERSION`] says which envd features are served.

pub mod connect;
pub mod envd;
pub mod files;
pub mod filesystem;
pub mod listing;
pub mod network;
pub mod process;
pub mod proto;
pub mod rest;
pub mod snapshots;
pub mod state;
pub mod time;
pub mod unread;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use tower::ServiceExt;

pub use state::E2b;

/// The listener's router: envd's routes for requests naming a sandbox, the REST API for the rest.
pub fn router(e2b: Arc<E2b>) -> Router {
    let rest = rest::router(e2b.clone());
    let envd = envd::router(e2b);
    Router::new()
        .fallback(move |req: Request| {
            let target = if req.headers().contains_key("e2b-sandbox-id") {
                envd.clone()
            } else {
                rest.clone()
            };
            async move {
                match target.oneshot(req).await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                }
            }
        })
        .layer(axum::middleware::from_fn(unread::close_when_unread))
}
