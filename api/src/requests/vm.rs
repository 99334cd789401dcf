//! `PATCH /vm`: pause or resume a running VM.

use serde::{Deserialize, Serialize};

/// The state a client asks the VM to be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Stop the vCPUs.
    Paused,
    /// Run the vCPUs again.
    Resumed,
}

/// Firecracker's `Vm` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateBody {
    /// The state to move to.
    pub state: VmState,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiRequest;
    use crate::requests::{parse_request, tests::fault};

    #[test]
    fn good_bodies() {
        assert_eq!(
            parse_request("PATCH", "/vm", br#"{"state": "Paused"}"#).unwrap(),
            ApiRequest::PatchVm(VmState::Paused)
        );
        assert_eq!(
            parse_request("PATCH", "/vm", br#"{"state": "Resumed"}"#).unwrap(),
            ApiRequest::PatchVm(VmState::Resumed)
        );
    }

    #[test]
    fn errors_name_the_field() {
        let f = fault("PATCH", "/vm", r#"{"state": "Running"}"#);
        assert!(f.starts_with("vm: unknown variant `Running`"), "{f}");
        let f = fault("PATCH", "/vm", r#"{"state": "Paused", "force": true}"#);
        assert!(f.starts_with("vm: unknown field `force`"), "{f}");
    }

    #[test]
    fn wrong_method() {
        assert_eq!(
            fault("PUT", "/vm", r#"{"state": "Paused"}"#),
            "/vm does not accept PUT"
        );
    }
}
