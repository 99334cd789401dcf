//! A small blocking client for the API socket, for tests and the `kiln` CLI: send a method, a
//! path and a JSON body, get the status code and the body back.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest response head the client accepts; Kiln's are a few hundred bytes.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to API socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Sending or receiving failed.
    #[error("API socket I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The answer is not the HTTP the server speaks.
    #[error("bad response from the API socket: {0}")]
    BadResponse(String),
}

/// One connection to the API socket, kept alive across requests.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    /// Connects to the socket at `socket_path`.
    pub fn connect(socket_path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = socket_path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            stream,
            buf: Vec::new(),
        })
    }

    /// Gives up on reads and writes that take longer than `timeout` (none by default).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream.set_read_timeout(timeout)?;
        self.stream.set_write_timeout(timeout)?;
        Ok(())
    }

    /// Sends one request on this connection and returns the status code and body.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), ClientError> {
        self.send(method, path, body, false)
    }

    fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
        close: bool,
    ) -> Result<(u16, String), ClientError> {
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
        if close {
            request.push_str("Connection: close\r\n");
        }
        if let Some(body) = body {
            request.push_str("Content-Type: application/json\r\n");
            request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        } else {
            request.push_str("\r\n");
        }
        // The server may refuse (an oversized request, say) and close before reading it all;
        // its answer is still worth reading, so a failed write only matters if none comes.
        let written = self.stream.write_all(request.as_bytes());
        match (self.read_response(), written) {
            (Ok(answer), _) => Ok(answer),
            (Err(_), Err(e)) => Err(e.into()),
            (Err(e), Ok(())) => Err(e),
        }
    }

    fn read_response(&mut self) -> Result<(u16, String), ClientError> {
        loop {
            let head_end = self.read_head()?;
            let head = std::str::from_utf8(&self.buf[..head_end])
                .map_err(|_| ClientError::BadResponse("head is not UTF-8".into()))?;
            let (status, content_length) = parse_response_head(head)?;
            if (100..200).contains(&status) {
                self.buf.drain(..head_end);
                continue;
            }
            let content_length = if status == 204 {
                0
            } else {
                content_length.unwrap_or(0)
            };
            let total = head_end + content_length;
            while self.buf.len() < total {
                if self.fill()? == 0 {
                    return Err(ClientError::BadResponse("body cut short".into()));
                }
            }
            let body = String::from_utf8(self.buf[head_end..total].to_vec())
                .map_err(|_| ClientError::BadResponse("body is not UTF-8".into()))?;
            self.buf.drain(..total);
            return Ok((status, body));
        }
    }

    /// Reads until a whole response head is buffered; returns where it ends.
    fn read_head(&mut self) -> Result<usize, ClientError> {
        loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok(p + 4);
            }
            if self.buf.len() > MAX_RESPONSE_HEAD {
                return Err(ClientError::BadResponse("head too large".into()));
            }
            if self.fill()? == 0 {
                return Err(ClientError::BadResponse(
                    "connection closed before a response".into(),
                ));
            }
        }
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 4096];
        let n = loop {
            match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }
}

/// The status code and Content-Length of a response head (final blank line included).
fn parse_response_head(head: &str) -> Result<(u16, Option<usize>), ClientError> {
    let bad = || ClientError::BadResponse(format!("{:?}", head.lines().next().unwrap_or("")));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(bad());
    }
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let mut content_length = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            let len = value.trim().parse().map_err(|_| {
                ClientError::BadResponse(format!("Content-Length {:?}", value.trim()))
            })?;
            content_length = Some(len);
        }
    }
    Ok((status, content_length))
}

/// How long [`request`] waits for the VMM: generous, since a snapshot of a large VM takes a while,
/// but finite, so a VMM that stopped answering is reported instead of waited on forever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Sends one request on a fresh connection (closed afterwards) and returns the status code and
/// body. `body` is JSON text, or `None` for requests without one. Gives up after
/// [`REQUEST_TIMEOUT`].
pub fn request(
    socket_path: impl AsRef<Path>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), ClientError> {
    let mut client = Client::connect(socket_path)?;
    client.set_timeout(Some(REQUEST_TIMEOUT))?;
    client.send(method, path, body, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads() {
        let h = "HTTP/1.1 400 Bad Request\r\nContent-Length: 22\r\n\r\n";
        assert_eq!(parse_response_head(h).unwrap(), (400, Some(22)));
        let h = "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";
        assert_eq!(parse_response_head(h).unwrap(), (204, None));
        assert!(parse_response_head("SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response_head("HTTP/1.1 2x0 OK\r\n\r\n").is_err());
    }
}
