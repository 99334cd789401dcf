//! `GET`, `PUT` and `PATCH /mmds` (the metadata the guest reads at 169.254.169.254) and
//! `PUT /mmds/config` (its version, address and the network interfaces that reach it).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// A `PUT` or `PATCH /mmds` body: a JSON object, as Firecracker's swagger has it
/// (`MmdsContentsObject`). The guest reads the store by path from its top, so a top that is an
/// array, a string or `null` would leave it nothing to read (and a `null` patch would empty it).
pub(crate) fn document(body: serde_json::Value) -> Result<serde_json::Value, ApiError> {
    let kind = match &body {
        serde_json::Value::Object(_) => return Ok(body),
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
    };
    Err(ApiError::bad_body(
        "mmds",
        format!("the body is {kind}; the MMDS data store takes a JSON object"),
    ))
}

/// MMDS V1 answers any GET; V2 wants a session token from `PUT /latest/api/token` first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// No session tokens.
    #[default]
    V1,
    /// Session tokens required (IMDSv2's scheme).
    V2,
}

/// The address the guest reaches the MMDS at unless told otherwise.
pub const DEFAULT_MMDS_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Firecracker's `MmdsConfig` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// V1 when absent.
    #[serde(default)]
    pub version: MmdsVersion,
    /// The network interfaces (by `iface_id`) whose traffic to the MMDS address is answered by
    /// the MMDS instead of reaching the host; at least one.
    pub network_interfaces: Vec<String>,
    /// A link-local address (169.254.0.0/16); [`DEFAULT_MMDS_ADDRESS`] when absent.
    #[serde(default)]
    pub ipv4_address: Option<Ipv4Addr>,
    /// Answer `text/plain` whatever the `Accept` header says, as EC2's IMDS does.
    #[serde(default)]
    pub imds_compat: bool,
}

impl MmdsConfig {
    /// The address the MMDS answers at.
    pub fn address(&self) -> Ipv4Addr {
        self.ipv4_address.unwrap_or(DEFAULT_MMDS_ADDRESS)
    }

    /// Firecracker's rules for the body on its own: some interface, a link-local address that
    /// is neither 169.254.0.x nor 169.254.255.x (reserved by RFC 3927).
    pub(crate) fn check(&self) -> Result<(), ApiError> {
        let err = |m: String| Err(ApiError::bad_body("mmds/config", m));
        if self.network_interfaces.is_empty() {
            return err(
                "network_interfaces is empty; name at least one network interface that reaches the MMDS"
                    .into(),
            );
        }
        let a = self.address();
        let [o1, o2, o3, _] = a.octets();
        if !a.is_link_local() || o3 == 0 || o3 == 255 || (o1, o2) != (169, 254) {
            return err(format!(
                "ipv4_address {a} is not a usable link-local address (169.254.1.0 to 169.254.254.255)"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiRequest;
    use crate::requests::{parse_request, tests::fault};

    #[test]
    fn data_store_bodies_are_json_objects() {
        let body = br#"{"latest": {"meta-data": {"ami-id": "ami-1"}}}"#;
        let ApiRequest::PutMmds(v) = parse_request("PUT", "/mmds", body).unwrap() else {
            panic!("wrong variant")
        };
        assert_eq!(v["latest"]["meta-data"]["ami-id"], "ami-1");
        assert!(matches!(
            parse_request("PATCH", "/mmds", br#"{"a": null}"#).unwrap(),
            ApiRequest::PatchMmds(_)
        ));
        assert_eq!(
            parse_request("GET", "/mmds", b"").unwrap(),
            ApiRequest::GetMmds
        );
        let f = fault("PUT", "/mmds", "{not json");
        assert!(f.starts_with("mmds: "), "{f}");
        for (method, body, kind) in [
            ("PUT", "[null, null]", "an array"),
            ("PATCH", "[1]", "an array"),
            ("PUT", "null", "null"),
            ("PATCH", "null", "null"),
            ("PUT", r#""text""#, "a string"),
            ("PATCH", "7", "a number"),
            ("PUT", "true", "a boolean"),
        ] {
            assert_eq!(
                fault(method, "/mmds", body),
                format!("mmds: the body is {kind}; the MMDS data store takes a JSON object"),
                "{method} {body}"
            );
        }
        assert_eq!(
            fault("PUT", "/mmds/other", "{}"),
            "unknown path /mmds/other"
        );
    }

    #[test]
    fn config_bodies_and_their_rules() {
        let body = br#"{"version": "V2", "network_interfaces": ["eth0"],
                        "ipv4_address": "169.254.170.2", "imds_compat": true}"#;
        let ApiRequest::PutMmdsConfig(c) = parse_request("PUT", "/mmds/config", body).unwrap()
        else {
            panic!("wrong variant")
        };
        assert_eq!(c.version, MmdsVersion::V2);
        assert_eq!(c.address(), Ipv4Addr::new(169, 254, 170, 2));
        assert!(c.imds_compat);
        let ApiRequest::PutMmdsConfig(c) = parse_request(
            "PUT",
            "/mmds/config",
            br#"{"network_interfaces": ["eth0"]}"#,
        )
        .unwrap() else {
            panic!("wrong variant")
        };
        assert_eq!(
            (c.version, c.address()),
            (MmdsVersion::V1, DEFAULT_MMDS_ADDRESS)
        );

        let f = fault("PUT", "/mmds/config", r#"{"network_interfaces": []}"#);
        assert!(
            f.starts_with("mmds/config: network_interfaces is empty"),
            "{f}"
        );
        for bad in ["10.0.0.1", "169.254.0.7", "169.254.255.1"] {
            let f = fault(
                "PUT",
                "/mmds/config",
                &format!(r#"{{"network_interfaces": ["eth0"], "ipv4_address": "{bad}"}}"#),
            );
            assert!(
                f.contains(&format!("ipv4_address {bad} is not a usable")),
                "{f}"
            );
        }
        let f = fault(
            "PUT",
            "/mmds/config",
            r#"{"network_interfaces": ["e"], "version": "V3"}"#,
        );
        assert!(f.starts_with("mmds/config: unknown variant `V3`"), "{f}");
    }
}
