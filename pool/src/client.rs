//! A blocking client for kilnd's API, on its Unix socket or on its TCP listener (`kilnd --listen`,
//! with the bearer token), for the `kiln` CLI and tests: one request per connection, JSON in, JSON (or a stream of JSON lines, or bytes) out. Answers with
//! an error status become [`ClientError::Api`] carrying the daemon's message.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::types::{
    BuildEvent, CreateSandbox, DirEntryInfo, ErrorBody, ExecEvent, ExecRequest, ForkRequest,
    PoolSettings, SandboxInfo, SnapshotRequest, TemplateInfo, TimeoutRequest,
};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// kilnd's socket could not be reached.
    #[error("cannot reach kilnd at {at}: {err} (is kilnd running? start it with `kilnd`)")]
    Connect {
        /// The socket's path or the listener's URL.
        at: String,
        /// Why.
        err: std::io::Error,
    },
    /// A kilnd URL that is not `http://HOST:PORT`.
    #[error("kilnd URL {0:?} is not http://HOST:PORT (kilnd --listen serves plain HTTP)")]
    Url(String),
    /// The connection failed mid-way.
    #[error("talking to kilnd: {0}")]
    Io(#[from] std::io::Error),
    /// kilnd answered something that is not its API.
    #[error("kilnd answered something unexpected: {0}")]
    Protocol(String),
    /// kilnd refused: the HTTP status and its message.
    #[error("{message}")]
    Api {
        /// The status.
        status: u16,
        /// kilnd's `error`.
        message: String,
    },
}

/// A response being read: status and a body reader (chunked or not).
struct Response {
    status: u16,
    body: Box<dyn BufRead>,
}

/// Reads a chunked body as a plain stream.
struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.inner.read_line(&mut line)?;
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = usize::from_str_radix(size, 16).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad chunk size {size:?}"),
                )
            })?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n;
        if self.left == 0 {
            let mut crlf = String::new();
            self.inner.read_line(&mut crlf)?;
        }
        Ok(n)
    }
}

/// Where kilnd listens.
#[derive(Debug, Clone)]
enum Endpoint {
    /// Its Unix socket.
    Unix(PathBuf),
    /// Its TCP listener: `HOST:PORT` and the bearer token.
    Tcp { addr: String, token: String },
}

/// A connection to kilnd, either kind.
trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// kilnd's API.
#[derive(Debug, Clone)]
pub struct Kilnd {
    endpoint: Endpoint,
}

impl Kilnd {
    /// A client for the daemon listening on `socket`.
    pub fn new(socket: impl AsRef<Path>) -> Kilnd {
        Kilnd {
            endpoint: Endpoint::Unix(socket.as_ref().into()),
        }
    }

    /// A client for the daemon's TCP listener at `url` (`http://HOST:PORT`, as `kilnd --listen`
    /// serves), sending `token` as the bearer token.
    pub fn tcp(url: &str, token: impl Into<String>) -> Result<Kilnd, ClientError> {
        let addr = url
            .strip_prefix("http://")
            .map(|r| r.trim_end_matches('/'))
            .filter(|a| {
                a.rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            })
            .ok_or_else(|| ClientError::Url(url.into()))?;
        Ok(Kilnd {
            endpoint: Endpoint::Tcp {
                addr: addr.into(),
                token: token.into(),
            },
        })
    }

    fn connect(&self) -> Result<(Box<dyn Stream>, String), ClientError> {
        Ok(match &self.endpoint {
            Endpoint::Unix(path) => {
                let s = UnixStream::connect(path).map_err(|err| ClientError::Connect {
                    at: path.display().to_string(),
                    err,
                })?;
                (Box::new(s), String::new())
            }
            Endpoint::Tcp { addr, token } => {
                let s = TcpStream::connect(addr.as_str()).map_err(|err| ClientError::Connect {
                    at: format!("http://{addr}"),
                    err,
                })?;
                let _ = s.set_nodelay(true);
                (Box::new(s), format!("Authorization: Bearer {token}\r\n"))
            }
        })
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<Response, ClientError> {
        let (mut stream, auth) = self.connect()?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: kilnd\r\nConnection: close\r\n{auth}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::Protocol(format!("status line {line:?}")))?;
        let (mut chunked, mut length) = (false, None);
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(ClientError::Protocol(
                    "the answer's head was cut short".into(),
                ));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                } else if k == "content-length" {
                    length = v.parse::<u64>().ok();
                }
            }
        }
        let body: Box<dyn BufRead> = if chunked {
            Box::new(BufReader::new(Chunked {
                inner: reader,
                left: 0,
                done: false,
            }))
        } else {
            match length {
                Some(n) => Box::new(BufReader::new(reader.take(n))),
                None => Box::new(reader),
            }
        };
        let mut resp = Response { status, body };
        if resp.status >= 400 {
            let mut text = String::new();
            resp.body.read_to_string(&mut text)?;
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            return Err(ClientError::Api {
                status: resp.status,
                message,
            });
        }
        Ok(resp)
    }

    fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let bytes = body
            .map(|b| serde_json::to_vec(b).unwrap_or_default())
            .unwrap_or_default();
        let mut resp = self.send(method, path, "application/json", &bytes)?;
        let mut text = Vec::new();
        resp.body.read_to_end(&mut text)?;
        serde_json::from_slice(&text)
            .map_err(|e| ClientError::Protocol(format!("{method} {path}: {e}")))
    }

    fn empty(&self, method: &str, path: &str) -> Result<(), ClientError> {
        let mut resp = self.send(method, path, "application/json", b"")?;
        std::io::copy(&mut resp.body, &mut std::io::sink())?;
        Ok(())
    }

    /// Calls `each` with every JSON line of a streamed answer.
    fn lines<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
        mut each: impl FnMut(T),
    ) -> Result<(), ClientError> {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        let mut resp = self.send("POST", path, "application/json", &bytes)?;
        let mut line = String::new();
        loop {
            line.clear();
            if resp.body.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line.trim().is_empty() {
                continue;
            }
            let item = serde_json::from_str(line.trim())
                .map_err(|e| ClientError::Protocol(format!("{path}: {e}: {line:?}")))?;
            each(item);
        }
    }

    /// Builds a template from `spec` (paths absolute), passing each progress event to `each`;
    /// returns the last event (`Done` or `Failed`).
    pub fn build(
        &self,
        spec: &crate::template::spec::Spec,
        mut each: impl FnMut(&BuildEvent),
    ) -> Result<BuildEvent, ClientError> {
        let mut last = None;
        self.lines("/templates", spec, |ev: BuildEvent| {
            each(&ev);
            last = Some(ev);
        })?;
        last.ok_or_else(|| ClientError::Protocol("the build ended without a result".into()))
    }

    /// Every template.
    pub fn templates(&self) -> Result<Vec<TemplateInfo>, ClientError> {
        self.json("GET", "/templates", None::<&()>)
    }

    /// Removes template `name`.
    pub fn remove_template(&self, name: &str) -> Result<(), ClientError> {
        self.empty("DELETE", &format!("/templates/{name}"))
    }

    /// Sets template `name`'s warm pool.
    pub fn set_pool(&self, name: &str, p: &PoolSettings) -> Result<TemplateInfo, ClientError> {
        self.json("PUT", &format!("/templates/{name}/pool"), Some(p))
    }

    /// Creates a sandbox.
    pub fn create(&self, req: &CreateSandbox) -> Result<SandboxInfo, ClientError> {
        self.json("POST", "/sandboxes", Some(req))
    }

    /// Every sandbox.
    pub fn sandboxes(&self) -> Result<Vec<SandboxInfo>, ClientError> {
        self.json("GET", "/sandboxes", None::<&()>)
    }

    /// Sandbox `id`.
    pub fn sandbox(&self, id: &str) -> Result<SandboxInfo, ClientError> {
        self.json("GET", &format!("/sandboxes/{id}"), None::<&()>)
    }

    /// Kills sandbox `id`.
    pub fn kill(&self, id: &str) -> Result<(), ClientError> {
        self.empty("DELETE", &format!("/sandboxes/{id}"))
    }

    /// Runs a command, passing each event to `each`; returns the last one (`Exit` or `Error`).
    pub fn exec(
        &self,
        id: &str,
        req: &ExecRequest,
        mut each: impl FnMut(&ExecEvent),
    ) -> Result<ExecEvent, ClientError> {
        let mut last = None;
        self.lines(&format!("/sandboxes/{id}/exec"), req, |ev: ExecEvent| {
            each(&ev);
            last = Some(ev);
        })?;
        last.ok_or_else(|| {
            ClientError::Protocol("the command's answer ended without a result".into())
        })
    }

    /// Reads a file.
    pub fn read_file(&self, id: &str, path: &str) -> Result<Vec<u8>, ClientError> {
        let mut resp = self.send(
            "GET",
            &format!("/sandboxes/{id}/files?path={}", encode(path)),
            "application/json",
            b"",
        )?;
        let mut out = Vec::new();
        resp.body.read_to_end(&mut out)?;
        Ok(out)
    }

    /// Writes a file.
    pub fn write_file(&self, id: &str, path: &str, data: &[u8]) -> Result<(), ClientError> {
        let mut resp = self.send(
            "PUT",
            &format!("/sandboxes/{id}/files?path={}", encode(path)),
            "application/octet-stream",
            data,
        )?;
        std::io::copy(&mut resp.body, &mut std::io::sink())?;
        Ok(())
    }

    /// Lists a folder.
    pub fn list_dir(&self, id: &str, path: &str) -> Result<Vec<DirEntryInfo>, ClientError> {
        self.json(
            "GET",
            &format!("/sandboxes/{id}/dir?path={}", encode(path)),
            None::<&()>,
        )
    }

    /// Pauses sandbox `id` to disk.
    pub fn pause(&self, id: &str) -> Result<SandboxInfo, ClientError> {
        self.json("POST", &format!("/sandboxes/{id}/pause"), None::<&()>)
    }

    /// Resumes sandbox `id`.
    pub fn resume(&self, id: &str) -> Result<SandboxInfo, ClientError> {
        self.json("POST", &format!("/sandboxes/{id}/resume"), None::<&()>)
    }

    /// Forks sandbox `id` `count` times.
    pub fn fork(&self, id: &str, count: u32) -> Result<Vec<SandboxInfo>, ClientError> {
        self.json(
            "POST",
            &format!("/sandboxes/{id}/fork"),
            Some(&ForkRequest { count }),
        )
    }

    /// Snapshots sandbox `id` into a template named `name` (or a made-up name); it runs on.
    pub fn snapshot(&self, id: &str, name: Option<&str>) -> Result<TemplateInfo, ClientError> {
        self.json(
            "POST",
            &format!("/sandboxes/{id}/snapshot"),
            Some(&SnapshotRequest {
                name: name.map(str::to_string),
            }),
        )
    }

    /// Sets sandbox `id`'s lifetime to `timeout_s` from now.
    pub fn set_timeout(&self, id: &str, timeout_s: u64) -> Result<SandboxInfo, ClientError> {
        self.json(
            "POST",
            &format!("/sandboxes/{id}/timeout"),
            Some(&TimeoutRequest { timeout_s }),
        )
    }

    /// The Prometheus metrics page.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let mut resp = self.send("GET", "/metrics", "text/plain", b"")?;
        let mut text = String::new();
        resp.body.read_to_string(&mut text)?;
        Ok(text)
    }
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_read_as_one_stream() {
        let wire = b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n";
        let mut r = Chunked {
            inner: &wire[..],
            left: 0,
            done: false,
        };
        let mut out = String::new();
        r.read_to_string(&mut out).unwrap();
        assert_eq!(out, "hello, world");
        let bad = b"zz\r\n";
        let mut r = Chunked {
            inner: &bad[..],
            left: 0,
            done: false,
        };
        assert!(r.read_to_string(&mut String::new()).is_err());
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("/tmp/a b&c=d"), "/tmp/a%20b%26c%3Dd");
    }
}
