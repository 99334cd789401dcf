//! Writing answers: Firecracker's status codes, a JSON body with its length, whether the
//! connection stays open, and the headers some answers carry (`Allow` on a 405, `Deprecation`
//! when the request used a deprecated field, as Firecracker marks it).

use std::io::{self, Write};

use crate::ApiResponse;

/// What an answer says besides its body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AnswerHeaders {
    /// `Connection: keep-alive` rather than `close`.
    pub keep_alive: bool,
    /// `Deprecation: true`: the request used a field or value Firecracker deprecated.
    pub deprecated: bool,
}

impl AnswerHeaders {
    /// Headers for a connection that stays open (`keep_alive`) or not, nothing deprecated.
    pub fn keep_alive(keep_alive: bool) -> Self {
        Self {
            keep_alive,
            deprecated: false,
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        _ => "Bad Request",
    }
}

/// The bytes of `response` on the wire.
pub fn encode_response(response: &ApiResponse, headers: AnswerHeaders) -> Vec<u8> {
    let status = response.status();
    let connection = if headers.keep_alive {
        "keep-alive"
    } else {
        "close"
    };
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nServer: Kiln API\r\nConnection: {connection}\r\n",
        reason(status)
    );
    if headers.deprecated {
        out.push_str("Deprecation: true\r\n");
    }
    if let Some(allow) = response.allow() {
        out.push_str(&format!("Allow: {allow}\r\n"));
    }
    let body = response.body();
    // A 204 carries no body and, per RFC 9110, no Content-Length either.
    if status != 204 {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

/// Writes `response` to `w` in one go.
pub fn write_response<W: Write>(
    w: &mut W,
    response: &ApiResponse,
    headers: AnswerHeaders,
) -> io::Result<()> {
    w.write_all(&encode_response(response, headers))?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_content() {
        assert_eq!(
            encode_response(&ApiResponse::NoContent, AnswerHeaders::keep_alive(true)),
            b"HTTP/1.1 204 No Content\r\nServer: Kiln API\r\nConnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn json_and_fault() {
        let ok = String::from_utf8(encode_response(
            &ApiResponse::Json("{}".into()),
            AnswerHeaders::keep_alive(false),
        ))
        .unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(ok.contains("Connection: close\r\n"));
        assert!(ok.ends_with("Content-Length: 2\r\n\r\n{}"));
        let fault = String::from_utf8(encode_response(
            &ApiResponse::fault("no"),
            AnswerHeaders::keep_alive(true),
        ))
        .unwrap();
        assert!(fault.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(fault.ends_with("Content-Length: 22\r\n\r\n{\"fault_message\":\"no\"}"));
    }

    #[test]
    fn deprecation_and_allow_headers() {
        let deprecated = AnswerHeaders {
            keep_alive: true,
            deprecated: true,
        };
        let text = String::from_utf8(encode_response(&ApiResponse::NoContent, deprecated)).unwrap();
        assert!(text.contains("\r\nDeprecation: true\r\n"), "{text}");
        let e = crate::ApiError::UnsupportedMethod {
            method: "DELETE".into(),
            path: "/vm".into(),
            allow: "PATCH".into(),
        };
        let text = String::from_utf8(encode_response(
            &ApiResponse::from(e),
            AnswerHeaders::keep_alive(true),
        ))
        .unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nAllow: PATCH\r\n"), "{text}");
        assert!(!text.contains("Deprecation"));
    }
}
