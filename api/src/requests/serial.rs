//! `PUT /serial`: where the guest's serial console goes, and a budget for its output.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::rate_limiter::TokenBucket;

/// Firecracker's `SerialDevice` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serial {
    /// A file or named pipe for the console output (stdout when absent).
    #[serde(default)]
    pub serial_out_path: Option<PathBuf>,
    /// Bytes of console output per refill period; what is over budget is dropped and counted.
    #[serde(default)]
    pub rate_limiter: Option<TokenBucket>,
}

#[cfg(test)]
mod tests {
    use crate::ApiRequest;
    use crate::requests::{parse_request, tests::fault};

    #[test]
    fn body_and_errors() {
        let body = br#"{"serial_out_path": "/tmp/console.log",
                        "rate_limiter": {"size": 4096, "refill_time": 100}}"#;
        let ApiRequest::PutSerial(s) = parse_request("PUT", "/serial", body).unwrap() else {
            panic!("wrong variant")
        };
        assert_eq!(s.serial_out_path, Some("/tmp/console.log".into()));
        assert_eq!(s.rate_limiter.unwrap().size, 4096);
        let f = fault("PUT", "/serial", r#"{"path": "/x"}"#);
        assert!(f.starts_with("serial: unknown field `path`"), "{f}");
    }
}
