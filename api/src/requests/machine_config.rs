//! `PUT`, `PATCH` and `GET /machine-config`: vCPUs, memory and dirty-page tracking.

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// Firecracker's `MachineConfiguration` body, also the answer to `GET /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: usize,
    /// Simultaneous multithreading (the VMM decides whether it can honour `true`).
    #[serde(default)]
    pub smt: bool,
    /// Track dirty pages, for diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
}

/// Firecracker's `MachineConfiguration` as a `PATCH` body: only the fields to change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// New number of vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u8>,
    /// New guest memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<usize>,
    /// New SMT setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// New dirty-page tracking setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
}

impl MachineConfigUpdate {
    /// Refuses an update that changes nothing: most likely a client bug worth telling about.
    pub(crate) fn check(&self) -> Result<(), ApiError> {
        if *self == Self::default() {
            return Err(ApiError::bad_body(
                "machine-config",
                "PATCH needs at least one of vcpu_count, mem_size_mib, smt, track_dirty_pages",
            ));
        }
        Ok(())
    }

    /// `config` with this update applied.
    pub fn apply(&self, config: &MachineConfig) -> MachineConfig {
        MachineConfig {
            vcpu_count: self.vcpu_count.unwrap_or(config.vcpu_count),
            mem_size_mib: self.mem_size_mib.unwrap_or(config.mem_size_mib),
            smt: self.smt.unwrap_or(config.smt),
            track_dirty_pages: self.track_dirty_pages.unwrap_or(config.track_dirty_pages),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiRequest;
    use crate::requests::{parse_request, tests::fault};

    #[test]
    fn put_good_body() {
        let body = br#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false,
                        "track_dirty_pages": true}"#;
        let want = MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            smt: false,
            track_dirty_pages: true,
        };
        assert_eq!(
            parse_request("PUT", "/machine-config", body).unwrap(),
            ApiRequest::PutMachineConfig(want)
        );
    }

    #[test]
    fn put_errors_name_the_field() {
        let f = fault(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 1, "cpu_template": "T2"}"#,
        );
        assert!(
            f.starts_with("machine-config: unknown field `cpu_template`"),
            "{f}"
        );
        let f = fault("PUT", "/machine-config", r#"{"vcpu_count": 1}"#);
        assert!(
            f.starts_with("machine-config: missing field `mem_size_mib`"),
            "{f}"
        );
        let f = fault(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 300, "mem_size_mib": 1}"#,
        );
        assert!(
            f.starts_with("machine-config: invalid value: integer `300`"),
            "{f}"
        );
    }

    #[test]
    fn patch_applies_only_given_fields() {
        let req = parse_request("PATCH", "/machine-config", br#"{"mem_size_mib": 512}"#).unwrap();
        let ApiRequest::PatchMachineConfig(update) = req else {
            panic!("wrong variant")
        };
        let before = MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
        };
        let after = update.apply(&before);
        assert_eq!((after.vcpu_count, after.mem_size_mib), (2, 512));
    }

    #[test]
    fn patch_errors() {
        let f = fault("PATCH", "/machine-config", "{}");
        assert!(
            f.starts_with("machine-config: PATCH needs at least one"),
            "{f}"
        );
        let f = fault("PATCH", "/machine-config", r#"{"vcpus": 2}"#);
        assert!(
            f.starts_with("machine-config: unknown field `vcpus`"),
            "{f}"
        );
    }

    #[test]
    fn wrong_method() {
        assert_eq!(
            fault("DELETE", "/machine-config", ""),
            "/machine-config does not accept DELETE"
        );
    }
}
