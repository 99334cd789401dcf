//! The Connect protocol (connectrpc.com/docs/protocol), server side, over axum: unary calls
//! (`application/proto` or `application/json`, the message is the whole body) and streams
//! (`application/connect+proto` or `+json`, messages in 5-byte envelopes, the last one an
//! end-of-stream JSON object carrying the error, if any). Written here because the maintained Rust
//! Connect runtime is built on another protobuf library than the prost types kilnd uses; the wire
//! format is small and fully specified.
//!
//! Compression is not offered (no `Connect-Accept-Encoding`), so a compressed request is refused
//! by name. Every length is bounded before anything is allocated for it.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

/// The largest message accepted in a request, envelope or unary body: 16 MiB.
pub const MAX_MESSAGE: usize = 16 << 20;

/// Envelope flag: the payload is compressed.
const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag: the end-of-stream message.
const FLAG_END_STREAM: u8 = 0x02;

/// A Connect error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The call was cancelled.
    Canceled,
    /// Unknown failure.
    Unknown,
    /// The request is malformed.
    InvalidArgument,
    /// The deadline passed.
    DeadlineExceeded,
    /// The thing does not exist.
    NotFound,
    /// The thing exists already.
    AlreadyExists,
    /// Not allowed.
    PermissionDenied,
    /// A limit was reached.
    ResourceExhausted,
    /// The system is not in the state the call needs.
    FailedPrecondition,
    /// Not implemented by this server.
    Unimplemented,
    /// The server failed.
    Internal,
    /// The service is not available now.
    Unavailable,
    /// No valid credentials.
    Unauthenticated,
}

impl Code {
    /// Its name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error with this code (the protocol's table).
    pub fn http_status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::Unknown | Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// A failed call: its code and a message naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.name())]
pub struct ConnectError {
    /// The code the client acts on.
    pub code: Code,
    /// For people.
    pub message: String,
}

impl ConnectError {
    /// An error with `code`.
    pub fn new(code: Code, message: impl Into<String>) -> ConnectError {
        ConnectError {
            code,
            message: message.into(),
        }
    }

    fn body(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code.name(), "message": self.message})
    }
}

impl IntoResponse for ConnectError {
    /// A unary error: the code's HTTP status and a JSON body.
    fn into_response(self) -> Response {
        let mut resp = (self.code.http_status(), self.body().to_string()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

/// How messages are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Binary protobuf.
    Proto,
    /// Proto3's JSON mapping.
    Json,
}

/// A message type both codecs can carry.
pub trait Msg: prost::Message + Default + Serialize + DeserializeOwned + Send + 'static {}
impl<T: prost::Message + Default + Serialize + DeserializeOwned + Send + 'static> Msg for T {}

impl Codec {
    /// The codec a call's `Content-Type` names, or the 415 answer the protocol asks for.
    pub fn of(headers: &HeaderMap, streaming: bool) -> Result<Codec, Box<Response>> {
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let base = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let codec = match (streaming, base.as_str()) {
            (false, "application/proto") | (true, "application/connect+proto") => Codec::Proto,
            (false, "application/json") | (true, "application/connect+json") => Codec::Json,
            _ => {
                let accept = if streaming {
                    "application/connect+proto, application/connect+json"
                } else {
                    "application/proto, application/json"
                };
                let mut resp = (
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("content type {ct:?} is not one of {accept}"),
                )
                    .into_response();
                resp.headers_mut()
                    .insert("accept-post", HeaderValue::from_static(accept));
                return Err(Box::new(resp));
            }
        };
        Ok(codec)
    }

    fn content_type(self, streaming: bool) -> &'static str {
        match (self, streaming) {
            (Codec::Proto, false) => "application/proto",
            (Codec::Json, false) => "application/json",
            (Codec::Proto, true) => "application/connect+proto",
            (Codec::Json, true) => "application/connect+json",
        }
    }

    /// Decodes one message; a malformed one is `invalid_argument` naming its type.
    pub fn decode<M: Msg>(self, bytes: &[u8]) -> Result<M, ConnectError> {
        let name = std::any::type_name::<M>()
            .rsplit("::")
            .next()
            .unwrap_or("message");
        match self {
            Codec::Proto => M::decode(bytes).map_err(|e| {
                ConnectError::new(
                    Code::InvalidArgument,
                    format!("the request is not a valid protobuf {name}: {e}"),
                )
            }),
            Codec::Json if bytes.is_empty() => Ok(M::default()),
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| {
                ConnectError::new(
                    Code::InvalidArgument,
                    format!("the request is not a valid JSON {name}: {e}"),
                )
            }),
        }
    }

    /// Encodes one message.
    pub fn encode<M: Msg>(self, msg: &M) -> Vec<u8> {
        match self {
            Codec::Proto => msg.encode_to_vec(),
            // Serializing a generated message cannot fail.
            Codec::Json => serde_json::to_vec(msg).unwrap_or_default(),
        }
    }

    /// A unary answer carrying `msg`.
    pub fn unary<M: Msg>(self, msg: &M) -> Response {
        let mut resp = Response::new(Body::from(self.encode(msg)));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type(false)),
        );
        resp
    }
}

/// Refuses a compressed request (none is offered), naming the encoding.
pub fn check_encoding(headers: &HeaderMap, streaming: bool) -> Result<(), ConnectError> {
    let name = if streaming {
        "connect-content-encoding"
    } else {
        "content-encoding"
    };
    match headers.get(name).and_then(|v| v.to_str().ok()) {
        None | Some("identity") => Ok(()),
        Some(other) => Err(ConnectError::new(
            Code::Unimplemented,
            format!("{name} {other:?} is not supported: send uncompressed messages"),
        )),
    }
}

/// The call's deadline from `Connect-Timeout-Ms`, if it sets one.
pub fn timeout(headers: &HeaderMap) -> Result<Option<Duration>, ConnectError> {
    let Some(v) = headers.get("connect-timeout-ms") else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or("");
    // The protocol allows at most 10 digits.
    match text.parse::<u64>() {
        Ok(ms) if text.len() <= 10 => Ok(Some(Duration::from_millis(ms))),
        _ => Err(ConnectError::new(
            Code::InvalidArgument,
            format!("connect-timeout-ms {text:?} is not a number of milliseconds"),
        )),
    }
}

fn envelope(flags: u8, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + data.len());
    out.push(flags);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    Bytes::from(out)
}

/// One item of a server stream: a message, or the error that ends it.
pub type StreamItem<M> = Result<M, ConnectError>;

/// A streaming answer: each message from `rx` in an envelope, then the end-of-stream message
/// (with the error, when the last item was one). When the client goes away, the body is
/// dropped and `rx` with it, which the producer sees as a closed channel.
pub fn stream_response<M: Msg>(codec: Codec, rx: mpsc::Receiver<StreamItem<M>>) -> Response {
    let body = futures_util::stream::unfold(Some(rx), move |state| async move {
        let mut rx = state?;
        let (frame, next) = match rx.recv().await {
            Some(Ok(msg)) => (envelope(0, &codec.encode(&msg)), Some(rx)),
            Some(Err(e)) => {
                let end = serde_json::json!({"error": e.body()}).to_string();
                (envelope(FLAG_END_STREAM, end.as_bytes()), None)
            }
            None => (envelope(FLAG_END_STREAM, b"{}"), None),
        };
        Some((Ok::<_, std::convert::Infallible>(frame), next))
    });
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(codec.content_type(true)),
    );
    resp
}

/// A stream that failed before its first message: still a 200 with one end-of-stream envelope,
/// as the protocol wants for streaming calls.
pub fn stream_error<M: Msg>(codec: Codec, e: ConnectError) -> Response {
    let (tx, rx) = mpsc::channel::<StreamItem<M>>(1);
    let _ = tx.try_send(Err(e));
    stream_response(codec, rx)
}

/// Reads the enveloped messages of a client stream one by one.
pub struct EnvelopeReader {
    body: axum::body::BodyDataStream,
    buf: Vec<u8>,
    codec: Codec,
    done: bool,
}

impl EnvelopeReader {
    /// Reads `body`, whose messages use `codec`.
    pub fn new(body: Body, codec: Codec) -> EnvelopeReader {
        EnvelopeReader {
            body: body.into_data_stream(),
            buf: Vec::new(),
            codec,
            done: false,
        }
    }

    /// The next message, `Ok(None)` at the end of the body, or an error naming what was wrong.
    pub async fn next<M: Msg>(&mut self) -> Result<Option<M>, ConnectError> {
        loop {
            if self.buf.len() >= 5 {
                let flags = self.buf[0];
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > MAX_MESSAGE {
                    return Err(ConnectError::new(
                        Code::ResourceExhausted,
                        format!("a {len}-byte message is over the {MAX_MESSAGE}-byte limit"),
                    ));
                }
                if flags & FLAG_COMPRESSED != 0 {
                    return Err(ConnectError::new(
                        Code::Unimplemented,
                        "compressed messages are not supported",
                    ));
                }
                if flags & FLAG_END_STREAM != 0 {
                    return Err(ConnectError::new(
                        Code::InvalidArgument,
                        "clients send no end-of-stream message",
                    ));
                }
                if self.buf.len() >= 5 + len {
                    let msg = self.codec.decode(&self.buf[5..5 + len])?;
                    self.buf.drain(..5 + len);
                    return Ok(Some(msg));
                }
            }
            if self.done {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnectError::new(
                        Code::InvalidArgument,
                        format!(
                            "the request stream ended inside a message ({} bytes left)",
                            self.buf.len()
                        ),
                    ))
                };
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    return Err(ConnectError::new(
                        Code::Canceled,
                        format!("reading the request stream: {e}"),
                    ));
                }
                None => self.done = true,
            }
        }
    }
}

/// Reads a unary call's whole body (at most [`MAX_MESSAGE`] bytes) and decodes it.
pub async fn read_unary<M: Msg>(body: Body, codec: Codec) -> Result<M, ConnectError> {
    let bytes = axum::body::to_bytes(body, MAX_MESSAGE).await.map_err(|e| {
        ConnectError::new(
            Code::ResourceExhausted,
            format!("reading the request (at most {MAX_MESSAGE} bytes): {e}"),
        )
    })?;
    codec.decode(&bytes)
}

/// Reads a server-streaming call's request: one enveloped message.
pub async fn read_stream_request<M: Msg>(body: Body, codec: Codec) -> Result<M, ConnectError> {
    let mut reader = EnvelopeReader::new(body, codec);
    reader.next().await?.ok_or_else(|| {
        ConnectError::new(Code::InvalidArgument, "the request stream holds no message")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2b::proto::process::{ProcessSelector, process_selector::Selector};

    #[test]
    fn codes_map_to_the_protocol_statuses() {
        assert_eq!(Code::NotFound.http_status(), 404);
        assert_eq!(Code::Unauthenticated.http_status(), 401);
        assert_eq!(Code::Canceled.http_status().as_u16(), 499);
        assert_eq!(Code::Unimplemented.name(), "unimplemented");
    }

    #[test]
    fn both_codecs_round_trip_and_bad_input_is_named() {
        let m = ProcessSelector {
            selector: Some(Selector::Pid(42)),
        };
        for codec in [Codec::Proto, Codec::Json] {
            let back: ProcessSelector = codec.decode(&codec.encode(&m)).unwrap();
            assert_eq!(back, m);
        }
        assert_eq!(Codec::Json.encode(&m), br#"{"pid":42}"#);
        let e = Codec::Proto
            .decode::<ProcessSelector>(&[0x0a, 0xff])
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        assert!(e.message.contains("ProcessSelector"), "{e}");
        let e = Codec::Json
            .decode::<ProcessSelector>(b"{\"pid\":")
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
    }

    #[tokio::test]
    async fn envelopes_are_bounded_and_flags_checked() {
        let m = ProcessSelector {
            selector: Some(Selector::Tag("x".into())),
        };
        let data = Codec::Proto.encode(&m);
        let mut two = envelope(0, &data).to_vec();
        two.extend_from_slice(&envelope(0, &data));
        let mut r = EnvelopeReader::new(Body::from(two), Codec::Proto);
        assert_eq!(r.next::<ProcessSelector>().await.unwrap(), Some(m.clone()));
        assert_eq!(r.next::<ProcessSelector>().await.unwrap(), Some(m));
        assert_eq!(r.next::<ProcessSelector>().await.unwrap(), None);
        let huge = [0u8, 0xff, 0xff, 0xff, 0xff];
        let e = EnvelopeReader::new(Body::from(huge.to_vec()), Codec::Proto)
            .next::<ProcessSelector>()
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::ResourceExhausted);
        let e = EnvelopeReader::new(Body::from(vec![1u8, 0, 0, 0, 0]), Codec::Proto)
            .next::<ProcessSelector>()
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::Unimplemented);
        let e = EnvelopeReader::new(Body::from(vec![0u8, 0, 0, 0, 9, 1]), Codec::Proto)
            .next::<ProcessSelector>()
            .await
            .unwrap_err();
        assert!(e.message.contains("ended inside a message"), "{e}");
    }
}
