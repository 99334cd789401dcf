//! What the VMM's handler answers: Firecracker's three outcomes (204, 200 with JSON, 400 with a
//! fault message). The HTTP encoding lives in [`crate::http`].

use serde::Serialize;

use crate::ApiError;

/// The answer to one [`crate::ApiRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiResponse {
    /// Done, nothing to say: 204 No Content.
    NoContent,
    /// Done, with a JSON body: 200 OK.
    Json(String),
    /// Refused: 400 Bad Request with `{"fault_message": ...}`. Firecracker uses 400 for every error.
    Fault(String),
}

impl ApiResponse {
    /// A 200 answer carrying `value` as JSON (a fault if it cannot be serialized).
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => ApiResponse::Json(body),
            Err(e) => ApiResponse::Fault(format!("cannot serialize the answer: {e}")),
        }
    }

    /// A 400 answer with `message` as its fault message.
    pub fn fault(message: impl ToString) -> Self {
        ApiResponse::Fault(message.to_string())
    }

    /// The HTTP status code this answer is sent with.
    pub fn status(&self) -> u16 {
        match self {
            ApiResponse::NoContent => 204,
            ApiResponse::Json(_) => 200,
            ApiResponse::Fault(_) => 400,
        }
    }

    /// The body sent with this answer (empty for 204).
    pub fn body(&self) -> String {
        match self {
            ApiResponse::NoContent => String::new(),
            ApiResponse::Json(body) => body.clone(),
            ApiResponse::Fault(message) => {
                serde_json::json!({ "fault_message": message }).to_string()
            }
        }
    }
}

impl From<ApiError> for ApiResponse {
    fn from(e: ApiError) -> Self {
        ApiResponse::Fault(e.to_string())
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
    fn statuses() {
        assert_eq!(ApiResponse::NoContent.status(), 204);
        assert_eq!(ApiResponse::NoContent.body(), "");
        assert_eq!(ApiResponse::json(&[1, 2]).status(), 200);
        assert_eq!(ApiResponse::json(&[1, 2]).body(), "[1,2]");
    }
}
