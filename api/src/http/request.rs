//! Reading requests: [`parse_head`] is a pure function over the bytes received so far, and
//! [`RequestReader`] feeds it from a stream, keeping bytes of a pipelined next request.

use std::io::{self, Read, Write};

use super::{DEFAULT_MAX_PAYLOAD, HttpError, MAX_REQUEST_SIZE};

/// The request line and the headers the API cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The method, as sent (methods are case-sensitive).
    pub method: String,
    /// The request target (path and optional query).
    pub target: String,
    /// Whether the connection stays open after the answer.
    pub keep_alive: bool,
    /// The body's length.
    pub content_length: usize,
    /// The client waits for `100 Continue` before sending the body (curl does for big bodies).
    pub expect_continue: bool,
    /// Bytes of the head, final blank line included: the body starts here.
    pub head_len: usize,
}

/// One complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// The method, as sent.
    pub method: String,
    /// The request target.
    pub target: String,
    /// The body, exactly `Content-Length` bytes.
    pub body: Vec<u8>,
    /// Whether the connection stays open after the answer.
    pub keep_alive: bool,
}

const HEAD_END: &[u8] = b"\r\n\r\n";

/// Where the head's final blank line ends, searching from `from` (so a reader fed byte by byte
/// does not rescan what it has seen).
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(HEAD_END.len() - 1);
    buf.get(start..)?
        .windows(HEAD_END.len())
        .position(|w| w == HEAD_END)
        .map(|p| start + p + HEAD_END.len())
}

/// Parses the head at the start of `buf`: `Ok(None)` while it is incomplete, an error as soon
/// as it cannot become a valid request within [`MAX_REQUEST_SIZE`] and a body of at most
/// [`DEFAULT_MAX_PAYLOAD`].
pub fn parse_head(buf: &[u8]) -> Result<Option<RequestHead>, HttpError> {
    match find_head_end(buf, 0) {
        Some(end) if end <= MAX_REQUEST_SIZE => {
            parse_complete_head(&buf[..end], DEFAULT_MAX_PAYLOAD).map(Some)
        }
        Some(_) => Err(HttpError::TooLarge),
        None if buf.len() >= MAX_REQUEST_SIZE => Err(HttpError::TooLarge),
        None => Ok(None),
    }
}

/// Parses a head known to end with its blank line, refusing a body over `max_payload`.
fn parse_complete_head(head: &[u8], max_payload: usize) -> Result<RequestHead, HttpError> {
    let text = std::str::from_utf8(&head[..head.len() - HEAD_END.len()])
        .map_err(|_| HttpError::Malformed("request head is not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(HttpError::Malformed(format!(
            "request line {request_line:?} is not METHOD TARGET VERSION"
        )));
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err(HttpError::Malformed(format!("method {method:?}")));
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(HttpError::Malformed(format!("request target {target:?}")));
    }
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(HttpError::Version(version.to_string())),
    };
    let mut content_length = None;
    let mut expect_continue = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Malformed(format!(
                "header line {line:?} has no colon"
            )));
        };
        // An empty or space-containing name also catches obsolete line folding.
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(HttpError::Malformed(format!("header name {name:?}")));
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(HttpError::Malformed(format!(
                "control character in header {name}"
            )));
        }
        if name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return Err(HttpError::BadContentLength(format!("repeated: {value}")));
            }
            content_length = Some(parse_content_length(value)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::TransferEncoding(value.to_string()));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > max_payload {
        return Err(HttpError::PayloadTooLarge {
            size: content_length,
            limit: max_payload,
        });
    }
    Ok(RequestHead {
        method: method.to_string(),
        target: target.to_string(),
        keep_alive,
        content_length,
        expect_continue,
        head_len: head.len(),
    })
}

fn parse_content_length(value: &str) -> Result<usize, HttpError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::BadContentLength(value.to_string()));
    }
    // Too many digits for a usize is simply too large.
    value.parse().map_err(|_| HttpError::TooLarge)
}

/// RFC 9110's `tchar`: what methods and header names are made of.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads requests one after another from a connection, never holding more than a head of
/// [`MAX_REQUEST_SIZE`], a body of its payload limit and one read's worth of bytes.
///
/// It works on blocking streams ([`RequestReader::read_request`]) and on non-blocking ones, where
/// the caller alternates [`RequestReader::fill`] (one read, when the socket is readable) and
/// [`RequestReader::parse`] (what the bytes so far make), so a request may arrive over any
/// number of reads without being parsed again from the start.
#[derive(Debug)]
pub struct RequestReader {
    buf: Vec<u8>,
    /// Largest body taken ([`DEFAULT_MAX_PAYLOAD`] unless set).
    max_payload: usize,
    /// How much of `buf` has been searched for the head's end.
    scanned: usize,
    /// The current request's head, once it is complete and valid (its body may not be).
    head: Option<RequestHead>,
    /// `100 Continue` was asked for the current request.
    continue_asked: bool,
}

/// What the bytes read so far make, from [`RequestReader::parse`].
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole request; its bytes left the buffer (a pipelined next request's stay).
    Request(HttpRequest),
    /// Not a whole request yet.
    Incomplete {
        /// The head asked for `100 Continue` before its body; true once per request, the
        /// moment its head is complete and its body is not: the caller sends it.
        send_continue: bool,
    },
}

/// How much one read asks for.
const READ_CHUNK: usize = 4096;

/// What a client that sent `Expect: 100-continue` is told before it sends the body.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl Default for RequestReader {
    fn default() -> Self {
        Self::with_max_payload(DEFAULT_MAX_PAYLOAD)
    }
}

impl RequestReader {
    /// A reader with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// A reader that refuses bodies larger than `max_payload` bytes.
    pub fn with_max_payload(max_payload: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_payload,
            scanned: 0,
            head: None,
            continue_asked: false,
        }
    }

    /// True when nothing of a next request has arrived.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes received and not yet part of a returned request.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next request, `Ok(None)` if the peer closed cleanly between requests. `stream` is
    /// written to only to send `100 Continue` to a client that asked for it.
    pub fn read_request<S: Read + Write>(
        &mut self,
        stream: &mut S,
    ) -> Result<Option<HttpRequest>, HttpError> {
        loop {
            match self.parse()? {
                Parsed::Request(request) => return Ok(Some(request)),
                Parsed::Incomplete { send_continue } => {
                    if send_continue {
                        stream.write_all(CONTINUE)?;
                    }
                }
            }
            if self.fill(stream)? == 0 {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(HttpError::Truncated),
                };
            }
        }
    }

    /// What the buffered bytes make: a request, or not yet one. An error as soon as they
    /// cannot become a valid request within [`MAX_REQUEST_SIZE`]; the connection cannot be
    /// read further after one (the next request's start is lost).
    pub fn parse(&mut self) -> Result<Parsed, HttpError> {
        let waiting = Parsed::Incomplete {
            send_continue: false,
        };
        let head = match self.head.take() {
            Some(head) => head,
            None => {
                let Some(end) = find_head_end(&self.buf, self.scanned) else {
                    self.scanned = self.buf.len();
                    if self.buf.len() >= MAX_REQUEST_SIZE {
                        return Err(HttpError::TooLarge);
                    }
                    return Ok(waiting);
                };
                if end > MAX_REQUEST_SIZE {
                    return Err(HttpError::TooLarge);
                }
                parse_complete_head(&self.buf[..end], self.max_payload)?
            }
        };
        let total = head.head_len + head.content_length;
        if self.buf.len() < total {
            let send_continue = head.expect_continue && !self.continue_asked;
            self.continue_asked |= send_continue;
            self.head = Some(head);
            return Ok(Parsed::Incomplete { send_continue });
        }
        let body = self.buf[head.head_len..total].to_vec();
        self.buf.drain(..total);
        self.scanned = 0;
        self.continue_asked = false;
        if self.buf.is_empty() && self.buf.capacity() > 2 * READ_CHUNK {
            // An idle keep-alive connection does not keep a large request's buffer.
            self.buf = Vec::new();
        }
        Ok(Parsed::Request(HttpRequest {
            method: head.method,
            target: head.target,
            body,
            keep_alive: head.keep_alive,
        }))
    }

    /// Reads once into the buffer; returns how many bytes came (0 at end of stream). On a
    /// non-blocking stream with nothing to read, the error is `WouldBlock` and nothing changed.
    pub fn fill<S: Read>(&mut self, stream: &mut S) -> Result<usize, HttpError> {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            match stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
