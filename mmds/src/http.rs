//! The guest's side of the MMDS: one HTTP/1.x request's bytes in, the answer's bytes out, with
//! Firecracker's rules.
//!
//! - V1: `GET` any path; anything else is 405 (`Allow: GET`).
//! - V2: `PUT /latest/api/token` with `X-metadata-token-ttl-seconds` (1 to 21600) issues a token
//!   (refused if the request carries `X-Forwarded-For`, so a guest proxy cannot hand tokens out);
//!   `GET` needs a valid `X-metadata-token`. EC2's `X-aws-ec2-metadata-token[-ttl-seconds]` names
//!   are taken too.
//! - `Accept: application/json` gets JSON; anything else (or `imds_compat`) gets IMDS text.

use std::time::Instant;

use crate::data_store::{Mmds, MmdsError, MmdsVersion, OutputFormat};

/// Where V2 tokens are asked for.
pub const TOKEN_PATH: &str = "/latest/api/token";
/// Most headers a guest request may carry.
const MAX_HEADERS: usize = 32;
/// Largest request the MMDS reads (head and body), as Firecracker's MMDS: 1 KiB... a little
/// more, for long token headers.
pub const MAX_REQUEST: usize = 4096;

/// One answer to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// `application/json` or `text/plain`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
    /// HTTP/1.0 or 1.1, as the request.
    pub http10: bool,
}

impl HttpResponse {
    pub(crate) fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain",
            body: body.into(),
            allow: None,
            http10: false,
        }
    }

    /// The answer's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            501 => "Not Implemented",
            _ => "Internal Server Error",
        };
        let version = if self.http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        let mut out = format!(
            "{version} {} {reason}\r\nServer: Kiln MMDS\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if let Some(allow) = self.allow {
            out.push_str(&format!("Allow: {allow}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(&self.body);
        out.into_bytes()
    }
}

/// How many bytes of `buf` the first request takes, once they have all arrived (`Ok(None)`
/// before); an error for bytes that cannot become a request the MMDS reads.
pub fn request_len(buf: &[u8]) -> Result<Option<usize>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST => {
            return Err(format!("request head longer than {MAX_REQUEST} bytes"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed request: {e}")),
    };
    let body = match header(req.headers, &["Content-Length"]) {
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| format!("bad Content-Length {v:?}"))?,
        None => 0,
    };
    let total = head.saturating_add(body);
    if total > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    Ok((buf.len() >= total).then_some(total))
}

fn header<'a>(headers: &'a [httparse::Header<'_>], names: &[&str]) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| names.iter().any(|n| h.name.eq_ignore_ascii_case(n)))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
}

/// The path of a request target: origin form (`/a/b?x`) or absolute form
/// (`http://169.254.169.254/a/b`), without its query.
fn target_path(target: &str) -> &str {
    let rest = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("", |i| &rest[i..]),
        None => target,
    };
    rest.split(['?', '#']).next().unwrap_or("")
}

/// Answers one complete request (`request` holds exactly its bytes) at `now`.
pub fn respond(mmds: &Mmds, request: &[u8], now: Instant) -> HttpResponse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let mut answer = match req.parse(request) {
        Ok(httparse::Status::Complete(_)) => answer(mmds, &req, now),
        Ok(httparse::Status::Partial) => HttpResponse::text(400, "incomplete request"),
        Err(e) => HttpResponse::text(400, format!("malformed request: {e}")),
    };
    answer.http10 = req.version == Some(0);
    answer
}

fn answer(mmds: &Mmds, req: &httparse::Request<'_, '_>, now: Instant) -> HttpResponse {
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return HttpResponse::text(400, "malformed request line");
    };
    let path = target_path(target);
    if path.is_empty() || !path.starts_with('/') {
        return HttpResponse::text(400, "Invalid URI.");
    }
    let not_allowed = |allow| HttpResponse {
        allow: Some(allow),
        ..HttpResponse::text(405, "Not allowed HTTP method.")
    };
    match (mmds.version(), method) {
        (MmdsVersion::V1, "GET") => get(mmds, req, path),
        (MmdsVersion::V1, _) => not_allowed("GET"),
        (MmdsVersion::V2, "GET") => {
            let Some(token) = header(
                req.headers,
                &["X-metadata-token", "X-aws-ec2-metadata-token"],
            ) else {
                return HttpResponse::text(
                    401,
                    "No MMDS token provided. Use `X-metadata-token` header to specify the session token.",
                );
            };
            match mmds.tokens() {
                Some(a) if a.is_valid(token, now) => get(mmds, req, path),
                _ => HttpResponse::text(401, "MMDS token not valid."),
            }
        }
        (MmdsVersion::V2, "PUT") => put_token(mmds, req, path, now),
        (MmdsVersion::V2, _) => not_allowed("GET, PUT"),
    }
}

fn get(mmds: &Mmds, req: &httparse::Request<'_, '_>, path: &str) -> HttpResponse {
    let json = !mmds.imds_compat()
        && header(req.headers, &["Accept"]).is_some_and(|a| a.contains("application/json"));
    let format = if json {
        OutputFormat::Json
    } else {
        OutputFormat::Imds
    };
    match mmds.get(path, format) {
        Ok(body) => HttpResponse {
            content_type: if json {
                "application/json"
            } else {
                "text/plain"
            },
            ..HttpResponse::text(200, body)
        },
        Err(MmdsError::NotFound) => HttpResponse::text(404, format!("Resource not found: {path}.")),
        Err(e @ MmdsError::UnsupportedValueType) => HttpResponse::text(501, e.to_string()),
        Err(e) => HttpResponse::text(400, e.to_string()),
    }
}

fn put_token(
    mmds: &Mmds,
    req: &httparse::Request<'_, '_>,
    path: &str,
    now: Instant,
) -> HttpResponse {
    if header(req.headers, &["X-Forwarded-For"]).is_some() {
        return HttpResponse::text(
            400,
            "Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For",
        );
    }
    if path != TOKEN_PATH {
        return HttpResponse::text(404, format!("Resource not found: {path}."));
    }
    let names = [
        "X-metadata-token-ttl-seconds",
        "X-aws-ec2-metadata-token-ttl-seconds",
    ];
    let Some(ttl) = header(req.headers, &names) else {
        return HttpResponse::text(
            400,
            "Token time to live value not found. Use `X-metadata-token-ttl-seconds` header to specify the token's lifetime.",
        );
    };
    let Ok(ttl) = ttl.parse::<u64>() else {
        return HttpResponse::text(
            400,
            format!(
                "Invalid header. Reason: Invalid value. Key:X-metadata-token-ttl-seconds; Value:{ttl}"
            ),
        );
    };
    let Some(authority) = mmds.tokens() else {
        return HttpResponse::text(400, "MMDS V2 is not configured");
    };
    match authority.issue(ttl, now) {
        Ok(token) => HttpResponse::text(200, token),
        Err(e) => HttpResponse::text(400, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn mmds(version: MmdsVersion) -> Mmds {
        let mut m = Mmds::default();
        m.put(json!({"latest": {"meta-data": {"ami-id": "ami-1", "count": 3}}}))
            .unwrap();
        m.set_version(version).unwrap();
        m
    }

    fn ask(m: &Mmds, req: &str, now: Instant) -> HttpResponse {
        let bytes = req.as_bytes();
        assert_eq!(request_len(bytes).unwrap(), Some(bytes.len()), "{req:?}");
        respond(m, bytes, now)
    }

    #[test]
    fn v1_answers_gets_in_both_formats() {
        let m = mmds(MmdsVersion::V1);
        let now = Instant::now();
        let r = ask(
            &m,
            "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n",
            now,
        );
        assert_eq!(
            (r.status, r.body.as_str(), r.content_type),
            (200, "ami-id\ncount", "text/plain")
        );
        let r = ask(
            &m,
            "GET http://169.254.169.254/latest/meta-data/ami-id HTTP/1.0\r\nAccept: application/json\r\n\r\n",
            now,
        );
        assert_eq!((r.status, r.body.as_str()), (200, "\"ami-1\""));
        assert!(r.to_bytes().starts_with(b"HTTP/1.0 200 OK\r\n"));
        let r = ask(&m, "GET /latest/meta-data/count HTTP/1.1\r\n\r\n", now);
        assert_eq!(r.status, 501);
        let r = ask(&m, "GET /nope HTTP/1.1\r\n\r\n", now);
        assert_eq!(
            (r.status, r.body.as_str()),
            (404, "Resource not found: /nope.")
        );
        let r = ask(&m, "PUT /latest/api/token HTTP/1.1\r\n\r\n", now);
        assert_eq!((r.status, r.allow), (405, Some("GET")));
        let text = String::from_utf8(r.to_bytes()).unwrap();
        assert!(text.contains("\r\nAllow: GET\r\n"), "{text}");
    }

    #[test]
    fn v2_needs_a_token_from_put() {
        let m = mmds(MmdsVersion::V2);
        let now = Instant::now();
        let r = ask(&m, "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n", now);
        assert_eq!(r.status, 401);
        let r = ask(
            &m,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
            now,
        );
        assert_eq!(r.status, 200);
        let token = r.body;
        let get =
            format!("GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n");
        let r = ask(&m, &get, now);
        assert_eq!((r.status, r.body.as_str()), (200, "ami-1"));
        let r = ask(&m, &get, now + Duration::from_secs(61));
        assert_eq!((r.status, r.body.as_str()), (401, "MMDS token not valid."));
        let aws = format!(
            "GET /latest/meta-data/ami-id HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\n\r\n"
        );
        assert_eq!(ask(&m, &aws, now).status, 200);
        let r = ask(
            &m,
            "GET / HTTP/1.1\r\nX-metadata-token: forged\r\n\r\n",
            now,
        );
        assert_eq!(r.status, 401);

        for (req, want) in [
            (
                "PUT /latest/api/token HTTP/1.1\r\n\r\n",
                "Token time to live value not found",
            ),
            (
                "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n",
                "Invalid time to live value provided for token: 0",
            ),
            (
                "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: x\r\n\r\n",
                "Invalid value",
            ),
            (
                "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
                "X-Forwarded-For",
            ),
        ] {
            let r = ask(&m, req, now);
            assert_eq!(r.status, 400, "{req:?}");
            assert!(r.body.contains(want), "{req:?}: {}", r.body);
        }
        assert_eq!(ask(&m, "PUT /other HTTP/1.1\r\n\r\n", now).status, 404);
        let r = ask(&m, "PATCH / HTTP/1.1\r\n\r\n", now);
        assert_eq!((r.status, r.allow), (405, Some("GET, PUT")));
    }

    #[test]
    fn imds_compat_always_answers_text() {
        let mut m = mmds(MmdsVersion::V1);
        m.set_imds_compat(true);
        let r = ask(
            &m,
            "GET /latest/meta-data/ami-id HTTP/1.1\r\nAccept: application/json\r\n\r\n",
            Instant::now(),
        );
        assert_eq!((r.body.as_str(), r.content_type), ("ami-1", "text/plain"));
    }

    #[test]
    fn requests_are_framed_and_hostile_ones_refused() {
        assert_eq!(request_len(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap(), None);
        let two = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        assert_eq!(request_len(two).unwrap(), Some(19));
        let with_body = b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nab";
        assert_eq!(request_len(with_body).unwrap(), None);
        assert!(request_len(b"\x00\x01 garbage\r\n\r\n").is_err());
        let endless = format!("GET / HTTP/1.1\r\n{}", "X-A: b\r\n".repeat(1000));
        assert!(request_len(endless.as_bytes()).is_err());
        assert!(request_len(b"PUT / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n").is_err());
        let m = mmds(MmdsVersion::V1);
        assert_eq!(respond(&m, b"nonsense", Instant::now()).status, 400);
    }
}
