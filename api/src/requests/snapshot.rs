//! `PUT /snapshot/create`, `PUT /snapshot/load` and Kiln's `PUT /snapshot/working-set`.
//!
//! A load body names its memory file either the current way (`mem_backend`) or the deprecated
//! way (`mem_file_path`); both parse into the same [`SnapshotLoad`], so the VMM sees one shape.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Full or diff (only pages dirtied since the last snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    #[default]
    Full,
    /// Only the pages dirtied since the last snapshot (needs `track_dirty_pages`).
    Diff,
}

/// Firecracker's `SnapshotCreateParams` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// Full when absent.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Where the VM state goes.
    pub snapshot_path: PathBuf,
    /// Where guest memory goes.
    pub mem_file_path: PathBuf,
}

/// Kiln's `PUT /snapshot/working-set` body: write the guest pages this VM has touched since its
/// snapshot was loaded to `path`, for later loads of the same snapshot to prefault
/// ([`SnapshotLoad::working_set_path`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkingSetSave {
    /// The file to write (replaced atomically).
    pub path: PathBuf,
}

/// Firecracker's memory backend kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    /// Guest memory is read from (mapped from) a file.
    File,
    /// Guest memory pages are served by an external process over userfaultfd: `backend_path` is
    /// its Unix socket, which receives the regions and the userfaultfd (Firecracker's protocol).
    Uffd,
}

/// Firecracker's `MemoryBackend` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// A file, or a page-fault handler's socket.
    pub backend_type: MemBackendType,
    /// The memory file, or the handler's Unix socket.
    pub backend_path: PathBuf,
}

/// Firecracker's `NetworkOverride`: the restored interface `iface_id` uses the host TAP device
/// `host_dev_name` instead of the one saved in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface, by the id it was configured with.
    pub iface_id: String,
    /// The host TAP device to use.
    pub host_dev_name: String,
}

/// Kiln's `DriveOverride`: the restored drive `drive_id` uses other files than the ones saved
/// in the snapshot; each clone of a snapshot taken with a copy-on-write drive needs its own
/// overlay (a copy of the one saved, or an empty file for the base's original content).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    /// The drive, by the id it was configured with.
    pub drive_id: String,
    /// A new backing file (with an overlay, the base), the same size as the saved one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// A new copy-on-write overlay, for a drive saved with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cow_overlay_path: Option<PathBuf>,
}

/// Longest Linux network device name (IFNAMSIZ less its NUL).
pub const MAX_IFNAME_LEN: usize = 15;

/// Firecracker's `SnapshotLoadParams` body, with the memory file always in `mem_backend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SnapshotLoadBody")]
pub struct SnapshotLoad {
    /// The VM state file.
    pub snapshot_path: PathBuf,
    /// The memory file.
    pub mem_backend: MemBackend,
    /// Track dirty pages after loading, for later diff snapshots (`track_dirty_pages`, or the
    /// deprecated `enable_diff_snapshots`).
    pub track_dirty_pages: bool,
    /// Resume the VM once loaded (otherwise it stays paused).
    pub resume_vm: bool,
    /// A new host socket for the vsock device, so clones of one snapshot can run side by side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// New host TAP devices for network interfaces, one entry per interface at most.
    pub network_overrides: Vec<NetworkOverride>,
    /// Kiln's extension: other files for drives, one entry per drive at most.
    pub drive_overrides: Vec<DriveOverride>,
    /// Advance the guest's kvmclock by the wall-clock time since the snapshot was taken
    /// (`KVM_CLOCK_REALTIME`), instead of resuming it where it stopped.
    pub clock_realtime: bool,
    /// Kiln's extension: a working set written by `PUT /snapshot/working-set` in an earlier load
    /// of the same snapshot; its pages are mapped in before the VM runs, so the guest does not
    /// fault them in one at a time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub working_set_path: Option<PathBuf>,
}

/// Firecracker's `VsockOverride` object: the restored vsock device listens here instead of at
/// the `uds_path` saved in the snapshot. The guest CID is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The host Unix socket path.
    pub uds_path: PathBuf,
}

/// The body as sent, before the two ways of naming the memory file are reconciled.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotLoadBody {
    snapshot_path: PathBuf,
    #[serde(default)]
    mem_backend: Option<MemBackend>,
    #[serde(default)]
    mem_file_path: Option<PathBuf>,
    #[serde(default)]
    enable_diff_snapshots: Option<bool>,
    #[serde(default)]
    track_dirty_pages: Option<bool>,
    #[serde(default)]
    resume_vm: bool,
    #[serde(default)]
    vsock_override: Option<VsockOverride>,
    #[serde(default)]
    network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    drive_overrides: Vec<DriveOverride>,
    #[serde(default)]
    clock_realtime: bool,
    #[serde(default)]
    working_set_path: Option<PathBuf>,
}

impl TryFrom<SnapshotLoadBody> for SnapshotLoad {
    type Error = String;

    fn try_from(body: SnapshotLoadBody) -> Result<Self, String> {
        let mem_backend = match (body.mem_backend, body.mem_file_path) {
            (Some(_), Some(_)) => {
                return Err("give mem_backend or the deprecated mem_file_path, not both".into());
            }
            (None, None) => return Err("missing field `mem_backend`".into()),
            (None, Some(path)) => MemBackend {
                backend_type: MemBackendType::File,
                backend_path: path,
            },
            (Some(backend), None) => backend,
        };
        for (i, o) in body.network_overrides.iter().enumerate() {
            if o.iface_id.is_empty() {
                return Err(format!("network_overrides[{i}].iface_id is empty"));
            }
            let name = &o.host_dev_name;
            if name.is_empty()
                || name.len() > MAX_IFNAME_LEN
                || name.contains(['/', ' ', '\0'])
                || name == "."
                || name == ".."
            {
                return Err(format!(
                    "network_overrides[{i}].host_dev_name {name:?} is not a Linux network device name (1 to {MAX_IFNAME_LEN} bytes, no '/' or space)"
                ));
            }
            if body.network_overrides[..i]
                .iter()
                .any(|p| p.iface_id == o.iface_id)
            {
                return Err(format!(
                    "network_overrides[{i}]: iface_id {:?} is overridden twice",
                    o.iface_id
                ));
            }
        }
        for (i, o) in body.drive_overrides.iter().enumerate() {
            if o.drive_id.is_empty() {
                return Err(format!("drive_overrides[{i}].drive_id is empty"));
            }
            if o.path_on_host.is_none() && o.cow_overlay_path.is_none() {
                return Err(format!(
                    "drive_overrides[{i}] ({:?}) changes nothing: give path_on_host, \
                     cow_overlay_path or both",
                    o.drive_id
                ));
            }
            if body.drive_overrides[..i]
                .iter()
                .any(|p| p.drive_id == o.drive_id)
            {
                return Err(format!(
                    "drive_overrides[{i}]: drive_id {:?} is overridden twice",
                    o.drive_id
                ));
            }
        }
        let track_dirty_pages = match (body.track_dirty_pages, body.enable_diff_snapshots) {
            (Some(a), Some(b)) if a != b => {
                return Err(
                    "track_dirty_pages and the deprecated enable_diff_snapshots disagree".into(),
                );
            }
            (a, b) => a.or(b).unwrap_or(false),
        };
        Ok(SnapshotLoad {
            snapshot_path: body.snapshot_path,
            mem_backend,
            track_dirty_pages,
            resume_vm: body.resume_vm,
            vsock_override: body.vsock_override,
            network_overrides: body.network_overrides,
            drive_overrides: body.drive_overrides,
            clock_realtime: body.clock_realtime,
            working_set_path: body.working_set_path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiRequest;
    use crate::requests::{parse_request, tests::fault};

    #[test]
    fn create_good_bodies() {
        let body = br#"{"snapshot_type": "Diff", "snapshot_path": "/s", "mem_file_path": "/m"}"#;
        let want = SnapshotCreate {
            snapshot_type: SnapshotType::Diff,
            snapshot_path: "/s".into(),
            mem_file_path: "/m".into(),
        };
        assert_eq!(
            parse_request("PUT", "/snapshot/create", body).unwrap(),
            ApiRequest::CreateSnapshot(want)
        );
        let body = br#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#;
        let ApiRequest::CreateSnapshot(c) = parse_request("PUT", "/snapshot/create", body).unwrap()
        else {
            panic!("wrong variant")
        };
        assert_eq!(c.snapshot_type, SnapshotType::Full);
    }

    #[test]
    fn create_errors_name_the_field() {
        let f = fault(
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "version": "1.0"}"#,
        );
        assert!(
            f.starts_with("snapshot/create: unknown field `version`"),
            "{f}"
        );
        let f = fault("PUT", "/snapshot/create", r#"{"snapshot_path": "/s"}"#);
        assert!(
            f.starts_with("snapshot/create: missing field `mem_file_path`"),
            "{f}"
        );
    }

    #[test]
    fn load_with_mem_backend_or_deprecated_mem_file_path() {
        let want = SnapshotLoad {
            snapshot_path: "/s".into(),
            mem_backend: MemBackend {
                backend_type: MemBackendType::File,
                backend_path: "/m".into(),
            },
            track_dirty_pages: true,
            resume_vm: true,
            vsock_override: None,
            network_overrides: Vec::new(),
            drive_overrides: Vec::new(),
            clock_realtime: false,
            working_set_path: None,
        };
        let body = br#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File",
                        "backend_path": "/m"}, "enable_diff_snapshots": true, "resume_vm": true}"#;
        assert_eq!(
            parse_request("PUT", "/snapshot/load", body).unwrap(),
            ApiRequest::LoadSnapshot(want.clone())
        );
        let body = br#"{"snapshot_path": "/s", "mem_file_path": "/m",
                        "enable_diff_snapshots": true, "resume_vm": true}"#;
        assert_eq!(
            parse_request("PUT", "/snapshot/load", body).unwrap(),
            ApiRequest::LoadSnapshot(want.clone())
        );
        let body = br#"{"snapshot_path": "/s", "mem_file_path": "/m",
                        "track_dirty_pages": true, "resume_vm": true,
                        "vsock_override": {"uds_path": "/v.sock"}}"#;
        let mut with_override = want;
        with_override.vsock_override = Some(VsockOverride {
            uds_path: "/v.sock".into(),
        });
        assert_eq!(
            parse_request("PUT", "/snapshot/load", body).unwrap(),
            ApiRequest::LoadSnapshot(with_override)
        );
    }

    #[test]
    fn working_sets_are_saved_and_loaded_by_path() {
        let body = br#"{"snapshot_path": "/s", "mem_file_path": "/m", "working_set_path": "/ws"}"#;
        let ApiRequest::LoadSnapshot(load) = parse_request("PUT", "/snapshot/load", body).unwrap()
        else {
            panic!("wrong variant")
        };
        assert_eq!(load.working_set_path, Some(PathBuf::from("/ws")));
        assert_eq!(
            parse_request("PUT", "/snapshot/working-set", br#"{"path": "/ws"}"#).unwrap(),
            ApiRequest::SaveWorkingSet(WorkingSetSave { path: "/ws".into() })
        );
        let f = fault(
            "PUT",
            "/snapshot/working-set",
            r#"{"path": "/ws", "pages": 1}"#,
        );
        assert!(
            f.starts_with("snapshot/working-set: unknown field `pages`"),
            "{f}"
        );
        let f = fault("PUT", "/snapshot/working-set", "{}");
        assert!(
            f.starts_with("snapshot/working-set: missing field `path`"),
            "{f}"
        );
    }

    #[test]
    fn load_with_network_overrides() {
        let body = br#"{"snapshot_path": "/s", "mem_file_path": "/m",
                        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap-clone-1"}]}"#;
        let ApiRequest::LoadSnapshot(load) = parse_request("PUT", "/snapshot/load", body).unwrap()
        else {
            panic!("wrong variant")
        };
        assert_eq!(
            load.network_overrides,
            [NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tap-clone-1".into()
            }]
        );
        // And back: a client serializes the same shape.
        let json = serde_json::to_value(&load).unwrap();
        assert_eq!(json["network_overrides"][0]["host_dev_name"], "tap-clone-1");
        assert!(json.get("vsock_override").is_none());
    }

    #[test]
    fn load_errors() {
        let f = fault("PUT", "/snapshot/load", r#"{"snapshot_path": "/s"}"#);
        assert!(
            f.starts_with("snapshot/load: missing field `mem_backend`"),
            "{f}"
        );
        let f = fault(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#,
        );
        assert!(f.starts_with("snapshot/load: give mem_backend or"), "{f}");
        let f = fault(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "network_overrides": [
                {"iface_id": "eth0", "host_dev_name": "tap-with-a-very-long-name"}]}"#,
        );
        assert!(
            f.starts_with("snapshot/load: network_overrides[0].host_dev_name \"tap-with-a-very-long-name\" is not"),
            "{f}"
        );
        let f = fault(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "network_overrides": [{"iface_id": "eth0"}]}"#,
        );
        assert!(
            f.starts_with("snapshot/load: missing field `host_dev_name`"),
            "{f}"
        );
        let f = fault(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "network_overrides": [
                {"iface_id": "eth0", "host_dev_name": "tap0"},
                {"iface_id": "eth0", "host_dev_name": "tap1"}]}"#,
        );
        assert!(f.contains("iface_id \"eth0\" is overridden twice"), "{f}");
        let f = fault(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "track_dirty_pages": true,
                "enable_diff_snapshots": false}"#,
        );
        assert!(
            f.starts_with("snapshot/load: track_dirty_pages and the deprecated"),
            "{f}"
        );
        let f = fault(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "vsock_override": {"path": "/v"}}"#,
        );
        assert!(f.starts_with("snapshot/load: unknown field `path`"), "{f}");
    }

    #[test]
    fn uffd_network_overrides_and_clock_realtime_are_taken() {
        let body = br#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd",
                        "backend_path": "/run/uffd.sock"}, "clock_realtime": true,
                        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap7"}]}"#;
        let ApiRequest::LoadSnapshot(l) = parse_request("PUT", "/snapshot/load", body).unwrap()
        else {
            panic!("wrong variant")
        };
        assert_eq!(l.mem_backend.backend_type, MemBackendType::Uffd);
        assert!(l.clock_realtime);
        assert_eq!(l.network_overrides[0].host_dev_name, "tap7");
    }

    #[test]
    fn wrong_method() {
        assert_eq!(
            fault("PATCH", "/snapshot/load", "{}"),
            "/snapshot/load does not accept PATCH"
        );
        assert_eq!(
            fault("GET", "/snapshot/create", ""),
            "/snapshot/create does not accept GET"
        );
    }

    #[test]
    fn drive_overrides_are_taken_and_checked() {
        let body = br#"{"snapshot_path": "/s", "mem_file_path": "/m", "drive_overrides": [
                        {"drive_id": "rootfs", "cow_overlay_path": "/sb/2/overlay.img"},
                        {"drive_id": "data", "path_on_host": "/d2.img"}]}"#;
        let ApiRequest::LoadSnapshot(l) = parse_request("PUT", "/snapshot/load", body).unwrap()
        else {
            panic!("wrong variant")
        };
        assert_eq!(
            l.drive_overrides,
            vec![
                DriveOverride {
                    drive_id: "rootfs".into(),
                    path_on_host: None,
                    cow_overlay_path: Some("/sb/2/overlay.img".into()),
                },
                DriveOverride {
                    drive_id: "data".into(),
                    path_on_host: Some("/d2.img".into()),
                    cow_overlay_path: None,
                },
            ]
        );
        let bad = |overrides: &str| {
            fault(
                "PUT",
                "/snapshot/load",
                &format!(
                    r#"{{"snapshot_path": "/s", "mem_file_path": "/m", "drive_overrides": {overrides}}}"#
                ),
            )
        };
        let f = bad(r#"[{"drive_id": "rootfs"}]"#);
        assert!(
            f.starts_with("snapshot/load: drive_overrides[0] (\"rootfs\") changes nothing"),
            "{f}"
        );
        let f = bad(
            r#"[{"drive_id": "a", "path_on_host": "/x"}, {"drive_id": "a", "path_on_host": "/y"}]"#,
        );
        assert!(
            f.contains("drive_overrides[1]: drive_id \"a\" is overridden twice"),
            "{f}"
        );
        let f = bad(r#"[{"drive_id": "", "path_on_host": "/x"}]"#);
        assert!(f.contains("drive_overrides[0].drive_id is empty"), "{f}");
        let f = bad(r#"[{"drive_id": "a", "overlay": "/x"}]"#);
        assert!(f.contains("unknown field `overlay`"), "{f}");
    }
}
