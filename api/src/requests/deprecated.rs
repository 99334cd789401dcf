//! Which deprecated Firecracker fields a request used: its answer then carries `Deprecation:
//! true`, and kiln-vmm logs a warning, as Firecracker does. The parsed request types fold
//! deprecated forms into current ones, so this looks at the body as sent.

use serde_json::Value;

/// `(path, field, what to use instead)` for every deprecated field Kiln takes.
const DEPRECATED: &[(&str, &str, &str)] = &[
    ("/vsock", "vsock_id", "nothing (the id is ignored)"),
    ("/snapshot/load", "mem_file_path", "mem_backend"),
    (
        "/snapshot/load",
        "enable_diff_snapshots",
        "track_dirty_pages",
    ),
    (
        "/machine-config",
        "cpu_template",
        "nothing (static CPU templates are deprecated)",
    ),
];

/// The deprecated fields `body` uses on `target`, each with its replacement, e.g.
/// `mem_file_path (use mem_backend)`; empty for most requests.
pub fn deprecated_fields(target: &str, body: &[u8]) -> Vec<String> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if !DEPRECATED.iter().any(|(p, _, _)| *p == path) {
        return Vec::new();
    }
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    DEPRECATED
        .iter()
        .filter(|(p, field, _)| *p == path && fields.contains_key(*field))
        .map(|(_, field, instead)| format!("{field} (use {instead})"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deprecated_fields_are_found_only_where_they_are() {
        let body =
            br#"{"snapshot_path": "/s", "mem_file_path": "/m", "enable_diff_snapshots": true}"#;
        assert_eq!(
            deprecated_fields("/snapshot/load", body),
            [
                "mem_file_path (use mem_backend)",
                "enable_diff_snapshots (use track_dirty_pages)"
            ]
        );
        assert!(deprecated_fields("/snapshot/create", body).is_empty());
        let v = br#"{"guest_cid": 3, "uds_path": "/v", "vsock_id": "v"}"#;
        assert_eq!(deprecated_fields("/vsock?x", v).len(), 1);
        assert!(deprecated_fields("/vsock", br#"{"guest_cid": 3, "uds_path": "/v"}"#).is_empty());
        assert!(deprecated_fields("/vsock", b"not json").is_empty());
    }
}
