//! `PUT /vsock`: the vsock device and its host-side Unix socket.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Firecracker's `Vsock` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's context id (the VMM checks it is 3 or more).
    pub guest_cid: u32,
    /// The host-side Unix socket.
    pub uds_path: PathBuf,
    /// Firecracker's deprecated device id; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiRequest;
    use crate::requests::{parse_request, tests::fault};

    #[test]
    fn good_body() {
        let body = br#"{"guest_cid": 3, "uds_path": "/tmp/v.sock", "vsock_id": "vsock0"}"#;
        let want = Vsock {
            guest_cid: 3,
            uds_path: "/tmp/v.sock".into(),
            vsock_id: Some("vsock0".into()),
        };
        assert_eq!(
            parse_request("PUT", "/vsock", body).unwrap(),
            ApiRequest::PutVsock(want)
        );
        let body = br#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#;
        assert!(parse_request("PUT", "/vsock", body).is_ok());
    }

    #[test]
    fn errors_name_the_field() {
        let f = fault(
            "PUT",
            "/vsock",
            r#"{"guest_cid": 3, "uds_path": "/v", "cid": 3}"#,
        );
        assert!(f.starts_with("vsock: unknown field `cid`"), "{f}");
        let f = fault("PUT", "/vsock", r#"{"guest_cid": -1, "uds_path": "/v"}"#);
        assert!(f.starts_with("vsock: invalid value: integer `-1`"), "{f}");
    }

    #[test]
    fn wrong_method() {
        assert_eq!(
            fault("PATCH", "/vsock", "{}"),
            "/vsock does not accept PATCH"
        );
    }
}
