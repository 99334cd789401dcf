//! The JSON shapes of kilnd's own API, shared by the daemon and its clients (the `kiln` CLI, the
//! SDKs' tests). Requests reject unknown fields, so a misspelled option is an error that names
//! it, never a silent default.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `POST /sandboxes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// The template's name (or its id).
    pub template: String,
    /// Seconds the sandbox lives before it is killed (its TTL); the daemon's default if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Environment every command in the sandbox starts with.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Labels kept with the sandbox, for listing and filtering.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// What a sandbox is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Running: commands can be run in it.
    Running,
    /// Paused to disk: its VM has ended and its memory is in a snapshot; resume brings it back.
    Paused,
}

impl SandboxState {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
        }
    }
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxInfo {
    /// Its id.
    pub id: String,
    /// The template's name.
    pub template: String,
    /// The template's id (its content hash).
    pub template_id: String,
    /// Running or paused.
    pub state: SandboxState,
    /// When it was created, seconds since the epoch.
    pub created_at: u64,
    /// When it will be killed, seconds since the epoch (a paused sandbox's lifetime stands still:
    /// for it this is now plus what it has left).
    pub expires_at: u64,
    /// Its vCPUs.
    pub vcpus: u32,
    /// Its memory, MiB.
    pub mem_mib: u32,
    /// Its labels.
    pub metadata: BTreeMap<String, String>,
    /// Commands run in it so far.
    pub exec_count: u64,
}

/// `POST /sandboxes/{id}/exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// Environment over the sandbox's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// User to run as (`name`, `uid`, `name:group`, `uid:gid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Kill it after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Bytes for its stdin, base64; stdin is closed after them (`/dev/null` without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_b64: Option<String>,
}

/// One line of an exec's streamed answer (newline-delimited JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// The process started.
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// Bytes it wrote to stdout, base64.
    Stdout {
        /// The bytes.
        data_b64: String,
    },
    /// Bytes it wrote to stderr, base64.
    Stderr {
        /// The bytes.
        data_b64: String,
    },
    /// It ended (last line).
    Exit {
        /// Its exit code, when it exited.
        exit_code: Option<i32>,
        /// The signal that ended it, when one did.
        signal: Option<i32>,
        /// It was killed at its timeout.
        timed_out: bool,
    },
    /// It could not run, or the sandbox failed under it (last line).
    Error {
        /// What went wrong.
        message: String,
        /// The process could not be started (bad program, directory or user).
        could_not_start: bool,
    },
}

/// `POST /sandboxes/{id}/fork`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// How many forks (1 to 16).
    pub count: u32,
}

/// `POST /sandboxes/{id}/timeout`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutRequest {
    /// Seconds from now until the sandbox is killed.
    pub timeout_s: u64,
}

/// A template as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInfo {
    /// Its name.
    pub name: String,
    /// Its content hash: the same spec and inputs always give the same id.
    pub id: String,
    /// When it was built, seconds since the epoch.
    pub built_at: u64,
    /// vCPUs of its sandboxes.
    pub vcpus: u32,
    /// Memory of its sandboxes, MiB.
    pub mem_mib: u32,
    /// Size of its root filesystem image, MiB.
    pub disk_mib: u64,
    /// Warm sandboxes kept ready.
    pub min_ready: u32,
    /// Most sandboxes of this template at once (0: no limit beyond the host's).
    pub max_sandboxes: u32,
    /// Warm sandboxes ready now.
    pub ready: u32,
}

/// `PUT /templates/{name}/pool`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    /// Warm sandboxes to keep ready.
    pub min_ready: u32,
    /// Most sandboxes of this template at once (0: no limit beyond the host's).
    #[serde(default)]
    pub max_sandboxes: u32,
}

/// One line of a template build's streamed answer (newline-delimited JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BuildEvent {
    /// A step began.
    Step {
        /// What it is.
        name: String,
    },
    /// Progress within a step.
    Progress {
        /// Bytes done.
        done: u64,
        /// Bytes in all, when known.
        total: Option<u64>,
    },
    /// A line a build command printed.
    Output {
        /// The text.
        line: String,
    },
    /// The build finished (last line).
    Done {
        /// The template.
        template: TemplateInfo,
        /// It was already built: nothing was done.
        cached: bool,
    },
    /// The build failed (last line).
    Failed {
        /// Why.
        message: String,
    },
}

/// An error answer: `{"error": "..."}` with the HTTP status saying what kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, naming the thing.
    pub error: String,
}

/// An entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntryInfo {
    /// Its name.
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its permission bits (setuid, setgid and sticky included).
    pub mode: u32,
    /// Its owner.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let e = serde_json::from_str::<CreateSandbox>(r#"{"template":"t","timout_s":3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("timout_s"), "{e}");
        let e = serde_json::from_str::<ExecRequest>(r#"{"argv":["x"],"stdin":"a"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("stdin"), "{e}");
    }

    #[test]
    fn events_are_tagged() {
        let line = serde_json::to_string(&ExecEvent::Exit {
            exit_code: Some(3),
            signal: None,
            timed_out: false,
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"type":"exit","exit_code":3,"signal":null,"timed_out":false}"#
        );
        let back: ExecEvent = serde_json::from_str(&line).unwrap();
        assert!(matches!(
            back,
            ExecEvent::Exit {
                exit_code: Some(3),
                ..
            }
        ));
    }
}
