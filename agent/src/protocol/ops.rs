//! The bodies that revision 2 of the protocol added (see `PROTOCOL.md`, "Revision 2"): processes
//! that outlive their request, found again by pid or tag; the process list; stdin written and
//! closed from any connection; directories made and paths renamed; users resolved. Kept apart from
//! [`super::message`] so that file stays about framing and the original requests.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The protocol revision this build speaks. Revisions add requests and optional fields within
/// one [`super::PROTOCOL_VERSION`]; an agent of an older revision answers the newer requests with
/// `unknown_request`, so a host checks the agent's hello before relying on them.
pub const PROTOCOL_REVISION: u32 = 2;

/// Which running process a request is about: by its pid in the guest, or by the tag it was
/// started with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Selector {
    /// The process with this pid.
    Pid(u32),
    /// The process started with this tag.
    Tag(String),
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Pid(pid) => write!(f, "process {pid}"),
            Selector::Tag(tag) => write!(f, "process tagged {tag:?}"),
        }
    }
}

/// A process the agent runs, as the `processes` request lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Its pid in the guest (and its process group).
    pub pid: u32,
    /// The tag it was started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Its program and arguments.
    pub argv: Vec<String>,
    /// The environment its exec request added.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The working directory its exec request named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// It runs on a pseudo-terminal.
    #[serde(default)]
    pub tty: bool,
    /// It outlives its exec request (started with `keep`).
    #[serde(default)]
    pub keep: bool,
}

/// A user of the guest, as `/etc/passwd` and `/etc/group` describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// Its login name, when the passwd file has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its user id.
    pub uid: u32,
    /// Its primary group id.
    pub gid: u32,
    /// Its home directory (`/root` for root and `/` for users without one, as for execs).
    pub home: String,
}

/// A `mkdir` request's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MkdirSpec {
    /// Absolute path of the directory.
    pub path: String,
    /// Create missing parents too (default true).
    #[serde(default = "yes")]
    pub parents: bool,
    /// Permission bits of the directories made (default 0o755, before the umask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Who owns the directories made (`name`, `uid`, `name:group`, `uid:gid`); the agent's user
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

fn yes() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_tagged_objects() {
        assert_eq!(
            serde_json::to_string(&Selector::Pid(7)).unwrap(),
            r#"{"pid":7}"#
        );
        assert_eq!(
            serde_json::from_str::<Selector>(r#"{"tag":"web"}"#).unwrap(),
            Selector::Tag("web".into())
        );
        let e = serde_json::from_str::<Selector>(r#"{"pod":7}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pod"), "{e}");
    }

    #[test]
    fn mkdir_defaults_to_parents() {
        let m: MkdirSpec = serde_json::from_str(r#"{"path":"/a/b"}"#).unwrap();
        assert!(m.parents && m.mode.is_none() && m.owner.is_none());
        assert!(serde_json::from_str::<MkdirSpec>(r#"{"path":"/a","modes":1}"#).is_err());
    }
}
