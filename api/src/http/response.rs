//! Writing answers: Firecracker's status codes, a JSON body with its length, and whether the
//! connection stays open.

use std::io::{self, Write};

use crate::ApiResponse;

/// The bytes of `response` on the wire.
pub fn encode_response(response: &ApiResponse, keep_alive: bool) -> Vec<u8> {
    let status = response.status();
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        _ => "Bad Request",
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut out =
        format!("HTTP/1.1 {status} {reason}\r\nServer: Kiln API\r\nConnection: {connection}\r\n");
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
    keep_alive: bool,
) -> io::Result<()> {
    w.write_all(&encode_response(response, keep_alive))?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_content() {
        assert_eq!(
            encode_response(&ApiResponse::NoContent, true),
            b"HTTP/1.1 204 No Content\r\nServer: Kiln API\r\nConnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn json_and_fault() {
        let ok =
            String::from_utf8(encode_response(&ApiResponse::Json("{}".into()), false)).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(ok.contains("Connection: close\r\n"));
        assert!(ok.ends_with("Content-Length: 2\r\n\r\n{}"));
        let fault = String::from_utf8(encode_response(&ApiResponse::fault("no"), true)).unwrap();
        assert!(fault.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(fault.ends_with("Content-Length: 22\r\n\r\n{\"fault_message\":\"no\"}"));
    }
}
