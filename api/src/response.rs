//! What the VMM's handler answers: Firecracker's outcomes (204, 200 with JSON, 400 with a fault
//! message, and the few other statuses Firecracker uses: 404, 405 and 413). The HTTP encoding
//! lives in [`crate::http`]. Fault messages are bounded ([`crate::echo`]): what they echo of the
//! request is cut, so no answer grows with its input.

use std::borrow::Cow;

use serde::Serialize;

use crate::ApiError;
use crate::echo::bound_fault;

/// The answer to one [`crate::ApiRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiResponse {
    /// Done, nothing to say: 204 No Content.
    NoContent,
    /// Done, with a JSON body: 200 OK.
    Json(String),
    /// Refused: 400 Bad Request with `{"fault_message": ...}`, Firecracker's answer to nearly
    /// every error. The message is bounded when sent ([`crate::echo::bound_fault`]).
    Fault(String),
    /// Refused with another status Firecracker uses: 404 (`GET /mmds` before any `PUT`), 405 (a
    /// method Firecracker's server does not take, with the methods the path does take) or 413
    /// (the MMDS data store would grow past its limit).
    FaultWith {
        /// The status code.
        status: u16,
        /// The fault message.
        message: String,
        /// For 405, the `Allow` header's value.
        allow: Option<String>,
    },
}

impl ApiResponse {
    /// A 200 answer carrying `value` as JSON (a fault if it cannot be serialized).
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => ApiResponse::Json(body),
            Err(e) => ApiResponse::Fault(format!("cannot serialize the answer: {e}")),
        }
    }

    /// A 400 answer with `message` as its fault message, bounded ([`crate::echo::bound_fault`])
    /// here, so a long echo is dropped on the thread that wrote it.
    pub fn fault(message: impl ToString) -> Self {
        ApiResponse::Fault(bounded(message))
    }

    /// A refusal with `status` (404, 405 or 413) and `message`, bounded as [`ApiResponse::fault`].
    pub fn fault_with(status: u16, message: impl ToString) -> Self {
        ApiResponse::FaultWith {
            status,
            message: bounded(message),
            allow: None,
        }
    }

    /// The HTTP status code this answer is sent with.
    pub fn status(&self) -> u16 {
        match self {
            ApiResponse::NoContent => 204,
            ApiResponse::Json(_) => 200,
            ApiResponse::Fault(_) => 400,
            ApiResponse::FaultWith { status, .. } => *status,
        }
    }

    /// The `Allow` header a 405 carries.
    pub fn allow(&self) -> Option<&str> {
        match self {
            ApiResponse::FaultWith { allow, .. } => allow.as_deref(),
            _ => None,
        }
    }

    /// The body sent with this answer (empty for 204).
    pub fn body(&self) -> String {
        match self {
            ApiResponse::NoContent => String::new(),
            ApiResponse::Json(body) => body.clone(),
            // Bounded again: `Fault` can be built without `fault()`.
            ApiResponse::Fault(message) | ApiResponse::FaultWith { message, .. } => {
                serde_json::json!({ "fault_message": bound_fault(message) }).to_string()
            }
        }
    }
}

/// `message` as a string, bounded ([`crate::echo::bound_fault`]) without copying a short one.
fn bounded(message: impl ToString) -> String {
    let message = message.to_string();
    match bound_fault(&message) {
        Cow::Borrowed(_) => message,
        Cow::Owned(bounded) => bounded,
    }
}

impl From<ApiError> for ApiResponse {
    fn from(e: ApiError) -> Self {
        match &e {
            ApiError::UnsupportedMethod { allow, .. } => ApiResponse::FaultWith {
                status: 405,
                allow: Some(allow.clone()),
                message: bounded(&e),
            },
            _ => ApiResponse::fault(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_body_is_escaped_json() {
        let r = ApiResponse::fault("bad \"x\"");
        assert_eq!(r.status(), 400);
        let v: serde_json::Value = serde_json::from_str(&r.body()).unwrap();
        assert_eq!(v["fault_message"], "bad \"x\"");
    }

    #[test]
    fn long_echoes_are_bounded_however_the_fault_was_made() {
        let path = format!("/{}", "x".repeat(30_000));
        let from_error: ApiResponse = ApiError::UnknownPath(path.clone()).into();
        let built = ApiResponse::Fault(format!("unknown path {path}"));
        for r in [from_error, built] {
            let body = r.body();
            assert!(body.len() < 400, "{} bytes", body.len());
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let m = v["fault_message"].as_str().unwrap();
            assert!(m.starts_with("unknown path /xxx"), "{m}");
            assert!(m.ends_with("(30001 bytes, truncated)"), "{m}");
        }
    }

    #[test]
    fn other_statuses_carry_a_fault_message() {
        let r = ApiResponse::fault_with(413, "too big");
        assert_eq!(r.status(), 413);
        assert_eq!(r.body(), r#"{"fault_message":"too big"}"#);
        let e = ApiError::UnsupportedMethod {
            method: "POST".into(),
            path: "/vm".into(),
            allow: "PATCH".into(),
        };
        let r = ApiResponse::from(e);
        assert_eq!((r.status(), r.allow()), (405, Some("PATCH")));
        assert!(
            r.body()
                .contains("POST is not a method this API takes; /vm takes PATCH")
        );
    }

    #[test]
    fn statuses() {
        assert_eq!(ApiResponse::NoContent.status(), 204);
        assert_eq!(ApiResponse::NoContent.body(), "");
        assert_eq!(ApiResponse::json(&[1, 2]).status(), 200);
        assert_eq!(ApiResponse::json(&[1, 2]).body(), "[1,2]");
    }
}
