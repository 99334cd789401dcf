//! `GET /`, `GET /version` and `GET /vm/config`: what the VMM answers about itself. These types
//! are built by the VMM and read by clients; no request carries them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::balloon::Balloon;
use super::boot_source::BootSource;
use super::drives::Drive;
use super::logger::Logger;
use super::machine_config::MachineConfig;
use super::metrics::Metrics;
use super::mmds::MmdsConfig;
use super::network_interfaces::NetworkInterface;
use super::vsock::Vsock;

/// The `app_name` every Kiln VMM reports.
pub const APP_NAME: &str = "kiln";

/// Where the instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Configured (or being configured), not booted.
    #[serde(rename = "Not started")]
    NotStarted,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
}

/// Firecracker's `InstanceInfo`, the answer to `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceInfo {
    /// The instance's id (the VMM's `--id`).
    pub id: String,
    /// Its state.
    pub state: InstanceState,
    /// The VMM's version.
    pub vmm_version: String,
    /// Always [`APP_NAME`].
    pub app_name: String,
}

impl InstanceInfo {
    /// The info for instance `id` in `state`, with this crate's version and [`APP_NAME`].
    pub fn new(id: impl Into<String>, state: InstanceState) -> Self {
        Self {
            id: id.into(),
            state,
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            app_name: APP_NAME.to_string(),
        }
    }
}

/// Firecracker's `FirecrackerVersion`, the answer to `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionInfo {
    /// The VMM's version (Kiln's own, under Firecracker's key).
    pub firecracker_version: String,
}

impl VersionInfo {
    /// This build's version.
    pub fn current() -> Self {
        Self {
            firecracker_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// Firecracker's `FullVmConfiguration`, the answer to `GET /vm/config`, with every key
/// Firecracker writes, `null` (or `[]`) where nothing is configured: the same shape as a
/// `--config-file`, so its output can be fed back as one. Devices Kiln does not have by design
/// (entropy, pmem, hotplugged memory, custom CPU templates) are always `null` or empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfig {
    /// `balloon`, if any (its current target and statistics interval).
    #[serde(default)]
    pub balloon: Option<Balloon>,
    /// `drives`, in attachment order.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// `boot-source`, once set (`null` after a snapshot load, as Firecracker).
    #[serde(rename = "boot-source", default)]
    pub boot_source: Option<BootSource>,
    /// `cpu-config`: always `null`.
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<Value>,
    /// `logger`, once configured.
    #[serde(default)]
    pub logger: Option<Logger>,
    /// `machine-config`.
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
    /// `metrics`, once configured.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// `mmds-config`, once configured.
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<MmdsConfig>,
    /// `network-interfaces`, in attachment order.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// `vsock`, if any.
    #[serde(default)]
    pub vsock: Option<Vsock>,
    /// `entropy`: always `null`.
    #[serde(default)]
    pub entropy: Option<Value>,
    /// `pmem`: always empty.
    #[serde(default)]
    pub pmem: Vec<Value>,
    /// `memory-hotplug`: always `null`.
    #[serde(rename = "memory-hotplug", default)]
    pub memory_hotplug: Option<Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::requests::tests::fault;

    #[test]
    fn instance_info_json() {
        let info = InstanceInfo::new("vm-1", InstanceState::NotStarted);
        let v = serde_json::to_value(&info).unwrap();
        assert_eq!(v["state"], "Not started");
        assert_eq!(v["app_name"], "kiln");
        assert_eq!(v["id"], "vm-1");
        assert_eq!(v["vmm_version"], env!("CARGO_PKG_VERSION"));
        let back: InstanceInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back, info);
    }

    #[test]
    fn full_config_round_trips_with_firecracker_keys() {
        let json = r#"{"boot-source": {"kernel_image_path": "/k"},
                       "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
                       "drives": [{"drive_id": "rootfs", "path_on_host": "/r",
                                   "is_root_device": true}],
                       "vsock": {"guest_cid": 3, "uds_path": "/v"},
                       "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}]}"#;
        let cfg: FullVmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg.drives[0].drive_id, "rootfs");
        assert_eq!(cfg.network_interfaces[0].host_dev_name, "tap0");
        let text = serde_json::to_string(&cfg).unwrap();
        let again: FullVmConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_string(&again).unwrap(), text);
        // Firecracker's full shape: every key, null where nothing is configured.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for key in [
            "balloon",
            "drives",
            "boot-source",
            "cpu-config",
            "logger",
            "machine-config",
            "metrics",
            "mmds-config",
            "network-interfaces",
            "vsock",
            "entropy",
            "pmem",
            "memory-hotplug",
        ] {
            assert!(v.get(key).is_some(), "{key} missing from {text}");
        }
        assert!(v["logger"].is_null() && v["entropy"].is_null());
        assert_eq!(v["boot-source"]["initrd_path"], serde_json::Value::Null);
        assert_eq!(v["drives"][0]["partuuid"], serde_json::Value::Null);
        assert_eq!(v["drives"][0]["socket"], serde_json::Value::Null);
        assert_eq!(v["machine-config"]["huge_pages"], "None");
    }

    #[test]
    fn version_json() {
        let v = serde_json::to_value(VersionInfo::current()).unwrap();
        assert_eq!(v["firecracker_version"], env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn gets_take_no_other_method() {
        assert_eq!(fault("PUT", "/", "{}"), "/ does not accept PUT");
        assert_eq!(
            fault("PATCH", "/vm/config", "{}"),
            "/vm/config does not accept PATCH"
        );
    }
}
