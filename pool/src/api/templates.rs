//! The template routes.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::ndjson;
use crate::daemon::Daemon;
use crate::daemon::error::DaemonError;
use crate::template::spec::Spec;
use crate::types::{BuildEvent, PoolSettings, TemplateInfo};

/// Builds the spec in the body (JSON, paths absolute); the answer streams the build's progress,
/// its last line `done` or `failed`.
pub async fn build(
    State(d): State<Arc<Daemon>>,
    spec: Result<Json<Spec>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, DaemonError> {
    let Json(spec) = spec.map_err(|e| DaemonError::BadRequest(e.body_text()))?;
    spec.validate()
        .map_err(|e| DaemonError::BadRequest(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        let last = match d.build_template(spec, tx.clone()).await {
            Ok((template, cached)) => BuildEvent::Done { template, cached },
            Err(e) => BuildEvent::Failed {
                message: e.to_string(),
            },
        };
        let _ = tx.send(last).await;
    });
    Ok(ndjson(rx))
}

pub async fn list(State(d): State<Arc<Daemon>>) -> Result<Json<Vec<TemplateInfo>>, DaemonError> {
    Ok(Json(d.templates()?))
}

pub async fn get(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<Json<TemplateInfo>, DaemonError> {
    Ok(Json(d.template_info(&name)?))
}

pub async fn remove(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<StatusCode, DaemonError> {
    d.remove_template(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn pool(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    p: Result<Json<PoolSettings>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<TemplateInfo>, DaemonError> {
    let Json(p) = p.map_err(|e| DaemonError::BadRequest(e.body_text()))?;
    Ok(Json(d.set_pool(&name, &p).await?))
}
