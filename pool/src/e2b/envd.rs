//! envd, served on the host: requests carrying `E2b-Sandbox-Id` (the SDK sends it when
//! `E2B_SANDBOX_URL` points at kilnd) reach the routes here. Each is checked the way E2B's edge
//! and envd check them — the sandbox exists and runs, the port is envd's, `X-Access-Token` is the
//! sandbox's — then its user (`Authorization: Basic`, else the template's user, else root) is
//! resolved in the guest, and the call goes to the sandbox's agent over vsock.
//!
//! Refusals before envd answer as E2B's edge does: a plain 502 whose message says the sandbox
//! "was not found" (the SDK's `SandboxNotRunningException`) or its "port is not open".

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use kiln_agent::client::{Client, Error as AgentError};
use kiln_agent::protocol::{ErrorKind, PROTOCOL_REVISION, UserInfo};

use super::connect::{Code, ConnectError};
use super::state::{E2b, ENVD_PORT, same_secret};
use crate::daemon::sandbox::Sandbox;
use crate::types::SandboxState;

/// The envd routes.
pub fn router(state: Arc<E2b>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route(
            "/files",
            get(super::files::download).post(super::files::upload),
        )
        .route("/process.Process/{method}", post(super::process::call))
        .route(
            "/filesystem.Filesystem/{method}",
            post(super::filesystem::call),
        )
        // Uploads stream through; the RPCs bound their own bodies.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// A refusal before the request reaches a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// No such sandbox, or it is not running.
    #[error("{0}")]
    Gone(String),
    /// A port other than envd's.
    #[error("{0}")]
    Port(String),
    /// A missing or wrong access token, or an unknown user.
    #[error("{0}")]
    Unauthenticated(String),
    /// The sandbox's agent cannot serve envd.
    #[error("{0}")]
    Agent(ConnectError),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Gone(m) | Refusal::Port(m) => (
                StatusCode::BAD_GATEWAY,
                axum::Json(serde_json::json!({"code": 502, "message": m})),
            )
                .into_response(),
            // A Connect error body also reads as an envd HTTP error (`message`).
            Refusal::Unauthenticated(m) => {
                ConnectError::new(Code::Unauthenticated, m).into_response()
            }
            Refusal::Agent(e) => e.into_response(),
        }
    }
}

/// A request's sandbox, its agent and its user.
pub struct Envd {
    /// The sandbox.
    pub sandbox: Arc<Sandbox>,
    /// Its agent connection.
    pub client: Client,
    /// The user the request acts as.
    pub user: UserInfo,
    /// That user's name as requested (for `exec` and file owners).
    pub user_spec: String,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The user named by `Authorization: Basic base64(user:)`, if the header is there.
fn basic_user(headers: &HeaderMap) -> Result<Option<String>, Refusal> {
    let Some(value) = header(headers, "authorization") else {
        return Ok(None);
    };
    let bad = || Refusal::Unauthenticated(format!("authorization {value:?} is not Basic user:"));
    let b64 = value.strip_prefix("Basic ").ok_or_else(bad)?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let user = text.split(':').next().unwrap_or("").to_string();
    Ok((!user.is_empty()).then_some(user))
}

impl Envd {
    /// Checks a request's routing headers and token and resolves its user. `username` is the
    /// `/files` query's user, which counts like the Basic header.
    pub async fn from_request(
        e2b: &Arc<E2b>,
        headers: &HeaderMap,
        username: Option<&str>,
    ) -> Result<Envd, Refusal> {
        let id = header(headers, "e2b-sandbox-id").unwrap_or("").to_string();
        let sandbox = e2b
            .daemon
            .sandbox(&id)
            .map_err(|_| Refusal::Gone(format!("The sandbox {id} was not found")))?;
        check_port(headers, &id)?;
        let token = e2b.token(&sandbox);
        match header(headers, "x-access-token") {
            Some(given) if same_secret(given, &token) => {}
            Some(_) => {
                return Err(Refusal::Unauthenticated(format!(
                    "the X-Access-Token is not sandbox {id}'s (expired with a sandbox that is gone?)"
                )));
            }
            None => {
                return Err(Refusal::Unauthenticated(format!(
                    "sandbox {id} needs its X-Access-Token"
                )));
            }
        }
        if sandbox.live().state == SandboxState::Paused {
            return Err(Refusal::Gone(format!(
                "The sandbox {id} was not found running: it is paused; connect to it to resume"
            )));
        }
        let client = sandbox
            .client()
            .map_err(|e| Refusal::Gone(format!("The sandbox {id} was not found running: {e}")))?;
        if client.revision() < PROTOCOL_REVISION {
            return Err(Refusal::Agent(ConnectError::new(
                Code::FailedPrecondition,
                format!(
                    "sandbox {id}'s agent speaks protocol revision {}, envd needs {PROTOCOL_REVISION}: \
                     rebuild template {} with this kilnd",
                    client.revision(),
                    sandbox.template_name
                ),
            )));
        }
        let user_spec = match basic_user(headers)?.or(username.map(String::from)) {
            Some(u) => u,
            None => sandbox.spec.user.clone().unwrap_or_else(|| "root".into()),
        };
        let user = match e2b.cached_user(&id, &user_spec) {
            Some(u) => u,
            None => {
                let c = client.clone();
                let spec = user_spec.clone();
                let resolved = tokio::task::spawn_blocking(move || c.resolve_user(&spec))
                    .await
                    .map_err(|e| {
                        Refusal::Agent(ConnectError::new(Code::Internal, e.to_string()))
                    })?;
                let info = resolved.map_err(|e| match e {
                    AgentError::Agent {
                        kind: ErrorKind::NotFound,
                        ..
                    } => Refusal::Unauthenticated(format!(
                        "user {user_spec:?} does not exist in sandbox {id}"
                    )),
                    other => Refusal::Agent(agent_error(other)),
                })?;
                e2b.remember_user(&id, &user_spec, info.clone());
                info
            }
        };
        Ok(Envd {
            sandbox,
            client,
            user,
            user_spec,
        })
    }

    /// `path` as envd reads it: relative to the user's home, `.` and `..` folded away (never
    /// above `/`), with no NUL byte.
    pub fn path(&self, path: &str) -> Result<String, ConnectError> {
        resolve_path(&self.user.home, path)
    }
}

/// See [`Envd::path`].
pub fn resolve_path(home: &str, path: &str) -> Result<String, ConnectError> {
    if path.contains('\0') {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            format!("path {path:?} contains a NUL byte"),
        ));
    }
    let full = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{home}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in full.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// The Connect error for an agent failure.
pub fn agent_error(e: AgentError) -> ConnectError {
    match e {
        AgentError::Agent { kind, message, .. } => {
            let code = match kind {
                ErrorKind::NotFound => Code::NotFound,
                ErrorKind::PermissionDenied => Code::PermissionDenied,
                ErrorKind::AlreadyExists => Code::AlreadyExists,
                ErrorKind::BadRequest
                | ErrorKind::IsADirectory
                | ErrorKind::NotADirectory
                | ErrorKind::DirectoryNotEmpty => Code::InvalidArgument,
                ErrorKind::Busy => Code::ResourceExhausted,
                ErrorKind::Cancelled => Code::Canceled,
                _ => Code::Internal,
            };
            ConnectError::new(code, message)
        }
        AgentError::CouldNotStart { message, .. } => ConnectError::new(Code::Unknown, message),
        AgentError::Timeout(d) => ConnectError::new(
            Code::DeadlineExceeded,
            format!("the sandbox's agent did not answer within {d:?}"),
        ),
        other => ConnectError::new(
            Code::Unavailable,
            format!("lost the sandbox's agent: {other}"),
        ),
    }
}

/// Refuses a port other than envd's (kilnd reaches guests only through their agent).
fn check_port(headers: &HeaderMap, id: &str) -> Result<(), Refusal> {
    if let Some(port) = header(headers, "e2b-sandbox-port")
        && port.parse::<u16>() != Ok(ENVD_PORT)
    {
        return Err(Refusal::Port(format!(
            "The sandbox {id} is running but port is not open: {port} (kilnd serves only envd, \
             {ENVD_PORT}, here; publish a guest port with kilnd's own API)"
        )));
    }
    Ok(())
}

/// `GET /health`: 204 while the sandbox runs (no token needed, as on envd).
async fn health(State(e2b): State<Arc<E2b>>, headers: HeaderMap) -> Response {
    let id = header(&headers, "e2b-sandbox-id").unwrap_or("");
    if let Err(refusal) = check_port(&headers, id) {
        return refusal.into_response();
    }
    match e2b.daemon.sandbox(id) {
        Ok(sb) if sb.live().state == SandboxState::Running => {
            StatusCode::NO_CONTENT.into_response()
        }
        _ => Refusal::Gone(format!("The sandbox {id} was not found")).into_response(),
    }
}

/// A JSON error in envd's HTTP shape: `{"code": status, "message": ...}`.
pub fn http_error(status: StatusCode, message: impl Into<String>) -> Response {
    let mut resp = (
        status,
        axum::Json(serde_json::json!({"code": status.as_u16(), "message": message.into()})),
    )
        .into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_fold_and_stay_under_root() {
        assert_eq!(resolve_path("/home/u", "a/b").unwrap(), "/home/u/a/b");
        assert_eq!(resolve_path("/root", "/x/./y/../z").unwrap(), "/x/z");
        assert_eq!(resolve_path("/root", "../../../../etc").unwrap(), "/etc");
        assert_eq!(resolve_path("/root", "/").unwrap(), "/");
        assert_eq!(
            resolve_path("/root", "a\0b").unwrap_err().code,
            Code::InvalidArgument
        );
    }

    #[test]
    fn basic_auth_names_the_user() {
        let mut h = HeaderMap::new();
        assert_eq!(basic_user(&h).unwrap(), None);
        h.insert("authorization", "Basic dXNlcjo=".parse().unwrap());
        assert_eq!(basic_user(&h).unwrap().as_deref(), Some("user"));
        h.insert("authorization", "Bearer x".parse().unwrap());
        assert!(basic_user(&h).is_err());
    }
}
