//! The sandbox routes.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::ndjson;
use crate::daemon::Daemon;
use crate::daemon::error::DaemonError;
use crate::types::{
    CreateSandbox, ExecRequest, ForkRequest, SandboxInfo, SnapshotRequest, TemplateInfo,
    TimeoutRequest,
};

/// A JSON body that failed to parse becomes a 400 naming what was wrong.
fn body<T>(b: Result<Json<T>, axum::extract::rejection::JsonRejection>) -> Result<T, DaemonError> {
    b.map(|Json(v)| v)
        .map_err(|e| DaemonError::BadRequest(e.body_text()))
}

pub async fn create(
    State(d): State<Arc<Daemon>>,
    req: Result<Json<CreateSandbox>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, DaemonError> {
    let info = d.create(body(req)?).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// `?template=NAME&state=running|paused&metadata.KEY=VALUE` filters.
pub async fn list(
    State(d): State<Arc<Daemon>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Json<Vec<SandboxInfo>>, DaemonError> {
    for k in q.keys() {
        if !(k == "template" || k == "state" || k.starts_with("metadata.")) {
            return Err(DaemonError::BadRequest(format!(
                "unknown filter {k:?}: use template, state or metadata.KEY"
            )));
        }
    }
    let list = d
        .all_sandboxes()
        .iter()
        .map(|s| s.info())
        .filter(|i| q.get("template").is_none_or(|t| &i.template == t))
        .filter(|i| q.get("state").is_none_or(|s| i.state.as_str() == s))
        .filter(|i| {
            q.iter()
                .filter_map(|(k, v)| k.strip_prefix("metadata.").map(|k| (k, v)))
                .all(|(k, v)| i.metadata.get(k) == Some(v))
        })
        .collect();
    Ok(Json(list))
}

pub async fn get(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<Json<SandboxInfo>, DaemonError> {
    Ok(Json(d.sandbox(&id)?.info()))
}

pub async fn kill(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<StatusCode, DaemonError> {
    d.kill(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn exec(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    req: Result<Json<ExecRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, DaemonError> {
    let rx = d.exec(&id, body(req)?)?;
    Ok(ndjson(rx))
}

pub async fn pause(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<Json<SandboxInfo>, DaemonError> {
    Ok(Json(d.pause(&id).await?))
}

pub async fn resume(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<Json<SandboxInfo>, DaemonError> {
    Ok(Json(d.resume(&id).await?))
}

pub async fn fork(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    req: Result<Json<ForkRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, DaemonError> {
    let forks = d.fork(&id, body(req)?.count).await?;
    Ok((StatusCode::CREATED, Json(forks)).into_response())
}

/// Snapshots the sandbox into a template of kind `snapshot` (it runs on).
pub async fn snapshot(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    req: Result<Json<SnapshotRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, DaemonError> {
    let t: TemplateInfo = d.snapshot(&id, body(req)?.name).await?;
    Ok((StatusCode::CREATED, Json(t)).into_response())
}

pub async fn timeout(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    req: Result<Json<TimeoutRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<SandboxInfo>, DaemonError> {
    Ok(Json(d.set_timeout(&id, body(req)?.timeout_s)?))
}
