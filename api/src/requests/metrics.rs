//! `PUT /metrics` (and `--metrics-path`): where kiln-vmm writes its metrics, one JSON object a
//! line, in Firecracker's groups and names.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Firecracker's `Metrics` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// A file or named pipe (opened for appending, created if missing).
    pub metrics_path: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiRequest;
    use crate::requests::{parse_request, tests::fault};

    #[test]
    fn body_and_errors() {
        assert_eq!(
            parse_request("PUT", "/metrics", br#"{"metrics_path": "/m.fifo"}"#).unwrap(),
            ApiRequest::PutMetrics(Metrics {
                metrics_path: "/m.fifo".into()
            })
        );
        let f = fault("PUT", "/metrics", "{}");
        assert!(
            f.starts_with("metrics: missing field `metrics_path`"),
            "{f}"
        );
    }
}
