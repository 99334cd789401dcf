//! Answers that are the same before and after boot: the version, the MMDS data store, and
//! writing the metrics now.

use kiln_api::ApiResponse;
use kiln_api::requests::instance::VersionInfo;
use kiln_api::requests::mmds::MmdsConfig;
use kiln_devices::metrics::{Map, Value};
use kiln_mmds::MmdsError;

use crate::instance::Instance;

/// `GET /version`.
pub fn version() -> ApiResponse {
    ApiResponse::json(&VersionInfo::current())
}

fn mmds_fault(e: MmdsError) -> ApiResponse {
    match e {
        // Firecracker answers a store that would outgrow its limit with 413.
        MmdsError::TooLarge { .. } => ApiResponse::fault_with(413, format!("mmds: {e}")),
        MmdsError::NotInitialized => ApiResponse::fault_with(404, format!("mmds: {e}")),
        e => ApiResponse::fault(format!("mmds: {e}")),
    }
}

/// `GET /mmds`: the whole store (404 before any `PUT /mmds`).
pub fn get_mmds(instance: &Instance) -> ApiResponse {
    match instance.mmds().document() {
        Ok(doc) => ApiResponse::json(doc),
        Err(e) => mmds_fault(e),
    }
}

/// `PUT /mmds`.
pub fn put_mmds(instance: &Instance, data: Value) -> ApiResponse {
    match instance.mmds().put(data) {
        Ok(()) => ApiResponse::NoContent,
        Err(e) => mmds_fault(e),
    }
}

/// `PATCH /mmds`.
pub fn patch_mmds(instance: &Instance, patch: &Value) -> ApiResponse {
    match instance.mmds().patch(patch) {
        Ok(()) => ApiResponse::NoContent,
        Err(e) => mmds_fault(e),
    }
}

/// `PUT /mmds/config` (before boot): every interface it names must be one of `interfaces`, the
/// configured network devices' ids. Switching to V2 makes a fresh token key.
pub fn put_mmds_config(
    instance: &mut Instance,
    config: MmdsConfig,
    interfaces: &[&str],
) -> ApiResponse {
    if let Some(missing) = crate::mmds::unknown_interface(&config, interfaces) {
        return ApiResponse::fault(format!(
            "mmds/config: network interface {missing:?} is not configured; PUT /network-interfaces/{missing} first"
        ));
    }
    match instance.configure_mmds(config) {
        Ok(()) => ApiResponse::NoContent,
        Err(e) => ApiResponse::fault(format!("mmds/config: {e}")),
    }
}

/// `FlushMetrics`: writes `groups` (the devices') with the VMM's own now.
pub fn flush_metrics(instance: &Instance, groups: Map<String, Value>) -> ApiResponse {
    match instance.metrics.write(groups) {
        Ok(()) => ApiResponse::NoContent,
        Err(e) => ApiResponse::fault(format!("FlushMetrics: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api::requests::mmds::MmdsVersion as ApiVersion;
    use kiln_mmds::MmdsVersion;
    use serde_json::json;

    fn config(version: ApiVersion, ifaces: &[&str]) -> MmdsConfig {
        MmdsConfig {
            version,
            network_interfaces: ifaces.iter().map(|s| s.to_string()).collect(),
            ipv4_address: None,
            imds_compat: true,
        }
    }

    #[test]
    fn mmds_store_answers_with_firecracker_statuses() {
        let mut instance = Instance::new("t", crate::instance::Timestamp::now(), 64);
        assert_eq!(get_mmds(&instance).status(), 404);
        assert_eq!(patch_mmds(&instance, &json!({"a": 1})).status(), 404);
        assert_eq!(put_mmds(&instance, json!({"a": {"b": "c"}})).status(), 204);
        assert_eq!(patch_mmds(&instance, &json!({"d": 1})).status(), 204);
        assert_eq!(
            get_mmds(&instance),
            ApiResponse::Json(r#"{"a":{"b":"c"},"d":1}"#.into())
        );
        let big = put_mmds(&instance, json!({"x": "y".repeat(100)}));
        assert_eq!(big.status(), 413);
        assert!(big.body().contains("limit of 64 bytes"), "{}", big.body());

        let r = put_mmds_config(&mut instance, config(ApiVersion::V2, &["eth0"]), &[]);
        assert_eq!(r.status(), 400);
        assert!(
            r.body()
                .contains(r#"network interface \"eth0\" is not configured"#),
            "{}",
            r.body()
        );
        let r = put_mmds_config(&mut instance, config(ApiVersion::V2, &["eth0"]), &["eth0"]);
        assert_eq!(r, ApiResponse::NoContent);
        assert_eq!(instance.mmds().version(), MmdsVersion::V2);
        assert!(instance.mmds().imds_compat());
        assert!(instance.mmds_config.is_some());
    }

    #[test]
    fn version_and_flush_without_a_file() {
        assert!(version().body().contains("firecracker_version"));
        let instance = Instance::default();
        let r = flush_metrics(&instance, Map::new());
        assert!(
            r.body().contains("metrics are not configured"),
            "{}",
            r.body()
        );
    }
}
