//! `PUT` and `PATCH /drives/{drive_id}`: block devices, and swapping a drive's backing file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// Firecracker's `cache_type`: whether the guest sees a volatile write cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// No flush advertised to the guest.
    #[default]
    Unsafe,
    /// Flush advertised and honoured.
    Writeback,
}

/// Firecracker's `io_engine`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Blocking reads and writes on the device's thread.
    #[default]
    Sync,
    /// io_uring (the VMM may refuse it).
    Async,
}

/// Firecracker's `Drive` body for `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's id; must equal the id in the path.
    pub drive_id: String,
    /// The backing file on the host.
    pub path_on_host: PathBuf,
    /// Boot from this drive.
    pub is_root_device: bool,
    /// Refuse guest writes.
    #[serde(default)]
    pub is_read_only: bool,
    /// Root partition by PARTUUID rather than the whole disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Write-cache behaviour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// I/O engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
}

/// Firecracker's `PartialDrive` body for `PATCH /drives/{drive_id}` (after boot: a new backing
/// file for an existing drive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    /// The drive's id; must equal the id in the path.
    pub drive_id: String,
    /// The new backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
}

/// The id in the body must be the id in the path, or the client is confused about which drive
/// it is changing.
pub(crate) fn check_id(path_id: &str, body_id: &str) -> Result<(), ApiError> {
    if path_id != body_id {
        return Err(ApiError::bad_body(
            "drives",
            format!("drive_id {body_id:?} in the body does not match {path_id:?} in the path"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiRequest;
    use crate::requests::{parse_request, tests::fault};

    #[test]
    fn put_good_body() {
        let body = br#"{"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true,
                        "is_read_only": true, "partuuid": "abc-1", "cache_type": "Writeback",
                        "io_engine": "Sync"}"#;
        let want = Drive {
            drive_id: "rootfs".into(),
            path_on_host: "/r.ext4".into(),
            is_root_device: true,
            is_read_only: true,
            partuuid: Some("abc-1".into()),
            cache_type: Some(CacheType::Writeback),
            io_engine: Some(IoEngine::Sync),
        };
        assert_eq!(
            parse_request("PUT", "/drives/rootfs", body).unwrap(),
            ApiRequest::PutDrive(want)
        );
        let body = br#"{"drive_id": "d1", "path_on_host": "/d", "is_root_device": false}"#;
        let ApiRequest::PutDrive(d) = parse_request("PUT", "/drives/d1", body).unwrap() else {
            panic!("wrong variant")
        };
        assert!(!d.is_read_only && d.cache_type.is_none() && d.io_engine.is_none());
    }

    #[test]
    fn put_errors_name_the_field() {
        let f = fault(
            "PUT",
            "/drives/d",
            r#"{"drive_id": "d", "path_on_host": "/d", "is_root_device": false, "rate_limiter": {}}"#,
        );
        assert!(f.starts_with("drives: unknown field `rate_limiter`"), "{f}");
        let f = fault(
            "PUT",
            "/drives/d",
            r#"{"drive_id": "d", "path_on_host": "/d"}"#,
        );
        assert!(
            f.starts_with("drives: missing field `is_root_device`"),
            "{f}"
        );
        let f = fault(
            "PUT",
            "/drives/d",
            r#"{"drive_id": "d", "path_on_host": "/d", "is_root_device": false, "cache_type": "None"}"#,
        );
        assert!(f.starts_with("drives: unknown variant `None`"), "{f}");
    }

    #[test]
    fn id_mismatch_is_refused() {
        let body = r#"{"drive_id": "other", "path_on_host": "/d", "is_root_device": false}"#;
        assert_eq!(
            fault("PUT", "/drives/rootfs", body),
            r#"drives: drive_id "other" in the body does not match "rootfs" in the path"#
        );
        let body = r#"{"drive_id": "other", "path_on_host": "/d"}"#;
        assert_eq!(
            fault("PATCH", "/drives/rootfs", body),
            r#"drives: drive_id "other" in the body does not match "rootfs" in the path"#
        );
    }

    #[test]
    fn patch_good_body_and_errors() {
        let body = br#"{"drive_id": "scratch", "path_on_host": "/new.img"}"#;
        let want = DriveUpdate {
            drive_id: "scratch".into(),
            path_on_host: Some("/new.img".into()),
        };
        assert_eq!(
            parse_request("PATCH", "/drives/scratch", body).unwrap(),
            ApiRequest::PatchDrive(want)
        );
        let f = fault(
            "PATCH",
            "/drives/s",
            r#"{"drive_id": "s", "is_read_only": true}"#,
        );
        assert!(f.starts_with("drives: unknown field `is_read_only`"), "{f}");
    }

    #[test]
    fn wrong_method() {
        assert_eq!(
            fault("GET", "/drives/rootfs", ""),
            "/drives/rootfs does not accept GET"
        );
    }
}
