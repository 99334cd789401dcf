//! The VMM side of the API socket (`--api-sock`). One thread serves HTTP with `kiln-api`'s epoll
//! loop (every connection on that thread) and hands each parsed request to the VMM thread over a
//! channel, waking it with an eventfd; the VMM thread answers through the request's
//! [`kiln_api::Reply`], which wakes the API thread in turn, so the API thread never blocks on the
//! VMM and keeps serving (and timing out) other clients meanwhile. Before `InstanceStart` the
//! requests build up the configuration ([`preboot`]); after it, an event-loop subscriber answers
//! queries and refuses changes ([`running`]). The API thread installs its seccomp filter before
//! it serves anything ([`crate::seccomp`]).

pub mod balloon;
mod common;

pub use common::put_mmds_config;
mod convert;
pub mod preboot;
pub mod running;

use std::path::Path;
use std::sync::mpsc::{self, Receiver};

use kiln_api::{ApiRequest, ApiResponse, ApiServer, Reply};
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{SeccompError, SeccompFilters, ThreadKind};

/// A request waiting for the VMM thread's answer.
pub struct Pending {
    /// What was asked.
    pub request: ApiRequest,
    reply: Reply,
}

impl Pending {
    /// Answers with what `handle` makes of the request, and sends it back to the API thread.
    pub fn respond(self, handle: impl FnOnce(ApiRequest) -> ApiResponse) {
        let response = handle(self.request);
        // The client may have gone; the API thread then drops the answer.
        self.reply.send(response);
    }
}

/// The VMM thread's end of the API: requests, and the eventfd that says one is waiting.
pub struct ApiLink {
    /// Requests in arrival order.
    pub requests: Receiver<Pending>,
    /// Written once per request.
    pub wakeup: EventFd,
    /// Answers given but not yet written to their clients.
    pub unwritten: kiln_api::Unwritten,
}

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    /// The socket could not be bound.
    #[error("API socket: {0}")]
    Bind(#[from] kiln_api::ApiError),
    /// The eventfd or thread could not be created.
    #[error("API socket: cannot start the API thread: {0}")]
    Thread(std::io::Error),
    /// The API thread could not install its seccomp filter.
    #[error("API socket: {0}")]
    Seccomp(#[from] SeccompError),
}

/// Binds the API socket at `path` (listening when this returns) and starts the thread serving it,
/// which installs the `api` filter of `seccomp` first (before it reads a request; it starts no
/// thread of its own).
pub fn start(
    path: &Path,
    seccomp: &SeccompFilters,
    max_payload: usize,
) -> Result<ApiLink, ApiStartError> {
    let limits = kiln_api::Limits {
        max_payload,
        ..kiln_api::Limits::default()
    };
    let server = ApiServer::bind(path)?.with_limits(limits);
    let unwritten = server.unwritten();
    let wakeup = EventFd::new(libc::EFD_NONBLOCK).map_err(ApiStartError::Thread)?;
    let wake = wakeup.try_clone().map_err(ApiStartError::Thread)?;
    let (tx, requests) = mpsc::channel::<Pending>();
    let (installed_tx, installed) = mpsc::sync_channel(1);
    let seccomp = seccomp.clone();
    std::thread::Builder::new()
        .name("kiln_api".into())
        .spawn(move || {
            let result = seccomp.install(ThreadKind::Api);
            let failed = result.is_err();
            let _ = installed_tx.send(result);
            if failed {
                return;
            }
            let served = server.serve_deferred(move |request, reply| {
                match tx.send(Pending { request, reply }) {
                    Ok(()) => {
                        let _ = wake.write(1);
                    }
                    Err(mpsc::SendError(pending)) => pending
                        .reply
                        .send(ApiResponse::fault("the VMM is shutting down")),
                }
            });
            if let Err(e) = served {
                log::error!("API server stopped: {e}");
            }
        })
        .map_err(ApiStartError::Thread)?;
    match installed.recv() {
        Ok(result) => result?,
        Err(_) => {
            return Err(ApiStartError::Thread(std::io::Error::other(
                "the API thread ended before it started serving",
            )));
        }
    }
    Ok(ApiLink {
        requests,
        wakeup,
        unwritten,
    })
}
