//! `PUT /actions`: start the instance, press Ctrl+Alt+Del, or write the metrics now.

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
    /// Write the metrics now (they are also written every 60 seconds once configured).
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
    /// Write the metrics now.
    FlushMetrics,
}

/// The action a body asks for.
pub(crate) fn parse(body: ActionBody) -> Result<Action, ApiError> {
    Ok(match body.action_type {
        ActionType::InstanceStart => Action::InstanceStart,
        ActionType::SendCtrlAltDel => Action::SendCtrlAltDel,
        ActionType::FlushMetrics => Action::FlushMetrics,
    })
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
    fn flush_metrics_is_an_action() {
        assert_eq!(
            parse_request("PUT", "/actions", br#"{"action_type": "FlushMetrics"}"#).unwrap(),
            ApiRequest::PutAction(Action::FlushMetrics)
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
