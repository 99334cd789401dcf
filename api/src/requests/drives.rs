//! `PUT` and `PATCH /drives/{drive_id}`: block devices, and swapping a drive's backing file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::rate_limiter::RateLimiter;
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
    /// io_uring: requests are submitted, and finished when the kernel completes them.
    Async,
}

/// Firecracker's `Drive` body for `PUT /drives/{drive_id}` (and a `drives` entry of a config
/// file). A vhost-user drive (`socket`) is refused by name: Kiln's drives are files. Kiln adds
/// `cow_overlay_path`: `path_on_host` is then a base image opened read-only and every guest
/// write goes to that sparse overlay file instead, so many VMs can share one image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "DriveBody")]
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
    /// Kiln's extension: a sparse copy-on-write overlay over `path_on_host` (empty, or the
    /// same length) that takes the guest's writes; the base is never written.
    pub cow_overlay_path: Option<PathBuf>,
    /// Root partition by PARTUUID rather than the whole disk.
    pub partuuid: Option<String>,
    /// Write-cache behaviour.
    pub cache_type: Option<CacheType>,
    /// I/O engine.
    pub io_engine: Option<IoEngine>,
    /// Token buckets on the drive's bytes and requests.
    pub rate_limiter: Option<RateLimiter>,
}

/// Written with every key Firecracker writes for a drive, `socket` (always `null`) included,
/// and the defaults filled in (`Unsafe`, `Sync`) as Firecracker shows them; Kiln's
/// `cow_overlay_path` only when the drive has one.
impl Serialize for Drive {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let fields = 9 + usize::from(self.cow_overlay_path.is_some());
        let mut st = s.serialize_struct("Drive", fields)?;
        st.serialize_field("drive_id", &self.drive_id)?;
        st.serialize_field("partuuid", &self.partuuid)?;
        st.serialize_field("is_root_device", &self.is_root_device)?;
        st.serialize_field("cache_type", &self.cache_type.unwrap_or_default())?;
        st.serialize_field("is_read_only", &self.is_read_only)?;
        st.serialize_field("path_on_host", &self.path_on_host)?;
        if let Some(overlay) = &self.cow_overlay_path {
            st.serialize_field("cow_overlay_path", overlay)?;
        }
        st.serialize_field("rate_limiter", &self.rate_limiter)?;
        st.serialize_field("io_engine", &self.io_engine.unwrap_or_default())?;
        st.serialize_field("socket", &None::<PathBuf>)?;
        st.end()
    }
}

/// A `Drive` body as sent, before the vhost-user form is refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DriveBody {
    drive_id: String,
    #[serde(default)]
    path_on_host: Option<PathBuf>,
    is_root_device: bool,
    #[serde(default)]
    is_read_only: bool,
    #[serde(default)]
    cow_overlay_path: Option<PathBuf>,
    #[serde(default)]
    partuuid: Option<String>,
    #[serde(default)]
    cache_type: Option<CacheType>,
    #[serde(default)]
    io_engine: Option<IoEngine>,
    #[serde(default)]
    rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    socket: Option<PathBuf>,
}

impl TryFrom<DriveBody> for Drive {
    type Error = String;

    fn try_from(b: DriveBody) -> Result<Self, String> {
        if let Some(socket) = b.socket {
            return Err(format!(
                "Kiln has no vhost-user drives (socket {}): its drives are virtio-block devices \
                 backed by a file (path_on_host)",
                socket.display()
            ));
        }
        let path_on_host = b.path_on_host.ok_or("missing field `path_on_host`")?;
        if let (true, Some(overlay)) = (b.is_read_only, &b.cow_overlay_path) {
            return Err(format!(
                "is_read_only with cow_overlay_path {}: a drive with an overlay is writable (its \
                 base path_on_host is never written); drop one of them",
                overlay.display()
            ));
        }
        Ok(Drive {
            drive_id: b.drive_id,
            path_on_host,
            is_root_device: b.is_root_device,
            is_read_only: b.is_read_only,
            cow_overlay_path: b.cow_overlay_path,
            partuuid: b.partuuid,
            cache_type: b.cache_type,
            io_engine: b.io_engine,
            rate_limiter: b.rate_limiter,
        })
    }
}

/// Firecracker's `PartialDrive` body for `PATCH /drives/{drive_id}` (after boot: a new backing
/// file, new rate limits, or both, for an existing drive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    /// The drive's id; must equal the id in the path.
    pub drive_id: String,
    /// The new backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// New token buckets (a bucket left out keeps its current setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// Firecracker's rule for the ids in API paths: not empty, letters, digits and `_` only.
pub(crate) fn check_path_id(resource: &'static str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(ApiError::bad_body(resource, "The ID cannot be empty."));
    }
    if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) {
        return Err(ApiError::bad_body(
            resource,
            format!(
                "id {id:?}: API Resource IDs can only contain alphanumeric characters and underscores."
            ),
        ));
    }
    Ok(())
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
            cow_overlay_path: None,
            partuuid: Some("abc-1".into()),
            cache_type: Some(CacheType::Writeback),
            io_engine: Some(IoEngine::Sync),
            rate_limiter: None,
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
            r#"{"drive_id": "d", "path_on_host": "/d", "is_root_device": false, "rate": {}}"#,
        );
        assert!(f.starts_with("drives: unknown field `rate`"), "{f}");
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
    fn a_cow_overlay_is_taken_round_trips_and_cannot_be_read_only() {
        let body = br#"{"drive_id": "rootfs", "path_on_host": "/base.ext4", "is_root_device": true,
                        "cow_overlay_path": "/sb/1/overlay.img"}"#;
        let ApiRequest::PutDrive(d) = parse_request("PUT", "/drives/rootfs", body).unwrap() else {
            panic!("wrong variant")
        };
        assert_eq!(
            d.cow_overlay_path.as_deref(),
            Some(std::path::Path::new("/sb/1/overlay.img"))
        );
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["cow_overlay_path"], "/sb/1/overlay.img");
        let back: Drive = serde_json::from_value(json).unwrap();
        assert_eq!(back.cow_overlay_path, d.cow_overlay_path);
        let plain = serde_json::to_value(Drive {
            cow_overlay_path: None,
            ..d
        })
        .unwrap();
        assert!(plain.get("cow_overlay_path").is_none(), "{plain}");

        let f = fault(
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/b", "is_root_device": true,
                "is_read_only": true, "cow_overlay_path": "/o"}"#,
        );
        assert!(
            f.starts_with(
                "drives: is_read_only with cow_overlay_path /o: a drive with an overlay is writable"
            ),
            "{f}"
        );
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
            rate_limiter: None,
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
    fn rate_limiters_vhost_user_and_ids() {
        let body = br#"{"drive_id": "d", "path_on_host": "/d", "is_root_device": false,
                        "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#;
        let ApiRequest::PutDrive(d) = parse_request("PUT", "/drives/d", body).unwrap() else {
            panic!("wrong variant")
        };
        assert_eq!(d.rate_limiter.unwrap().bandwidth.unwrap().size, 1000);
        let body =
            br#"{"drive_id": "d", "rate_limiter": {"ops": {"size": 10, "refill_time": 1000}}}"#;
        let ApiRequest::PatchDrive(u) = parse_request("PATCH", "/drives/d", body).unwrap() else {
            panic!("wrong variant")
        };
        assert_eq!(u.rate_limiter.unwrap().ops.unwrap().size, 10);

        let f = fault(
            "PUT",
            "/drives/v",
            r#"{"drive_id": "v", "is_root_device": false, "socket": "/run/vhost.sock"}"#,
        );
        assert!(
            f.starts_with("drives: Kiln has no vhost-user drives (socket /run/vhost.sock)"),
            "{f}"
        );
        let f = fault(
            "PUT",
            "/drives/d",
            r#"{"drive_id": "d", "is_root_device": false}"#,
        );
        assert!(f.starts_with("drives: missing field `path_on_host`"), "{f}");
        let body = r#"{"drive_id": "a-b", "path_on_host": "/d", "is_root_device": false}"#;
        assert_eq!(
            fault("PUT", "/drives/a-b", body),
            "drives: id \"a-b\": API Resource IDs can only contain alphanumeric characters and underscores."
        );
    }

    #[test]
    fn wrong_method() {
        assert_eq!(
            fault("GET", "/drives/rootfs", ""),
            "/drives/rootfs does not accept GET"
        );
    }
}
