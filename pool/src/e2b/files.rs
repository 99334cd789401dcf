//! envd's `/files`: `GET` downloads a file, `POST` uploads (multipart with one `file` part per
//! file, the part's file name its path unless `?path=` names it; or the raw body as
//! `application/octet-stream`, gzip-encoded or not). Bytes stream through in both directions
//! against the agent's flow control, so a 2 GiB upload passes through a few hundred KiB of kilnd's
//! memory, and a download the client abandons stops the agent's read.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use kiln_agent::client::{Client, Error as AgentError, WriteOptions};
use kiln_agent::protocol::{ErrorKind, FileKind};
use tokio::sync::mpsc;

use super::envd::{Envd, http_error};
use super::state::E2b;

/// The HTTP answer for an agent failure, in envd's shape.
fn agent_http(e: AgentError) -> Response {
    let status = match &e {
        AgentError::Agent { kind, errno, .. } => match kind {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorKind::BadRequest
            | ErrorKind::IsADirectory
            | ErrorKind::NotADirectory
            | ErrorKind::DirectoryNotEmpty
            | ErrorKind::AlreadyExists => StatusCode::BAD_REQUEST,
            _ if *errno == Some(libc::ENOSPC) => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        },
        AgentError::Closed(_) | AgentError::Connect { .. } => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let message = match e {
        AgentError::Agent { message, .. } => message,
        other => other.to_string(),
    };
    http_error(status, message)
}

fn query_path(envd: &Envd, q: &HashMap<String, String>) -> Result<Option<String>, Response> {
    match q.get("path").filter(|p| !p.is_empty()) {
        None => Ok(None),
        Some(p) => envd
            .path(p)
            .map(Some)
            .map_err(|e| http_error(StatusCode::BAD_REQUEST, e.message)),
    }
}

/// Hands bytes written on a blocking thread to an async body.
struct ChannelWriter(mpsc::Sender<Result<Bytes, io::Error>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads, on a blocking thread, bytes an async task receives; an error item (the client's
/// upload broke off) fails the read, so a cut upload never passes for a whole file.
struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// `GET /files?path=P[&username=U]`.
pub async fn download(
    State(e2b): State<Arc<E2b>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let envd = match Envd::from_request(&e2b, &headers, q.get("username").map(String::as_str)).await
    {
        Ok(envd) => envd,
        Err(refusal) => return refusal.into_response(),
    };
    let path = match query_path(&envd, &q) {
        Ok(Some(p)) => p,
        Ok(None) => return http_error(StatusCode::BAD_REQUEST, "give the file as ?path="),
        Err(resp) => return resp,
    };
    let client = envd.client.clone();
    let p = path.clone();
    let st = match tokio::task::spawn_blocking(move || client.stat(&p)).await {
        Ok(Ok(st)) => st,
        Ok(Err(e)) => return agent_http(e),
        Err(e) => return http_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if st.kind == FileKind::Dir {
        return http_error(
            StatusCode::BAD_REQUEST,
            format!("path {path} is a directory"),
        );
    }
    let (tx, rx) = mpsc::channel(8);
    let client = envd.client;
    let guard = e2b.stream_guard();
    tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let err_tx = tx.clone();
        if let Err(e) = client.read_file(&path, ChannelWriter(tx)) {
            // Cut the body short so the client sees the failure, not a short file.
            let _ = err_tx.blocking_send(Err(io::Error::other(e.to_string())));
        }
    });
    let mut resp = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// Writes what `rx` receives to `path` in the guest, owned by `owner`, on a blocking thread.
fn spawn_writer(
    client: Client,
    path: String,
    owner: String,
    gzip: bool,
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
) -> tokio::task::JoinHandle<Result<u64, AgentError>> {
    tokio::task::spawn_blocking(move || {
        let options = WriteOptions {
            owner: Some(owner),
            ..WriteOptions::default()
        };
        let reader = ChannelReader {
            rx,
            cur: Bytes::new(),
        };
        if gzip {
            client.write_file(&path, flate2::read::GzDecoder::new(reader), options)
        } else {
            client.write_file(&path, reader, options)
        }
    })
}

/// What the writer's end of one file says.
async fn finish(
    writer: tokio::task::JoinHandle<Result<u64, AgentError>>,
    path: &str,
) -> Result<serde_json::Value, Response> {
    match writer.await {
        Ok(Ok(_)) => Ok(serde_json::json!({
            "name": path.rsplit('/').next().unwrap_or(""),
            "type": "file",
            "path": path,
        })),
        Ok(Err(e)) => Err(agent_http(e)),
        Err(e) => Err(http_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// `POST /files[?path=P][&username=U]`.
pub async fn upload(
    State(e2b): State<Arc<E2b>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Body,
) -> Response {
    let envd = match Envd::from_request(&e2b, &headers, q.get("username").map(String::as_str)).await
    {
        Ok(envd) => envd,
        Err(refusal) => return refusal.into_response(),
    };
    let query_path = match query_path(&envd, &q) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let _guard = e2b.stream_guard();
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let gzip = match headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
    {
        None | Some("identity") => false,
        Some("gzip") => true,
        Some(other) => {
            return http_error(
                StatusCode::BAD_REQUEST,
                format!("content-encoding {other:?} is not supported (gzip is)"),
            );
        }
    };
    let mut written = Vec::new();
    if ct.starts_with("multipart/form-data") {
        if gzip {
            return http_error(
                StatusCode::BAD_REQUEST,
                "a multipart upload cannot be gzip-encoded: send application/octet-stream",
            );
        }
        let boundary = match multer::parse_boundary(&ct) {
            Ok(b) => b,
            Err(e) => return http_error(StatusCode::BAD_REQUEST, format!("content-type: {e}")),
        };
        let mut parts = multer::Multipart::new(body.into_data_stream(), boundary);
        loop {
            let mut field = match parts.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return http_error(StatusCode::BAD_REQUEST, format!("multipart: {e}")),
            };
            if field.name() != Some("file") {
                return http_error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "multipart part {:?} is not a \"file\" part",
                        field.name().unwrap_or("")
                    ),
                );
            }
            let path = match (&query_path, field.file_name()) {
                (Some(p), _) if written.is_empty() => p.clone(),
                (Some(_), _) => {
                    return http_error(
                        StatusCode::BAD_REQUEST,
                        "with ?path= upload one file; name each file by its part's filename",
                    );
                }
                (None, Some(name)) if !name.is_empty() => match envd.path(name) {
                    Ok(p) => p,
                    Err(e) => return http_error(StatusCode::BAD_REQUEST, e.message),
                },
                (None, _) => {
                    return http_error(
                        StatusCode::BAD_REQUEST,
                        "give ?path= or a filename on the file part",
                    );
                }
            };
            let (tx, rx) = mpsc::channel(4);
            let writer = spawn_writer(
                envd.client.clone(),
                path.clone(),
                envd.user_spec.clone(),
                false,
                rx,
            );
            loop {
                match field.chunk().await {
                    Ok(Some(chunk)) => {
                        if tx.send(Ok(chunk)).await.is_err() {
                            break; // The writer failed; its error is below.
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx
                            .send(Err(io::Error::other(format!("multipart: {e}"))))
                            .await;
                        drop(tx);
                        let _ = writer.await;
                        return http_error(StatusCode::BAD_REQUEST, format!("multipart: {e}"));
                    }
                }
            }
            drop(tx);
            match finish(writer, &path).await {
                Ok(v) => written.push(v),
                Err(resp) => return resp,
            }
        }
        if written.is_empty() {
            return http_error(StatusCode::BAD_REQUEST, "the upload holds no \"file\" part");
        }
    } else if ct.is_empty() || ct.starts_with("application/octet-stream") {
        let Some(path) = query_path else {
            return http_error(
                StatusCode::BAD_REQUEST,
                "an octet-stream upload needs ?path=",
            );
        };
        let (tx, rx) = mpsc::channel(4);
        let writer = spawn_writer(
            envd.client.clone(),
            path.clone(),
            envd.user_spec.clone(),
            gzip,
            rx,
        );
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    if tx.send(Ok(chunk)).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(io::Error::other(format!("the upload broke off: {e}"))))
                        .await;
                    drop(tx);
                    let _ = writer.await;
                    return http_error(StatusCode::BAD_REQUEST, format!("reading the upload: {e}"));
                }
            }
        }
        drop(tx);
        match finish(writer, &path).await {
            Ok(v) => written.push(v),
            Err(resp) => return resp,
        }
    } else {
        return http_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content-type {ct:?}: send multipart/form-data or application/octet-stream"),
        );
    }
    axum::Json(serde_json::Value::Array(written)).into_response()
}
