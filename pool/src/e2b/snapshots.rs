//! E2B's snapshots over kilnd's ([`crate::daemon::snapshot`]): `POST /sandboxes/{id}/snapshots`
//! takes one (memory and filesystem) into a template of kind `snapshot` that `Sandbox.create`
//! starts new sandboxes from by its `snapshotID`; `GET /snapshots` lists them (by source sandbox
//! and name, paged); `DELETE /templates/{id}` removes one. A filesystem-only snapshot
//! (`memory: false`) is refused: every Kiln snapshot keeps memory, and one that did not would
//! have to cold-boot, which kilnd's sandboxes never do.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::rest::ApiError;
use super::state::E2b;
use crate::daemon::snapshot::SNAPSHOT_KIND;
use crate::types::{SandboxState, TemplateInfo};

type Result<T> = std::result::Result<T, ApiError>;

/// The most snapshots one page of `GET /snapshots` holds, and the default.
const PAGE_MAX: usize = 100;

/// `POST /sandboxes/{id}/snapshots`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotBody {
    name: Option<String>,
    memory: Option<bool>,
}

/// A snapshot as E2B shows it: its id is its name, which `Sandbox.create` takes as a template.
fn info(t: &TemplateInfo) -> Value {
    json!({"snapshotID": t.name, "names": [t.name]})
}

/// Takes a snapshot of sandbox `id`.
pub async fn create(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
    req: std::result::Result<Json<SnapshotBody>, JsonRejection>,
) -> Result<Response> {
    let req = match req {
        Ok(Json(v)) => v,
        Err(JsonRejection::MissingJsonContentType(_)) => SnapshotBody::default(),
        Err(e) => return Err(ApiError::bad(e.body_text())),
    };
    if req.memory == Some(false) {
        // The refusal E2B gives a team without filesystem-only snapshots, code and all, so the
        // SDK's documented handling (fall back to a full snapshot) applies.
        let body = json!({
            "code": 400,
            "error_code": "snapshot_filesystem_only_disabled",
            "message": "memory: false (a filesystem-only snapshot) is not served by kilnd: its \
                        snapshots always keep memory (mode \"full\")",
        });
        return Ok((StatusCode::BAD_REQUEST, Json(body)).into_response());
    }
    let sb = e2b
        .daemon
        .sandbox(&id)
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("sandbox {id} not found")))?;
    if sb.live().state == SandboxState::Paused {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is paused: connect to it before taking a snapshot"),
        ));
    }
    let t = e2b.daemon.snapshot(&id, req.name).await?;
    Ok((StatusCode::CREATED, Json(info(&t))).into_response())
}

/// Lists snapshots, optionally only those of `sandboxID` or matching `name` (a name, an id, or
/// either with a `:tag`, which kilnd's snapshots do not have and so is dropped).
pub async fn list(
    State(e2b): State<Arc<E2b>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Response> {
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=PAGE_MAX).contains(n))
            .ok_or_else(|| ApiError::bad(format!("limit {l:?} is not a number in 1..=100")))?,
        None => PAGE_MAX,
    };
    let offset = match q.get("nextToken") {
        Some(t) => t
            .parse::<usize>()
            .map_err(|_| ApiError::bad(format!("nextToken {t:?} was not given out by kilnd")))?,
        None => 0,
    };
    let name = q.get("name").map(|n| {
        let n = n.rsplit('/').next().unwrap_or(n);
        n.split(':').next().unwrap_or(n).to_string()
    });
    let all: Vec<Value> = e2b
        .daemon
        .snapshots()?
        .into_iter()
        .filter(|(_, source)| q.get("sandboxID").is_none_or(|s| s == source))
        .filter(|(t, _)| name.as_ref().is_none_or(|n| *n == t.name || *n == t.id))
        .map(|(t, _)| info(&t))
        .collect();
    let page: Vec<Value> = all.iter().skip(offset).take(limit).cloned().collect();
    let mut resp = Json(page).into_response();
    if offset + limit < all.len()
        && let Ok(t) = HeaderValue::from_str(&(offset + limit).to_string())
    {
        resp.headers_mut().insert("x-next-token", t);
    }
    Ok(resp)
}

/// `DELETE /templates/{id}`: removes a snapshot (E2B's `Sandbox.delete_snapshot`); built
/// templates are removed with `kiln template rm`.
pub async fn delete(State(e2b): State<Arc<E2b>>, Path(id): Path<String>) -> Result<StatusCode> {
    let name = id.split(':').next().unwrap_or(&id).to_string();
    let t = e2b
        .daemon
        .template_info(&name)
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("snapshot {id} not found")))?;
    if t.kind != SNAPSHOT_KIND {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "{id} is a built template; deleting those through the E2B API is not served: \
                 use `kiln template rm`"
            ),
        ));
    }
    e2b.daemon.remove_template(&t.name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_name_and_memory_only() {
        let b: SnapshotBody = serde_json::from_value(json!({"name": "s", "memory": true})).unwrap();
        assert_eq!((b.name.as_deref(), b.memory), (Some("s"), Some(true)));
        assert!(serde_json::from_value::<SnapshotBody>(json!({"mode": "full"})).is_err());
    }
}
