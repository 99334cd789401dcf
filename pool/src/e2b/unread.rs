//! Answers that leave their request's body unread close the HTTP/1.1 connection, saying so.
//!
//! A refusal (a wrong token, a gone sandbox, a bad content type) answers before reading the
//! body. hyper then drops the connection unless the rest of the body happens to be there
//! already, after an answer that did not say `Connection: close`: a client that reuses the
//! connection (the SDK's pool does) loses its next request to "server disconnected". Saying
//! `Connection: close` on those answers makes the client open a new connection instead.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderValue, Version, header};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

/// A request body that records whether it was read to its end.
struct Tracked {
    inner: Body,
    ended: Arc<AtomicBool>,
}

impl HttpBody for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.ended.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The middleware: HTTP/1.x answers whose request body was not read to the end say
/// `Connection: close`.
pub async fn close_when_unread(req: Request, next: Next) -> Response {
    if req.version() > Version::HTTP_11 || req.body().is_end_stream() {
        return next.run(req).await;
    }
    let ended = Arc::new(AtomicBool::new(false));
    let req = req.map(|inner| {
        Body::new(
            Tracked {
                inner,
                ended: ended.clone(),
            }
            .boxed_unsync(),
        )
    });
    let mut resp = next.run(req).await;
    if !ended.load(Ordering::Acquire) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::post;
    use tower::ServiceExt;

    async fn refuse() -> &'static str {
        "refused"
    }

    async fn read(body: String) -> String {
        body
    }

    async fn ask(app: Router, path: &str, body: &'static str) -> Response {
        let req = Request::post(path)
            .version(Version::HTTP_11)
            .body(Body::from(body))
            .unwrap();
        app.oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn only_unread_bodies_close_the_connection() {
        let app = Router::new()
            .route("/refuse", post(refuse))
            .route("/read", post(read))
            .layer(axum::middleware::from_fn(close_when_unread));
        let closing = ask(app.clone(), "/refuse", "{}").await;
        assert_eq!(closing.headers()[header::CONNECTION], "close");
        let kept = ask(app.clone(), "/read", "{}").await;
        assert!(kept.headers().get(header::CONNECTION).is_none());
        // No body: nothing was left unread.
        let empty = ask(app, "/refuse", "").await;
        assert!(empty.headers().get(header::CONNECTION).is_none());
    }
}
