//! kilnd's own HTTP API (HTTP/1.1 and HTTP/2 cleartext, JSON), served by axum on a Unix socket
//! and optionally on a local TCP port behind a bearer token:
//!
//! | method and path | what |
//! |---|---|
//! | `GET /health` | `{"ok": true}` |
//! | `POST /templates` | build a template from a spec (JSON); streams [`BuildEvent`] lines |
//! | `GET /templates`, `GET /templates/{name}`, `DELETE /templates/{name}` | list, get, remove |
//! | `PUT /templates/{name}/pool` | set its warm pool ([`PoolSettings`]) |
//! | `POST /sandboxes` | create one ([`CreateSandbox`]) |
//! | `GET /sandboxes`, `GET /sandboxes/{id}`, `DELETE /sandboxes/{id}` | list, get, kill |
//! | `POST /sandboxes/{id}/exec` | run a command ([`ExecRequest`]); streams [`ExecEvent`] lines |
//! | `GET/PUT/DELETE /sandboxes/{id}/files?path=P` | read, write (body), remove a file |
//! | `GET /sandboxes/{id}/dir?path=P` | list a folder |
//! | `POST /sandboxes/{id}/pause`, `.../resume`, `.../fork`, `.../timeout` | lifecycle |
//! | `POST /sandboxes/{id}/snapshot` | snapshot it into a template ([`SnapshotRequest`]) |
//! | `GET /metrics` | Prometheus text |
//!
//! Errors are `{"error": "..."}` with 400 (bad input), 404 (unknown), 409 (wrong state),
//! 429 (a limit) or 500.
//!
//! [`BuildEvent`]: crate::types::BuildEvent
//! [`PoolSettings`]: crate::types::PoolSettings
//! [`CreateSandbox`]: crate::types::CreateSandbox
//! [`ExecRequest`]: crate::types::ExecRequest
//! [`ExecEvent`]: crate::types::ExecEvent
//! [`SnapshotRequest`]: crate::types::SnapshotRequest

mod files;
mod sandboxes;
mod templates;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use tokio_stream::StreamExt;

use crate::daemon::Daemon;
use crate::daemon::error::DaemonError;
use crate::types::ErrorBody;

/// Largest request body (file uploads included): 1 GiB.
pub const MAX_BODY: usize = 1 << 30;

impl IntoResponse for DaemonError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            axum::Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

/// A response streaming `rx`'s items as JSON lines.
pub fn ndjson<T: serde::Serialize + Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> Response {
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|item| {
        let mut line = serde_json::to_vec(&item).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(line)
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

/// The router, over daemon `d`.
pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route(
            "/health",
            get(|| async { axum::Json(serde_json::json!({"ok": true})) }),
        )
        .route("/metrics", get(metrics))
        .route("/templates", get(templates::list).post(templates::build))
        .route(
            "/templates/{name}",
            get(templates::get).delete(templates::remove),
        )
        .route("/templates/{name}/pool", put(templates::pool))
        .route("/sandboxes", get(sandboxes::list).post(sandboxes::create))
        .route(
            "/sandboxes/{id}",
            get(sandboxes::get).delete(sandboxes::kill),
        )
        .route("/sandboxes/{id}/exec", post(sandboxes::exec))
        .route("/sandboxes/{id}/pause", post(sandboxes::pause))
        .route("/sandboxes/{id}/resume", post(sandboxes::resume))
        .route("/sandboxes/{id}/fork", post(sandboxes::fork))
        .route("/sandboxes/{id}/snapshot", post(sandboxes::snapshot))
        .route("/sandboxes/{id}/timeout", post(sandboxes::timeout))
        .route(
            "/sandboxes/{id}/files",
            get(files::read).put(files::write).delete(files::remove),
        )
        .route("/sandboxes/{id}/dir", get(files::list))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(d)
}

async fn metrics(State(d): State<Arc<Daemon>>) -> Response {
    let mut resp = d.metrics().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

/// Refuses requests without `Authorization: Bearer <token>` (the TCP listener's guard).
pub async fn require_token(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time enough: compare all bytes whatever the first difference.
    let ok = given.is_some_and(|g| {
        g.len() == token.len()
            && g.bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(ErrorBody {
                error: "missing or wrong bearer token".into(),
            }),
        )
            .into_response();
    }
    next.run(req).await
}

/// The router for the TCP listener: the same routes behind the bearer token.
pub fn tcp_router(d: Arc<Daemon>, token: String) -> Router {
    router(d).layer(middleware::from_fn_with_state(
        Arc::new(token),
        require_token,
    ))
}
