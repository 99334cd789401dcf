//! `PUT`, `PATCH` and `GET /machine-config`: vCPUs, memory, SMT, huge pages, dirty-page tracking
//! and Firecracker's (deprecated) static CPU templates.

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// What backs guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// 4 KiB pages.
    #[default]
    None,
    /// 4 KiB pages with transparent huge pages asked for (`madvise(MADV_HUGEPAGE)`).
    Transparent,
    /// 2 MiB pages from hugetlbfs (the host must have them reserved); memory must be a whole
    /// number of them.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// Firecracker's static CPU templates (deprecated there). Kiln takes `None` only: its guests
/// see the host's CPU as KVM supports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuTemplate {
    /// Intel Skylake/Cascade Lake as a C3 instance.
    C3,
    /// Intel as a T2 instance.
    T2,
    /// T2 for snapshots moved between Skylake and Cascade Lake.
    T2S,
    /// T2 for Cascade Lake and Ice Lake.
    T2CL,
    /// T2 for AMD.
    T2A,
    /// Graviton2 as V1N1 (aarch64).
    V1N1,
    /// No template.
    None,
}

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
    /// What backs guest memory.
    #[serde(default)]
    pub huge_pages: HugePages,
    /// A static CPU template; only `None` is taken (deprecated in Firecracker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
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
    /// New huge pages setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
    /// New CPU template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
}

impl MachineConfigUpdate {
    /// Refuses an update that changes nothing: most likely a client bug worth telling about.
    pub(crate) fn check(&self) -> Result<(), ApiError> {
        if *self == Self::default() {
            return Err(ApiError::bad_body(
                "machine-config",
                "PATCH needs at least one of vcpu_count, mem_size_mib, smt, track_dirty_pages, huge_pages, cpu_template",
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
            huge_pages: self.huge_pages.unwrap_or(config.huge_pages),
            cpu_template: self.cpu_template.or(config.cpu_template),
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
            huge_pages: HugePages::None,
            cpu_template: None,
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
            r#"{"vcpu_count": 1, "mem_size_mib": 1, "cpu_template": "T9"}"#,
        );
        assert!(f.starts_with("machine-config: unknown variant `T9`"), "{f}");
        let f = fault(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 1, "huge_pages": "1G"}"#,
        );
        assert!(f.starts_with("machine-config: unknown variant `1G`"), "{f}");
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
            huge_pages: HugePages::None,
            cpu_template: None,
        };
        let after = update.apply(&before);
        assert_eq!((after.vcpu_count, after.mem_size_mib), (2, 512));
    }

    #[test]
    fn huge_pages_and_cpu_template_parse() {
        let body = br#"{"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "2M", "cpu_template": "None"}"#;
        let ApiRequest::PutMachineConfig(m) =
            parse_request("PUT", "/machine-config", body).unwrap()
        else {
            panic!("wrong variant")
        };
        assert_eq!(
            (m.huge_pages, m.cpu_template),
            (HugePages::Hugetlbfs2M, Some(CpuTemplate::None))
        );
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["huge_pages"], "2M");
        let req = parse_request(
            "PATCH",
            "/machine-config",
            br#"{"huge_pages": "Transparent"}"#,
        );
        let ApiRequest::PatchMachineConfig(u) = req.unwrap() else {
            panic!("wrong variant")
        };
        assert_eq!(u.apply(&m).huge_pages, HugePages::Transparent);
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
            "DELETE is not a method this API takes; /machine-config takes GET, PUT, PATCH"
        );
    }
}
