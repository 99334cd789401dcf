//! The API's resources, one file each with Firecracker's paths and JSON bodies, and the pure
//! [`parse_request`] that turns a method, path and body into a typed [`ApiRequest`].
//!
//! Parsing rejects unknown fields and checks the rules that need the path (a drive's id) or span
//! fields of one body (the snapshot memory backend); whether the VM can do what is asked (its
//! state, files on disk, value ranges) is the VMM's to check when it handles the request.
//!
//! Status codes follow Firecracker's: a path that does not take a method Firecracker's server
//! speaks (GET, PUT, PATCH) is a 400 naming both; any other method (POST, DELETE, ...) is a 405
//! with the path's methods in `Allow`. Resources of devices Kiln does not have by design
//! ([`refused`]) are a 400 naming what Kiln offers instead.

pub mod actions;
pub mod balloon;
pub mod boot_source;
mod deprecated;
pub mod drives;
pub mod instance;
pub mod logger;
pub mod machine_config;
pub mod metrics;
pub mod mmds;
pub mod network_interfaces;
pub mod rate_limiter;
pub mod refused;
pub mod serial;
pub mod snapshot;
pub mod vm;
pub mod vsock;

use serde::de::DeserializeOwned;

use crate::ApiError;
use actions::Action;
use balloon::{Balloon, BalloonStatsUpdate, BalloonUpdate};
use boot_source::BootSource;
pub use deprecated::deprecated_fields;
use drives::{Drive, DriveUpdate};
use logger::Logger;
use machine_config::{MachineConfig, MachineConfigUpdate};
use metrics::Metrics;
use mmds::MmdsConfig;
use network_interfaces::{NetworkInterface, NetworkInterfaceUpdate};
use serial::Serial;
use snapshot::{SnapshotCreate, SnapshotLoad, WorkingSetSave};
use vm::VmState;
use vsock::Vsock;

/// One request the API accepts: one variant per path and method, carrying its parsed body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /`: the instance's id, state and version ([`instance::InstanceInfo`]).
    GetInstanceInfo,
    /// `GET /version` ([`instance::VersionInfo`]).
    GetVersion,
    /// `GET /vm/config`: the whole configuration ([`instance::FullVmConfig`]).
    GetVmConfig,
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `GET /machine-config`: the current [`MachineConfig`].
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /drives/{drive_id}` (the body's id matches the path's).
    PutDrive(Drive),
    /// `PATCH /drives/{drive_id}` (the body's id matches the path's).
    PatchDrive(DriveUpdate),
    /// `PUT /vsock`.
    PutVsock(Vsock),
    /// `PUT /network-interfaces/{iface_id}` (the body's id matches the path's).
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{iface_id}` (the body's id matches the path's).
    PatchNetworkInterface(NetworkInterfaceUpdate),
    /// `PUT /logger`.
    PutLogger(Logger),
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `PUT /serial`.
    PutSerial(Serial),
    /// `GET /mmds`: the data store.
    GetMmds,
    /// `PUT /mmds`: replace the data store.
    PutMmds(serde_json::Value),
    /// `PATCH /mmds`: merge into the data store (RFC 7396).
    PatchMmds(serde_json::Value),
    /// `PUT /mmds/config`.
    PutMmdsConfig(MmdsConfig),
    /// `PUT /actions`.
    PutAction(Action),
    /// `PATCH /vm`: pause or resume.
    PatchVm(VmState),
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreate),
    /// `PUT /snapshot/load`.
    LoadSnapshot(SnapshotLoad),
    /// `PUT /snapshot/working-set` (Kiln's).
    SaveWorkingSet(WorkingSetSave),
    /// `GET /balloon`: the balloon's configuration ([`Balloon`]).
    GetBalloon,
    /// `PUT /balloon`.
    PutBalloon(Balloon),
    /// `PATCH /balloon`: a new target.
    PatchBalloon(BalloonUpdate),
    /// `GET /balloon/statistics` ([`balloon::BalloonStats`]).
    GetBalloonStats,
    /// `PATCH /balloon/statistics`: a new polling interval.
    PatchBalloonStats(BalloonStatsUpdate),
}

/// A path and method the API serves; `path` is a template as in `openapi.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The HTTP method, upper case.
    pub method: &'static str,
    /// The path, with `{drive_id}` or `{iface_id}` where the id goes.
    pub path: &'static str,
}

const fn route(method: &'static str, path: &'static str) -> Route {
    Route { method, path }
}

/// Every route [`parse_request`] knows, in the order of [`ApiRequest`]'s variants.
pub const ROUTES: &[Route] = &[
    route("GET", "/"),
    route("GET", "/version"),
    route("GET", "/vm/config"),
    route("PUT", "/boot-source"),
    route("GET", "/machine-config"),
    route("PUT", "/machine-config"),
    route("PATCH", "/machine-config"),
    route("PUT", "/drives/{drive_id}"),
    route("PATCH", "/drives/{drive_id}"),
    route("PUT", "/vsock"),
    route("PUT", "/network-interfaces/{iface_id}"),
    route("PATCH", "/network-interfaces/{iface_id}"),
    route("PUT", "/logger"),
    route("PUT", "/metrics"),
    route("PUT", "/serial"),
    route("GET", "/mmds"),
    route("PUT", "/mmds"),
    route("PATCH", "/mmds"),
    route("PUT", "/mmds/config"),
    route("PUT", "/actions"),
    route("PATCH", "/vm"),
    route("PUT", "/snapshot/create"),
    route("PUT", "/snapshot/load"),
    route("PUT", "/snapshot/working-set"),
    route("GET", "/balloon"),
    route("PUT", "/balloon"),
    route("PATCH", "/balloon"),
    route("GET", "/balloon/statistics"),
    route("PATCH", "/balloon/statistics"),
];

/// The methods Firecracker's API server speaks; any other is answered 405.
const SPOKEN: [&str; 3] = ["GET", "PUT", "PATCH"];

/// Turns one HTTP request into an [`ApiRequest`], or the error to answer it with.
///
/// `path` may carry a query string, which is ignored. GET requests take no body; every other
/// request needs a JSON body.
pub fn parse_request(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let req = Request { method, path, body };
    if let Some(refusal) = refused::refusal(path) {
        return Err(ApiError::NotInKiln(refusal));
    }
    match (path, method) {
        ("/", "GET") => req.no_body(ApiRequest::GetInstanceInfo),
        ("/version", "GET") => req.no_body(ApiRequest::GetVersion),
        ("/vm/config", "GET") => req.no_body(ApiRequest::GetVmConfig),
        ("/boot-source", "PUT") => req.json("boot-source").map(ApiRequest::PutBootSource),
        ("/machine-config", "GET") => req.no_body(ApiRequest::GetMachineConfig),
        ("/machine-config", "PUT") => req.json("machine-config").map(ApiRequest::PutMachineConfig),
        ("/machine-config", "PATCH") => {
            let update: MachineConfigUpdate = req.json("machine-config")?;
            update.check()?;
            Ok(ApiRequest::PatchMachineConfig(update))
        }
        ("/vsock", "PUT") => req.json("vsock").map(ApiRequest::PutVsock),
        ("/logger", "PUT") => req.json("logger").map(ApiRequest::PutLogger),
        ("/metrics", "PUT") => req.json("metrics").map(ApiRequest::PutMetrics),
        ("/serial", "PUT") => req.json("serial").map(ApiRequest::PutSerial),
        ("/mmds", "GET") => req.no_body(ApiRequest::GetMmds),
        ("/mmds", "PUT") => mmds::document(req.json("mmds")?).map(ApiRequest::PutMmds),
        ("/mmds", "PATCH") => mmds::document(req.json("mmds")?).map(ApiRequest::PatchMmds),
        ("/mmds/config", "PUT") => {
            let config: MmdsConfig = req.json("mmds/config")?;
            config.check()?;
            Ok(ApiRequest::PutMmdsConfig(config))
        }
        ("/actions", "PUT") => actions::parse(req.json("actions")?).map(ApiRequest::PutAction),
        ("/vm", "PATCH") => req
            .json::<vm::VmStateBody>("vm")
            .map(|b| ApiRequest::PatchVm(b.state)),
        ("/snapshot/create", "PUT") => req.json("snapshot/create").map(ApiRequest::CreateSnapshot),
        ("/snapshot/load", "PUT") => req.json("snapshot/load").map(ApiRequest::LoadSnapshot),
        ("/snapshot/working-set", "PUT") => req
            .json("snapshot/working-set")
            .map(ApiRequest::SaveWorkingSet),
        ("/balloon", "GET") => req.no_body(ApiRequest::GetBalloon),
        ("/balloon", "PUT") => {
            let balloon: Balloon = req.json("balloon")?;
            balloon.check()?;
            Ok(ApiRequest::PutBalloon(balloon))
        }
        ("/balloon", "PATCH") => req.json("balloon").map(ApiRequest::PatchBalloon),
        ("/balloon/statistics", "GET") => req.no_body(ApiRequest::GetBalloonStats),
        ("/balloon/statistics", "PATCH") => req
            .json("balloon/statistics")
            .map(ApiRequest::PatchBalloonStats),
        _ => {
            if let Some(id) = id_in(path, "/drives/") {
                return match method {
                    "PUT" => {
                        drives::check_path_id("drives", id)?;
                        let drive: Drive = req.json("drives")?;
                        drives::check_id(id, &drive.drive_id)?;
                        if let Some(r) = &drive.rate_limiter {
                            r.check("drives")?;
                        }
                        Ok(ApiRequest::PutDrive(drive))
                    }
                    "PATCH" => {
                        drives::check_path_id("drives", id)?;
                        let update: DriveUpdate = req.json("drives")?;
                        drives::check_id(id, &update.drive_id)?;
                        if let Some(r) = &update.rate_limiter {
                            r.check("drives")?;
                        }
                        Ok(ApiRequest::PatchDrive(update))
                    }
                    _ => Err(req.wrong_method("/drives/{drive_id}")),
                };
            }
            if let Some(id) = id_in(path, "/network-interfaces/") {
                return match method {
                    "PUT" => {
                        drives::check_path_id("network-interfaces", id)?;
                        let iface: NetworkInterface = req.json("network-interfaces")?;
                        network_interfaces::check_id(id, &iface.iface_id)?;
                        for r in [&iface.rx_rate_limiter, &iface.tx_rate_limiter]
                            .into_iter()
                            .flatten()
                        {
                            r.check("network-interfaces")?;
                        }
                        Ok(ApiRequest::PutNetworkInterface(iface))
                    }
                    "PATCH" => {
                        drives::check_path_id("network-interfaces", id)?;
                        let update: NetworkInterfaceUpdate = req.json("network-interfaces")?;
                        network_interfaces::check_id(id, &update.iface_id)?;
                        update.check()?;
                        for r in [&update.rx_rate_limiter, &update.tx_rate_limiter]
                            .into_iter()
                            .flatten()
                        {
                            r.check("network-interfaces")?;
                        }
                        Ok(ApiRequest::PatchNetworkInterface(update))
                    }
                    _ => Err(req.wrong_method("/network-interfaces/{iface_id}")),
                };
            }
            if ROUTES.iter().any(|r| r.path == path) {
                Err(req.wrong_method(path))
            } else {
                Err(ApiError::UnknownPath(path.to_string()))
            }
        }
    }
}

/// The id in `{prefix}{id}`, if `path` has that shape with a slash-free id (an empty one is
/// named by the resource's own check).
fn id_in<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    path.strip_prefix(prefix).filter(|id| !id.contains('/'))
}

/// One request on its way to being typed.
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    body: &'a [u8],
}

impl Request<'_> {
    fn has_body(&self) -> bool {
        self.body.iter().any(|b| !b.is_ascii_whitespace())
    }

    fn no_body(&self, request: ApiRequest) -> Result<ApiRequest, ApiError> {
        if self.has_body() {
            return Err(ApiError::UnexpectedBody {
                method: self.method.to_string(),
                path: self.path.to_string(),
            });
        }
        Ok(request)
    }

    fn json<T: DeserializeOwned>(&self, resource: &'static str) -> Result<T, ApiError> {
        if !self.has_body() {
            return Err(ApiError::MissingBody {
                method: self.method.to_string(),
                path: self.path.to_string(),
            });
        }
        serde_json::from_slice(self.body).map_err(|e| ApiError::bad_body(resource, e))
    }

    /// The error for a method `template` (the path's route) does not take: 400 for the
    /// methods Firecracker's server speaks, 405 with the path's methods for any other.
    fn wrong_method(&self, template: &str) -> ApiError {
        if SPOKEN.contains(&self.method) {
            return ApiError::MethodNotAllowed {
                method: self.method.to_string(),
                path: self.path.to_string(),
            };
        }
        let allow: Vec<&str> = ROUTES
            .iter()
            .filter(|r| r.path == template)
            .map(|r| r.method)
            .collect();
        ApiError::UnsupportedMethod {
            method: self.method.to_string(),
            path: self.path.to_string(),
            allow: allow.join(", "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses and returns the fault message, for asserting on errors.
    pub(crate) fn fault(method: &str, path: &str, body: &str) -> String {
        parse_request(method, path, body.as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn unknown_path_is_named() {
        assert_eq!(fault("GET", "/nope", ""), "unknown path /nope");
        assert_eq!(fault("PUT", "/drives", "{}"), "unknown path /drives");
        assert_eq!(
            fault("PUT", "/drives/a/b", "{}"),
            "unknown path /drives/a/b"
        );
        assert_eq!(
            fault("GET", "/machine-config/", ""),
            "unknown path /machine-config/"
        );
        assert_eq!(
            fault("PUT", "/drives/", "{}"),
            "drives: The ID cannot be empty."
        );
    }

    #[test]
    fn wrong_method_is_named_for_every_route() {
        for r in ROUTES {
            let path = r
                .path
                .replace("{drive_id}", "rootfs")
                .replace("{iface_id}", "eth0");
            let allow: Vec<&str> = ROUTES
                .iter()
                .filter(|o| o.path == r.path)
                .map(|o| o.method)
                .collect();
            for method in ["GET", "PUT", "PATCH", "POST", "DELETE", "HEAD", "OPTIONS"] {
                if allow.contains(&method) {
                    continue;
                }
                let e = parse_request(method, &path, b"{}").unwrap_err();
                if SPOKEN.contains(&method) {
                    assert_eq!(e.to_string(), format!("{path} does not accept {method}"));
                    assert_eq!(crate::ApiResponse::from(e).status(), 400);
                } else {
                    let want = format!(
                        "{method} is not a method this API takes; {path} takes {}",
                        allow.join(", ")
                    );
                    assert_eq!(e.to_string(), want);
                    let r = crate::ApiResponse::from(e);
                    assert_eq!(r.status(), 405, "{method} {path}");
                    assert_eq!(r.allow(), Some(allow.join(", ").as_str()));
                }
            }
        }
    }

    #[test]
    fn bodies_are_required_or_refused() {
        assert_eq!(fault("PUT", "/vsock", ""), "PUT /vsock needs a JSON body");
        assert_eq!(
            fault("PUT", "/vsock", " \r\n"),
            "PUT /vsock needs a JSON body"
        );
        assert_eq!(fault("GET", "/", "{}"), "GET / takes no body");
        assert_eq!(
            parse_request("GET", "/", b"\r\n").unwrap(),
            ApiRequest::GetInstanceInfo
        );
    }

    #[test]
    fn gets_and_query_strings() {
        assert_eq!(
            parse_request("GET", "/?x=1", b"").unwrap(),
            ApiRequest::GetInstanceInfo
        );
        assert_eq!(
            parse_request("GET", "/vm/config", b"").unwrap(),
            ApiRequest::GetVmConfig
        );
        assert_eq!(
            parse_request("GET", "/machine-config", b"").unwrap(),
            ApiRequest::GetMachineConfig
        );
        assert_eq!(
            parse_request("GET", "/version", b"").unwrap(),
            ApiRequest::GetVersion
        );
    }

    #[test]
    fn malformed_json_names_the_resource() {
        let f = fault("PUT", "/boot-source", "{\"kernel_image_path\": ");
        assert!(f.starts_with("boot-source: "), "{f}");
        let f = fault("PUT", "/boot-source", "[1]");
        assert!(f.starts_with("boot-source: "), "{f}");
    }
}
