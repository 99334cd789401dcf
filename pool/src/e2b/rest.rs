//! E2B's REST API, the lifecycle subset the `e2b` SDKs call, over kilnd's daemon: create (v1 and
//! v2), list (v1 and v2, with state, metadata, template and start filters, ordered and paged),
//! get, kill, timeout, pause, resume and connect (v1 and v2), fork, snapshots ([`snapshots`]:
//! take, list, delete), and the template list.
//! Requests carry `X-API-Key`; errors are `{"code": status, "message": ...}` naming the thing.
//! `GET /kiln/streams` (Kiln's own) counts the envd streams open.
//! A create's network options are mapped to kilnd's ([`super::network`]); options kilnd cannot
//! honour (auto-pause, volumes, MCP, network settings it cannot express) are refused by name
//! rather than ignored.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::listing::{list, listed, listing};
use super::snapshots;
use super::state::{E2b, ENVD_VERSION};
use super::time::rfc3339;
use crate::daemon::error::DaemonError;
use crate::daemon::sandbox::Sandbox;
use crate::types::{CreateSandbox, SandboxState};

/// The REST routes, behind the API key.
pub fn router(state: Arc<E2b>) -> Router {
    Router::new()
        .route("/sandboxes", get(list_v1).post(create))
        .route("/v2/sandboxes", get(list_v2).post(create))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/sandboxes/{id}/timeout", post(timeout))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/fork", post(fork))
        .route("/sandboxes/{id}/snapshots", post(snapshots::create))
        .route("/snapshots", get(snapshots::list))
        .route("/templates", get(templates))
        .route("/kiln/streams", get(streams))
        .route("/templates/{id}", delete(snapshots::delete))
        .fallback(unknown_route)
        .layer(middleware::from_fn_with_state(state.clone(), require_key))
        .with_state(state)
}

/// An error answer: `{"code": status, "message": ...}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    /// An answer with `status` saying `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError(status, message.into())
    }
    /// A 400 with `message`.
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    /// Its HTTP status.
    pub fn status(&self) -> u16 {
        self.0.as_u16()
    }
    /// What it says.
    pub fn message(&self) -> &str {
        &self.1
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(json!({"code": self.0.as_u16(), "message": self.1})),
        )
            .into_response()
    }
}

impl From<DaemonError> for ApiError {
    fn from(e: DaemonError) -> ApiError {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError(status, e.to_string())
    }
}

type Result<T> = std::result::Result<T, ApiError>;

async fn require_key(State(e2b): State<Arc<E2b>>, req: Request, next: Next) -> Response {
    let key = req.headers().get("x-api-key").and_then(|v| v.to_str().ok());
    if !e2b.api_key_ok(key) {
        let why = if key.is_some() {
            "the X-API-Key is not this kilnd's E2B API key"
        } else {
            "send this kilnd's E2B API key in X-API-Key (E2B_API_KEY)"
        };
        return ApiError::new(StatusCode::UNAUTHORIZED, why).into_response();
    }
    next.run(req).await
}

async fn unknown_route(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "{} {} is not part of the E2B API kilnd serves",
            req.method(),
            req.uri().path()
        ),
    )
}

fn body<T>(b: std::result::Result<Json<T>, JsonRejection>) -> Result<T> {
    b.map(|Json(v)| v).map_err(|e| ApiError::bad(e.body_text()))
}

/// A body that may be absent (the SDK sends none for some calls).
fn optional_body<T: Default>(b: std::result::Result<Json<T>, JsonRejection>) -> Result<T> {
    match b {
        Ok(Json(v)) => Ok(v),
        Err(JsonRejection::MissingJsonContentType(_)) => Ok(T::default()),
        Err(e) => Err(ApiError::bad(e.body_text())),
    }
}

/// `POST /sandboxes`, `POST /v2/sandboxes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<u64>,
    metadata: Option<BTreeMap<String, String>>,
    env_vars: Option<BTreeMap<String, String>>,
    /// Every kilnd sandbox needs its access token: accepted, and true either way.
    #[allow(dead_code)]
    secure: Option<bool>,
    #[serde(rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    auto_pause: Option<bool>,
    auto_pause_memory: Option<Value>,
    auto_resume: Option<Value>,
    network: Option<Value>,
    mcp: Option<Value>,
    iam: Option<Value>,
    volume_mounts: Option<Value>,
}

impl NewSandbox {
    /// Refuses what kilnd cannot do, naming it (the network's options are checked as they are
    /// mapped, in [`super::network::request`]).
    fn check(&self) -> Result<()> {
        if self.auto_pause == Some(true) || is_set(&self.auto_pause_memory) {
            return Err(ApiError::bad(
                "autoPause: pausing at the timeout is not served by kilnd (sandboxes are killed \
                 at their timeout; pause them yourself)",
            ));
        }
        for (name, v) in [
            ("autoResume", &self.auto_resume),
            ("mcp", &self.mcp),
            ("iam", &self.iam),
            ("volumeMounts", &self.volume_mounts),
        ] {
            if is_set(v) {
                return Err(ApiError::bad(format!("{name} is not served by kilnd")));
            }
        }
        Ok(())
    }
}

fn is_set(v: &Option<Value>) -> bool {
    !matches!(v, None | Some(Value::Null))
}

/// A sandbox as create, connect and fork answer.
fn created(e2b: &E2b, sb: &Sandbox) -> Value {
    json!({
        "templateID": sb.template_name,
        "alias": sb.template_name,
        "sandboxID": sb.id,
        "clientID": "kiln",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": e2b.token(sb),
        "trafficAccessToken": null,
        "domain": null,
    })
}

async fn create(
    State(e2b): State<Arc<E2b>>,
    req: std::result::Result<Json<NewSandbox>, JsonRejection>,
) -> Result<Response> {
    let req = body(req)?;
    req.check()?;
    let network =
        super::network::request(req.allow_internet_access, req.network, e2b.internet_default)?;
    let info = e2b
        .daemon
        .create(CreateSandbox {
            template: req.template_id,
            timeout_s: req.timeout,
            env: req.env_vars.unwrap_or_default(),
            metadata: req.metadata.unwrap_or_default(),
            network,
        })
        .await?;
    let sb = e2b.daemon.sandbox(&info.id)?;
    Ok((StatusCode::CREATED, Json(created(&e2b, &sb))).into_response())
}

async fn list_v1(
    State(e2b): State<Arc<E2b>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Json<Vec<Value>>> {
    let l = listing(&q, false)?;
    Ok(Json(list(&e2b, &l).0))
}

async fn list_v2(
    State(e2b): State<Arc<E2b>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Response> {
    let l = listing(&q, true)?;
    let (page, next) = list(&e2b, &l);
    let mut resp = Json(page).into_response();
    if let Some(t) = next.and_then(|t| HeaderValue::from_str(&t).ok()) {
        resp.headers_mut().insert("x-next-token", t);
    }
    Ok(resp)
}

fn sandbox(e2b: &E2b, id: &str) -> Result<Arc<Sandbox>> {
    e2b.daemon
        .sandbox(id)
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("sandbox {id} not found")))
}

async fn detail(State(e2b): State<Arc<E2b>>, Path(id): Path<String>) -> Result<Json<Value>> {
    let sb = sandbox(&e2b, &id)?;
    let mut v = listed(&sb);
    v["envdAccessToken"] = json!(e2b.token(&sb));
    v["domain"] = Value::Null;
    v["allowInternetAccess"] = json!(sb.net.policy.allow_net);
    Ok(Json(v))
}

async fn kill(State(e2b): State<Arc<E2b>>, Path(id): Path<String>) -> Result<StatusCode> {
    sandbox(&e2b, &id)?;
    e2b.daemon.kill(&id).await?;
    e2b.forget_gone();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutBody {
    timeout: Option<u64>,
}

async fn timeout(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
    req: std::result::Result<Json<TimeoutBody>, JsonRejection>,
) -> Result<StatusCode> {
    let t = body(req)?
        .timeout
        .ok_or_else(|| ApiError::bad("timeout: give the seconds from now"))?;
    sandbox(&e2b, &id)?;
    e2b.daemon.set_timeout(&id, t)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PauseBody {
    memory: Option<Value>,
    require_healthy_guest: Option<bool>,
}

async fn pause(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
    req: std::result::Result<Json<PauseBody>, JsonRejection>,
) -> Result<StatusCode> {
    let req = optional_body(req)?;
    // Kiln always keeps memory (a full snapshot); the guest's health is checked by the pause.
    let _ = (req.memory, req.require_healthy_guest);
    let sb = sandbox(&e2b, &id)?;
    if sb.live().state == SandboxState::Paused {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already paused"),
        ));
    }
    e2b.daemon.pause(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConnectBody {
    timeout: Option<u64>,
    memory: Option<Value>,
    auto_pause: Option<bool>,
}

/// Resumes `id` if it is paused (201) or finds it running (200), then makes it live at least
/// `timeout` more seconds.
async fn wake(e2b: &Arc<E2b>, id: &str, timeout: Option<u64>) -> Result<(StatusCode, Value)> {
    let sb = sandbox(e2b, id)?;
    let status = if sb.live().state == SandboxState::Paused {
        e2b.daemon.resume(id).await?;
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    if let Some(t) = timeout {
        let left = sb.live().expires_at.saturating_sub(crate::daemon::now_s());
        if t > left {
            e2b.daemon.set_timeout(id, t)?;
        }
    }
    Ok((status, created(e2b, &sb)))
}

async fn connect(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
    req: std::result::Result<Json<ConnectBody>, JsonRejection>,
) -> Result<Response> {
    let req = optional_body(req)?;
    if req.auto_pause == Some(true) {
        return Err(ApiError::bad("autoPause is not served by kilnd"));
    }
    let _ = req.memory;
    let (status, v) = wake(&e2b, &id, req.timeout).await?;
    Ok((status, Json(v)).into_response())
}

async fn resume(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
    req: std::result::Result<Json<ConnectBody>, JsonRejection>,
) -> Result<Response> {
    let req = optional_body(req)?;
    let sb = sandbox(&e2b, &id)?;
    if sb.live().state == SandboxState::Running {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already running"),
        ));
    }
    let (_, v) = wake(&e2b, &id, req.timeout).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForkBody {
    timeout: Option<u64>,
    count: Option<u32>,
}

async fn fork(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
    req: std::result::Result<Json<ForkBody>, JsonRejection>,
) -> Result<Response> {
    let req = optional_body(req)?;
    let sb = sandbox(&e2b, &id)?;
    if sb.live().state == SandboxState::Paused {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is paused: connect to it before forking"),
        ));
    }
    let forks = e2b.daemon.fork(&id, req.count.unwrap_or(1)).await?;
    let mut out = Vec::new();
    for f in forks {
        if let Some(t) = req.timeout {
            e2b.daemon.set_timeout(&f.id, t)?;
        }
        let fsb = e2b.daemon.sandbox(&f.id)?;
        out.push(json!({"sandbox": created(&e2b, &fsb)}));
    }
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// Kiln's own addition: envd streams open now (process output followed, files transferred), so
/// a client can check that what it abandoned was let go.
async fn streams(State(e2b): State<Arc<E2b>>) -> Json<Value> {
    Json(json!({"open": e2b.open_streams()}))
}

async fn templates(State(e2b): State<Arc<E2b>>) -> Result<Json<Vec<Value>>> {
    let list = e2b.daemon.templates()?;
    Ok(Json(
        list.into_iter()
            .map(|t| {
                json!({
                    "templateID": t.id,
                    "buildID": t.id,
                    "cpuCount": t.vcpus,
                    "memoryMB": t.mem_mib,
                    "diskSizeMB": t.disk_mib,
                    "public": false,
                    "aliases": [t.name],
                    "names": [t.name],
                    "createdAt": rfc3339(t.built_at),
                    "updatedAt": rfc3339(t.built_at),
                    "createdBy": null,
                    "lastSpawnedAt": null,
                    "spawnCount": 0,
                    "buildCount": 1,
                    "envdVersion": ENVD_VERSION,
                    "buildStatus": "ready",
                })
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_create_options_are_named() {
        let n: NewSandbox = serde_json::from_value(json!({
            "templateID": "base", "volumeMounts": [{"name": "v", "path": "/v"}]
        }))
        .unwrap();
        let ApiError(status, msg) = n.check().unwrap_err();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(msg.contains("volumeMounts"), "{msg}");
        let net: NewSandbox = serde_json::from_value(json!({
            "templateID": "base", "allow_internet_access": true, "network": {"allowOut": ["x.io"]}
        }))
        .unwrap();
        assert!(net.check().is_ok(), "the network is mapped, not refused");
        assert!(serde_json::from_value::<NewSandbox>(json!({"templateID": "b", "x": 1})).is_err());
        let ok: NewSandbox = serde_json::from_value(json!({
            "templateID": "b", "metadata": {}, "envVars": {}, "allow_internet_access": false
        }))
        .unwrap();
        assert!(ok.check().is_ok());
    }
}
