//! `GET /` and `GET /vm/config`: what the VMM answers about itself. These types are built by the
//! VMM and read by clients; no request carries them.

use serde::{Deserialize, Serialize};

use super::balloon::Balloon;
use super::boot_source::BootSource;
use super::drives::Drive;
use super::machine_config::MachineConfig;
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

/// Firecracker's `FullVmConfiguration`, the answer to `GET /vm/config`: the same shape as a
/// `--config-file`, so its output can be fed back as one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfig {
    /// `boot-source`, once set.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// `machine-config`.
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfig>,
    /// `drives`, in attachment order.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// `vsock`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// `balloon`, if any (its current target and statistics interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
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
                       "vsock": {"guest_cid": 3, "uds_path": "/v"}}"#;
        let cfg: FullVmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg.drives[0].drive_id, "rootfs");
        let again: FullVmConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(again, cfg);
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
