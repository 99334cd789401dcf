//! The file routes: `?path=` names the file in the guest (absolute).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;

use crate::daemon::Daemon;
use crate::daemon::error::DaemonError;
use crate::types::DirEntryInfo;

/// Largest file read in one answer: 1 GiB.
const MAX_READ: u64 = 1 << 30;

/// The `path` parameter, which must be absolute.
fn path(q: &BTreeMap<String, String>) -> Result<String, DaemonError> {
    let p = q
        .get("path")
        .ok_or_else(|| DaemonError::BadRequest("give the file's path as ?path=/...".into()))?;
    if !p.starts_with('/') {
        return Err(DaemonError::BadRequest(format!(
            "path {p:?} is not absolute"
        )));
    }
    Ok(p.clone())
}

pub async fn read(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Vec<u8>, DaemonError> {
    d.read_file(&id, path(&q)?, MAX_READ).await
}

/// `?mode=0644` (octal) sets the mode of a new file.
pub async fn write(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
    data: Bytes,
) -> Result<Json<serde_json::Value>, DaemonError> {
    let mode = match q.get("mode") {
        Some(m) => Some(
            u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| {
                    DaemonError::BadRequest(format!("mode {m:?} is not octal permission bits"))
                })?,
        ),
        None => None,
    };
    let n = d.write_file(&id, path(&q)?, data.to_vec(), mode).await?;
    Ok(Json(serde_json::json!({"bytes": n})))
}

/// `?recursive=true` removes a folder and what is in it.
pub async fn remove(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<StatusCode, DaemonError> {
    let recursive = q.get("recursive").is_some_and(|v| v == "true");
    d.remove_path(&id, path(&q)?, recursive).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Json<Vec<DirEntryInfo>>, DaemonError> {
    Ok(Json(d.list_dir(&id, path(&q)?).await?))
}
