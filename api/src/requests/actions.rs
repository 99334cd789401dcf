//! `PUT /actions`: start the instance or press Ctrl+Alt+Del.

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// Every `action_type` Firecracker defines, so a known-but-unsupported one gets a clear fault
/// rather than serde's "unknown variant".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the i8042 keyboard.
    SendCtrlAltDel,
    /// Flush metrics; Kiln has no metrics sink, so it is refused.
    FlushMetrics,
}

/// Firecracker's `InstanceActionInfo` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    /// What to do.
    pub action_type: ActionType,
}

/// An action Kiln performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Boot the configured VM.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the i8042 keyboard.
    SendCtrlAltDel,
}

/// The action a body asks for, refusing those Kiln does not have.
pub(crate) fn parse(body: ActionBody) -> Result<Action, ApiError> {
    match body.action_type {
        ActionType::InstanceStart => Ok(Action::InstanceStart),
        ActionType::SendCtrlAltDel => Ok(Action::SendCtrlAltDel),
        ActionType::FlushMetrics => Err(ApiError::bad_body(
            "actions",
            "action_type FlushMetrics is not supported: Kiln has no metrics to flush",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiRequest;
    use crate::requests::{parse_request, tests::fault};

    #[test]
    fn good_bodies() {
        assert_eq!(
            parse_request("PUT", "/actions", br#"{"action_type": "InstanceStart"}"#).unwrap(),
            ApiRequest::PutAction(Action::InstanceStart)
        );
        assert_eq!(
            parse_request("PUT", "/actions", br#"{"action_type": "SendCtrlAltDel"}"#).unwrap(),
            ApiRequest::PutAction(Action::SendCtrlAltDel)
        );
    }

    #[test]
    fn flush_metrics_is_refused_clearly() {
        assert_eq!(
            fault("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#),
            "actions: action_type FlushMetrics is not supported: Kiln has no metrics to flush"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let f = fault("PUT", "/actions", r#"{"action_type": "Reboot"}"#);
        assert!(f.starts_with("actions: unknown variant `Reboot`"), "{f}");
        let f = fault("PUT", "/actions", r#"{"action": "InstanceStart"}"#);
        assert!(f.starts_with("actions: unknown field `action`"), "{f}");
    }

    #[test]
    fn wrong_method() {
        assert_eq!(fault("GET", "/actions", ""), "/actions does not accept GET");
    }
}
