//! `PUT /logger` (and `--log-path`, `--level`, ...): where kiln-vmm writes its log, in
//! Firecracker's line format, and how much of it.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

/// Firecracker's log levels; the names are taken in any case, `Warn` as well as `Warning`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warning,
    /// And what happens (Firecracker's default).
    Info,
    /// And details.
    Debug,
    /// Everything.
    Trace,
}

impl std::str::FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "off" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warn" | "warning" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => {
                return Err(format!(
                    "level {s:?} is not one of Error, Warning, Info, Debug, Trace, Off"
                ));
            }
        })
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Firecracker's `Logger` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// A file or named pipe for the log (opened for appending, created if missing).
    #[serde(default)]
    pub log_path: Option<PathBuf>,
    /// The most detailed level written.
    #[serde(default)]
    pub level: Option<LogLevel>,
    /// Write each line's level.
    #[serde(default)]
    pub show_level: Option<bool>,
    /// Write each line's source file and line.
    #[serde(default)]
    pub show_log_origin: Option<bool>,
    /// Only lines from module paths starting with this (say `kiln_vmm::api`).
    #[serde(default)]
    pub module: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiRequest;
    use crate::requests::{parse_request, tests::fault};

    #[test]
    fn good_bodies_and_levels_in_any_case() {
        let body = br#"{"log_path": "/tmp/fc.log", "level": "warning", "show_level": true,
                        "show_log_origin": false, "module": "kiln_vmm::api"}"#;
        let want = Logger {
            log_path: Some("/tmp/fc.log".into()),
            level: Some(LogLevel::Warning),
            show_level: Some(true),
            show_log_origin: Some(false),
            module: Some("kiln_vmm::api".into()),
        };
        assert_eq!(
            parse_request("PUT", "/logger", body).unwrap(),
            ApiRequest::PutLogger(want)
        );
        for (text, level) in [
            ("Info", LogLevel::Info),
            ("DEBUG", LogLevel::Debug),
            ("Warn", LogLevel::Warning),
            ("off", LogLevel::Off),
        ] {
            assert_eq!(text.parse::<LogLevel>().unwrap(), level);
        }
        assert!(parse_request("PUT", "/logger", b"{}").is_ok());
    }

    #[test]
    fn errors_name_the_field() {
        let f = fault("PUT", "/logger", r#"{"level": "Loud"}"#);
        assert!(
            f.starts_with(r#"logger: level "Loud" is not one of"#),
            "{f}"
        );
        let f = fault("PUT", "/logger", r#"{"path": "/x"}"#);
        assert!(f.starts_with("logger: unknown field `path`"), "{f}");
    }
}
