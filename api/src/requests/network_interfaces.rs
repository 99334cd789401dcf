//! `PUT` and `PATCH /network-interfaces/{iface_id}`: virtio-net devices on host TAPs, and their
//! rate limiters (Firecracker's `RateLimiter` objects, [`super::rate_limiter`]).

use serde::{Deserialize, Serialize};

use super::rate_limiter::RateLimiter;
use crate::ApiError;

/// Firecracker's `NetworkInterface` body for `PUT /network-interfaces/{iface_id}`, also an entry
/// of the config file's `network-interfaces`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's id; must equal the id in the path.
    pub iface_id: String,
    /// The TAP on the host (it must exist when the VM starts).
    pub host_dev_name: String,
    /// The guest's MAC address, `aa:bb:cc:dd:ee:ff`; the guest picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Limits on what the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Limits on what the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// Firecracker's `PartialNetworkInterface` body for `PATCH /network-interfaces/{iface_id}`
/// (after boot): new rate limiters. A bucket that is given replaces the old one (size 0 removes
/// the limit); a bucket or limiter left out stays as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    /// The interface's id; must equal the id in the path.
    pub iface_id: String,
    /// New receive limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// New transmit limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// The id in the body must be the id in the path.
pub(crate) fn check_id(path_id: &str, body_id: &str) -> Result<(), ApiError> {
    if path_id != body_id {
        return Err(ApiError::bad_body(
            "network-interfaces",
            format!("iface_id {body_id:?} in the body does not match {path_id:?} in the path"),
        ));
    }
    Ok(())
}

impl NetworkInterfaceUpdate {
    /// Refuses an update that changes nothing: most likely a client bug worth telling about.
    pub(crate) fn check(&self) -> Result<(), ApiError> {
        if self.rx_rate_limiter.is_none() && self.tx_rate_limiter.is_none() {
            return Err(ApiError::bad_body(
                "network-interfaces",
                "PATCH needs rx_rate_limiter or tx_rate_limiter",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiRequest;
    use crate::requests::rate_limiter::TokenBucket;
    use crate::requests::{parse_request, tests::fault};

    #[test]
    fn put_good_body() {
        let body = br#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02",
                        "rx_rate_limiter": {"bandwidth": {"size": 1000000, "refill_time": 100},
                                            "ops": {"size": 100, "one_time_burst": 50, "refill_time": 1000}},
                        "tx_rate_limiter": {}}"#;
        let want = NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some("06:00:ac:10:00:02".into()),
            rx_rate_limiter: Some(RateLimiter {
                bandwidth: Some(TokenBucket {
                    size: 1_000_000,
                    one_time_burst: None,
                    refill_time: 100,
                }),
                ops: Some(TokenBucket {
                    size: 100,
                    one_time_burst: Some(50),
                    refill_time: 1000,
                }),
            }),
            tx_rate_limiter: Some(RateLimiter::default()),
        };
        assert_eq!(
            parse_request("PUT", "/network-interfaces/eth0", body).unwrap(),
            ApiRequest::PutNetworkInterface(want)
        );
        let body = br#"{"iface_id": "eth1", "host_dev_name": "tap1"}"#;
        assert!(parse_request("PUT", "/network-interfaces/eth1", body).is_ok());
    }

    #[test]
    fn put_errors_name_the_field() {
        let f = fault(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "allow_mmds_requests": true}"#,
        );
        assert!(
            f.starts_with("network-interfaces: unknown field `allow_mmds_requests`"),
            "{f}"
        );
        let f = fault("PUT", "/network-interfaces/eth0", r#"{"iface_id": "eth0"}"#);
        assert!(
            f.starts_with("network-interfaces: missing field `host_dev_name`"),
            "{f}"
        );
        let f = fault(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "t", "rx_rate_limiter": {"bandwidth": {"size": 1}}}"#,
        );
        assert!(
            f.starts_with("network-interfaces: missing field `refill_time`"),
            "{f}"
        );
        let f = fault(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "t", "tx_rate_limiter": {"bandwidth": {"size": -1, "refill_time": 1}}}"#,
        );
        assert!(f.contains("invalid value: integer `-1`"), "{f}");
        let body = r#"{"iface_id": "eth1", "host_dev_name": "t"}"#;
        assert_eq!(
            fault("PUT", "/network-interfaces/eth0", body),
            r#"network-interfaces: iface_id "eth1" in the body does not match "eth0" in the path"#
        );
    }

    #[test]
    fn patch_good_body_and_errors() {
        let body = br#"{"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}}"#;
        let want = NetworkInterfaceUpdate {
            iface_id: "eth0".into(),
            rx_rate_limiter: None,
            tx_rate_limiter: Some(RateLimiter {
                bandwidth: Some(TokenBucket {
                    size: 0,
                    one_time_burst: None,
                    refill_time: 0,
                }),
                ops: None,
            }),
        };
        assert_eq!(
            parse_request("PATCH", "/network-interfaces/eth0", body).unwrap(),
            ApiRequest::PatchNetworkInterface(want)
        );
        assert_eq!(
            fault(
                "PATCH",
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth0"}"#
            ),
            "network-interfaces: PATCH needs rx_rate_limiter or tx_rate_limiter"
        );
        let f = fault(
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap9"}"#,
        );
        assert!(
            f.starts_with("network-interfaces: unknown field `host_dev_name`"),
            "{f}"
        );
    }

    #[test]
    fn wrong_method_and_paths() {
        assert_eq!(
            fault("GET", "/network-interfaces/eth0", ""),
            "/network-interfaces/eth0 does not accept GET"
        );
        assert_eq!(
            fault("PUT", "/network-interfaces/", "{}"),
            "network-interfaces: The ID cannot be empty."
        );
        assert!(
            fault("PATCH", "/network-interfaces/eth-0", "{}")
                .starts_with("network-interfaces: id \"eth-0\": API Resource IDs can only contain")
        );
        assert_eq!(
            fault("PUT", "/network-interfaces/a/b", "{}"),
            "unknown path /network-interfaces/a/b"
        );
    }
}
