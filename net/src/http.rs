//! Port 80 through the egress proxy: an HTTP/1.1 server toward the guest and a client toward the
//! destination (hyper on both sides), so every request on a connection is checked, not only the
//! first: its Host (or absolute URI) must name an allowed domain that resolved to the address the
//! guest connected to. A refused request gets a 403 saying why, and is reported; the connection
//! to the destination is made at the first request that passes. Protocol upgrades (WebSocket)
//! are refused: after one, the bytes could no longer be checked.

use std::convert::Infallible;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HOST, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::proxy::{Proxy, connect};

type Body = BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg + "\n"))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// The host a request names: its URI's authority, else its Host header; without a port.
pub fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.uri().host() {
        Some(h) => h.to_string(),
        None => req.headers().get(HOST)?.to_str().ok()?.to_string(),
    };
    // A bracketed IPv6 literal keeps its brackets; it is never an allowed name anyway.
    let host = match raw.strip_prefix('[') {
        Some(rest) => format!("[{}]", rest.split(']').next().unwrap_or_default()),
        None => raw.split(':').next().unwrap_or_default().to_string(),
    };
    Some(host)
}

/// Serves one guest connection to `dst`, port 80.
pub async fn serve(proxy: Proxy, conn: TcpStream, dst: SocketAddrV4) {
    let upstream: Arc<Mutex<Option<SendRequest<Incoming>>>> = Arc::default();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (proxy, upstream) = (proxy.clone(), upstream.clone());
        async move { Ok::<_, Infallible>(forward(&proxy, &upstream, dst, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(conn), service)
        .await;
}

async fn forward(
    proxy: &Proxy,
    upstream: &Mutex<Option<SendRequest<Incoming>>>,
    dst: SocketAddrV4,
    req: Request<Incoming>,
) -> Response<Body> {
    let refuse = |name: Option<String>, why: String| {
        proxy
            .refusals
            .record("tcp", name, Some(dst.to_string()), why.clone());
        text(StatusCode::FORBIDDEN, format!("kiln: refused: {why}"))
    };
    let Some(host) = request_host(&req) else {
        return refuse(None, "an HTTP request without a Host".into());
    };
    if let Some(why) = proxy.refused_name(&host, *dst.ip()) {
        return refuse(Some(host), why);
    }
    if req.headers().contains_key(UPGRADE) {
        return refuse(
            Some(host),
            "protocol upgrades (WebSocket) are not passed on port 80".into(),
        );
    }
    let mut slot = upstream.lock().await;
    if slot.as_ref().is_none_or(|s| s.is_closed()) {
        let Some(tcp) = connect(SocketAddr::V4(dst)).await else {
            return text(StatusCode::BAD_GATEWAY, format!("kiln: cannot reach {dst}"));
        };
        match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
            Ok((sender, conn)) => {
                tokio::spawn(conn);
                *slot = Some(sender);
            }
            Err(e) => return text(StatusCode::BAD_GATEWAY, format!("kiln: {dst}: {e}")),
        }
    }
    let Some(sender) = slot.as_mut() else {
        return text(StatusCode::BAD_GATEWAY, format!("kiln: cannot reach {dst}"));
    };
    match sender.send_request(req).await {
        Ok(resp) => resp.map(BodyExt::boxed),
        Err(e) => text(StatusCode::BAD_GATEWAY, format!("kiln: {dst}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, host: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(HOST, h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_host_comes_from_the_uri_or_the_header_without_its_port() {
        assert_eq!(
            request_host(&req("/x", Some("allowed.test"))).as_deref(),
            Some("allowed.test")
        );
        assert_eq!(
            request_host(&req("/x", Some("allowed.test:8080"))).as_deref(),
            Some("allowed.test")
        );
        assert_eq!(
            request_host(&req("http://other.test/x", Some("allowed.test"))).as_deref(),
            Some("other.test"),
            "an absolute URI wins, as servers read it"
        );
        assert_eq!(request_host(&req("/x", None)), None);
        assert_eq!(
            request_host(&req("/x", Some("[::1]:80"))).as_deref(),
            Some("[::1]")
        );
    }
}
