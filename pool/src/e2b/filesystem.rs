//! envd's `filesystem.Filesystem` service over the agent: stat, make a directory, move, list (to a
//! depth), remove. Paths are the guest's (relative ones from the user's home); new directories
//! belong to the user. Watching is not served: the agent has no inotify yet, so those methods
//! answer `unimplemented` and say so.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use kiln_agent::client::Client;
use kiln_agent::protocol::{FileKind, FileStat, MkdirSpec};

use super::connect::{Code, Codec, ConnectError, check_encoding, read_unary};
use super::envd::{Envd, agent_error};
use super::process::blocking;
use super::proto::filesystem::{
    EntryInfo, FileType, ListDirRequest, ListDirResponse, MakeDirRequest, MakeDirResponse,
    MoveRequest, MoveResponse, RemoveRequest, RemoveResponse, StatRequest, StatResponse,
};
use super::state::E2b;

/// Most entries one `ListDir` returns, whatever the depth.
const MAX_ENTRIES: usize = 100_000;

/// `POST /filesystem.Filesystem/{method}`.
pub async fn call(
    State(e2b): State<Arc<E2b>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let streaming = method == "WatchDir";
    let codec = match Codec::of(&headers, streaming) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    if let Err(e) = check_encoding(&headers, streaming) {
        return e.into_response();
    }
    let envd = match Envd::from_request(&e2b, &headers, None).await {
        Ok(envd) => envd,
        Err(refusal) => return refusal.into_response(),
    };
    let result = match method.as_str() {
        "Stat" => stat(envd, body, codec).await,
        "MakeDir" => make_dir(envd, body, codec).await,
        "Move" => move_path(envd, body, codec).await,
        "ListDir" => list_dir(envd, body, codec).await,
        "Remove" => remove(envd, body, codec).await,
        "WatchDir" | "CreateWatcher" | "GetWatcherEvents" | "RemoveWatcher" => {
            let e = ConnectError::new(
                Code::Unimplemented,
                format!(
                    "filesystem.Filesystem/{method}: watching directories is not served by kilnd \
                     (its guest agent has no inotify yet)"
                ),
            );
            if streaming {
                return super::connect::stream_error::<super::proto::filesystem::WatchDirResponse>(
                    codec, e,
                );
            }
            Err(e)
        }
        other => Err(ConnectError::new(
            Code::Unimplemented,
            format!("filesystem.Filesystem/{other} is not a method kilnd serves"),
        )),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `ls -l`'s permission string for mode bits of kind `kind` (Go's `FileMode.String()`, which
/// envd reports).
pub fn permissions(kind: FileKind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        FileKind::Dir => 'd',
        FileKind::Symlink => 'L',
        _ => '-',
    });
    for (bit, c) in [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ] {
        s.push(if mode & bit != 0 { c } else { '-' });
    }
    s
}

/// envd's entry for `path` described by `st`.
pub fn entry(path: &str, st: &FileStat) -> EntryInfo {
    let name = path.rsplit('/').next().unwrap_or("").to_string();
    let is_symlink = st.symlink_target.is_some() || st.kind == FileKind::Symlink;
    let kind = match st.kind {
        FileKind::File => FileType::File,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Other => FileType::Unspecified,
    };
    EntryInfo {
        name: if path == "/" { "/".into() } else { name },
        r#type: kind as i32,
        path: path.to_string(),
        size: st.size as i64,
        mode: st.mode,
        permissions: permissions(st.kind, st.mode),
        owner: st.owner.clone().unwrap_or_else(|| st.uid.to_string()),
        group: st.group.clone().unwrap_or_else(|| st.gid.to_string()),
        modified_time: Some(pbjson_types::Timestamp {
            seconds: st.mtime,
            nanos: 0,
        }),
        symlink_target: st.symlink_target.clone(),
        metadata: Default::default(),
        is_symlink,
    }
}

fn stat_entry(client: &Client, path: &str) -> Result<EntryInfo, ConnectError> {
    let st = client.stat(path).map_err(agent_error)?;
    Ok(entry(path, &st))
}

async fn stat(envd: Envd, body: Body, codec: Codec) -> Result<Response, ConnectError> {
    let req: StatRequest = read_unary(body, codec).await?;
    let path = envd.path(&req.path)?;
    let client = envd.client;
    let entry = blocking(move || stat_entry(&client, &path)).await?;
    Ok(codec.unary(&StatResponse { entry: Some(entry) }))
}

async fn make_dir(envd: Envd, body: Body, codec: Codec) -> Result<Response, ConnectError> {
    let req: MakeDirRequest = read_unary(body, codec).await?;
    let path = envd.path(&req.path)?;
    let (client, owner) = (envd.client, envd.user_spec);
    let entry = blocking(move || {
        client
            .mkdir(MkdirSpec {
                path: path.clone(),
                parents: true,
                mode: None,
                owner: Some(owner),
            })
            .map_err(agent_error)?;
        stat_entry(&client, &path)
    })
    .await?;
    Ok(codec.unary(&MakeDirResponse { entry: Some(entry) }))
}

async fn move_path(envd: Envd, body: Body, codec: Codec) -> Result<Response, ConnectError> {
    let req: MoveRequest = read_unary(body, codec).await?;
    let (from, to) = (envd.path(&req.source)?, envd.path(&req.destination)?);
    let client = envd.client;
    let entry = blocking(move || {
        client.rename(&from, &to).map_err(agent_error)?;
        stat_entry(&client, &to)
    })
    .await?;
    Ok(codec.unary(&MoveResponse { entry: Some(entry) }))
}

async fn list_dir(envd: Envd, body: Body, codec: Codec) -> Result<Response, ConnectError> {
    let req: ListDirRequest = read_unary(body, codec).await?;
    let root = envd.path(&req.path)?;
    let depth = req.depth.max(1);
    let client = envd.client;
    let entries = blocking(move || {
        let st = client.stat(&root).map_err(agent_error)?;
        if st.kind != FileKind::Dir {
            return Err(ConnectError::new(
                Code::InvalidArgument,
                format!("path {root} is not a directory"),
            ));
        }
        let mut out = Vec::new();
        let mut level = vec![root];
        for _ in 0..depth {
            let mut next = Vec::new();
            for dir in level {
                for e in client.list_dir(&dir).map_err(agent_error)? {
                    let path = if dir == "/" {
                        format!("/{}", e.name)
                    } else {
                        format!("{dir}/{}", e.name)
                    };
                    // Links are listed, not walked through.
                    if e.stat.kind == FileKind::Dir {
                        next.push(path.clone());
                    }
                    out.push(entry(&path, &e.stat));
                    if out.len() > MAX_ENTRIES {
                        return Err(ConnectError::new(
                            Code::ResourceExhausted,
                            format!(
                                "the listing is over {MAX_ENTRIES} entries: ask for less depth"
                            ),
                        ));
                    }
                }
            }
            level = next;
        }
        Ok(out)
    })
    .await?;
    Ok(codec.unary(&ListDirResponse { entries }))
}

async fn remove(envd: Envd, body: Body, codec: Codec) -> Result<Response, ConnectError> {
    let req: RemoveRequest = read_unary(body, codec).await?;
    let path = envd.path(&req.path)?;
    if path == "/" {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            "removing / is refused",
        ));
    }
    let client = envd.client;
    blocking(move || client.remove(&path, true).map_err(agent_error)).await?;
    Ok(codec.unary(&RemoveResponse {}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_read_like_ls() {
        assert_eq!(permissions(FileKind::File, 0o644), "-rw-r--r--");
        assert_eq!(permissions(FileKind::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(permissions(FileKind::Symlink, 0o777), "Lrwxrwxrwx");
    }
}
