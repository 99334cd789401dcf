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
    /// Its network: what it may reach (the template's default policy unless given) and the
    /// guest ports published on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkRequest>,
}

/// What a sandbox, or a template's build, may reach. Nothing by default: no egress at all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetPolicy {
    /// Names it may resolve (through a resolver that answers only these) and reach on TCP 80
    /// and 443, checked by TLS SNI or HTTP Host; `*.example.com` allows the names under it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_domains: Vec<String>,
    /// Any egress, NATed to the host's uplink, but never to private, loopback, link-local or
    /// metadata addresses or the host's own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_net: bool,
}

impl NetPolicy {
    /// True when it allows no egress at all.
    pub fn is_none(&self) -> bool {
        self.allow_domains.is_empty() && !self.allow_net
    }

    /// The policy for kiln-net, or what is wrong with it, naming the field under `at` (such as
    /// `network` or `build`).
    pub fn check(&self, at: &str) -> Result<kiln_net::Policy, String> {
        if self.allow_net && !self.allow_domains.is_empty() {
            return Err(format!(
                "{at}.allow_net: it allows every domain already; give allow_domains or \
                 allow_net, not both"
            ));
        }
        let domains = self
            .allow_domains
            .iter()
            .map(|d| {
                d.parse::<kiln_net::DomainPattern>()
                    .map_err(|e| format!("{at}.allow_domains: {}", e.reason()))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(kiln_net::Policy {
            domains,
            allow_net: self.allow_net,
        })
    }
}

/// `network` of `POST /sandboxes`. Without `allow_domains` and `allow_net` the sandbox gets its
/// template's default policy (`[network]` of its spec); with either, exactly what they say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkRequest {
    /// Names it may reach (see [`NetPolicy::allow_domains`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_domains: Option<Vec<String>>,
    /// Any egress (see [`NetPolicy::allow_net`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_net: Option<bool>,
    /// Guest ports to publish on the host's 127.0.0.1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<PortRequest>,
}

impl NetworkRequest {
    /// The policy it asks for, given the template's default.
    pub fn policy(&self, template_default: &NetPolicy) -> NetPolicy {
        if self.allow_domains.is_none() && self.allow_net.is_none() {
            return template_default.clone();
        }
        NetPolicy {
            allow_domains: self.allow_domains.clone().unwrap_or_default(),
            allow_net: self.allow_net.unwrap_or(false),
        }
    }

    /// What is wrong with its published ports, naming the field.
    pub fn check_publish(&self) -> Result<(), String> {
        for (i, p) in self.publish.iter().enumerate() {
            if p.guest_port == 0 {
                return Err(format!(
                    "network.publish[{i}].guest_port: 0 is not a port (1 to 65535)"
                ));
            }
            if let Some(h) = p.host_port {
                if h == 0 {
                    return Err(format!(
                        "network.publish[{i}].host_port: 0 is not a port (1 to 65535; leave it \
                         out for a free one)"
                    ));
                }
                if self.publish[..i].iter().any(|o| o.host_port == Some(h)) {
                    return Err(format!(
                        "network.publish[{i}].host_port: {h} is given twice"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A guest port to publish: a listener on the host's 127.0.0.1 (`host_port`, or a free port)
/// whose connections reach `guest_port` in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRequest {
    /// The port in the guest.
    pub guest_port: u16,
    /// The port on 127.0.0.1; a free one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
}

/// A sandbox's network as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    /// Names it may reach.
    #[serde(default)]
    pub allow_domains: Vec<String>,
    /// Any egress.
    #[serde(default)]
    pub allow_net: bool,
    /// The guest's address when it has a network interface (the same in every sandbox: each
    /// has a network namespace of its own).
    #[serde(default)]
    pub address: Option<String>,
    /// Its published ports (while it runs: a paused sandbox has none open).
    #[serde(default)]
    pub published: Vec<PublishedPort>,
    /// Connections and lookups refused since kilnd last started serving it (each is in kilnd's
    /// log with the sandbox's id).
    #[serde(default)]
    pub refused: u64,
}

/// A published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    /// The port on 127.0.0.1.
    pub host_port: u16,
    /// The port in the guest.
    pub guest_port: u16,
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
    /// Its network.
    #[serde(default)]
    pub network: NetworkInfo,
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

/// `POST /sandboxes/{id}/snapshot`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The snapshot template's name (one is made up when absent); a snapshot of that name is
    /// replaced.
    #[serde(default)]
    pub name: Option<String>,
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
    /// `build` (made from a spec) or `snapshot` (taken from a running sandbox).
    #[serde(default = "build_kind")]
    pub kind: String,
}

fn build_kind() -> String {
    "build".into()
}

/// What a warm VM runs before it waits, in order, [`WARM_UP_RUNS`] times. The first command in
/// a restored guest pays for faulting in the process-spawning paths (the agent's, the kernel's
/// fork and exec, the shell's pages, the C library's locale set-up: each first touch of a
/// snapshot page is a fault the host serves); run here, that is off the sandbox's first command.
/// They run nothing of the template's own: the shell's builtin `exit`, and `env` (a program
/// found on `PATH` that sets its locale up, as nearly every first command does). A template
/// without them just skips the rest.
pub const WARM_UP: [&[&str]; 2] = [&["/bin/sh", "-c", "exit 0"], &["env"]];

/// How many times a warm VM runs [`WARM_UP`]. One run leaves the next commands still faulting in
/// what a fresh guest's allocator and caches hand out for the first time. KVM's counters in
/// `cargo xtask bench pool`, nested page faults per `true` in a handed-out sandbox: after one run
/// of the shell's `exit` alone, 190, 43 and 35 on the first three, 1-3 from the fourth on (as in
/// a sandbox that has run for a while); after three runs of it, 144 then 1-4; after three runs of
/// both commands, 19-20 then 1-4. Each run adds what it touches to every idle sandbox's memory
/// (PSS of an idle sandbox of the 512 MiB python template: 3.1 MiB with one run of `exit`, 3.6
/// MiB with this while each warm VM still read `env` from its disk, 3.4-3.7 MiB since the
/// template's build leaves `env` in the snapshot's page cache).
pub const WARM_UP_RUNS: usize = 3;

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
    fn a_network_request_keeps_the_template_default_unless_it_names_a_policy() {
        let default = NetPolicy {
            allow_domains: vec!["pypi.org".into()],
            allow_net: false,
        };
        let publish_only: NetworkRequest =
            serde_json::from_str(r#"{"publish":[{"guest_port":8080}]}"#).unwrap();
        assert_eq!(publish_only.policy(&default), default);
        let none: NetworkRequest = serde_json::from_str(r#"{"allow_domains":[]}"#).unwrap();
        assert!(none.policy(&default).is_none());
        let net: NetworkRequest = serde_json::from_str(r#"{"allow_net":true}"#).unwrap();
        assert!(net.policy(&default).allow_net);
        assert!(net.policy(&default).allow_domains.is_empty());
        let e = serde_json::from_str::<NetworkRequest>(r#"{"allow_domain":["a.b"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("allow_domain"), "{e}");
    }

    #[test]
    fn bad_policies_and_ports_are_named() {
        let p = |d: &[&str], net: bool| NetPolicy {
            allow_domains: d.iter().map(|s| s.to_string()).collect(),
            allow_net: net,
        };
        assert!(
            p(&["pypi.org", "*.pythonhosted.org"], false)
                .check("build")
                .is_ok()
        );
        assert_eq!(
            p(&["exa mple.com"], false).check("network").unwrap_err(),
            "network.allow_domains: \"exa mple.com\" is not a domain name (letters, digits and '-' in dot-separated labels of 1 to 63 characters)"
        );
        assert!(
            p(&["*.com"], false)
                .check("build")
                .unwrap_err()
                .starts_with("build.allow_domains: \"*.com\" would allow a whole top-level domain")
        );
        assert!(
            p(&["a.com"], true)
                .check("network")
                .unwrap_err()
                .starts_with("network.allow_net: ")
        );
        let ports = |list: &[(u16, Option<u16>)]| NetworkRequest {
            publish: list
                .iter()
                .map(|&(guest_port, host_port)| PortRequest {
                    guest_port,
                    host_port,
                })
                .collect(),
            ..Default::default()
        };
        assert!(
            ports(&[(80, None), (81, Some(8081))])
                .check_publish()
                .is_ok()
        );
        assert!(
            ports(&[(0, None)])
                .check_publish()
                .unwrap_err()
                .starts_with("network.publish[0].guest_port: 0 is not a port")
        );
        assert_eq!(
            ports(&[(80, Some(9000)), (81, Some(9000))])
                .check_publish()
                .unwrap_err(),
            "network.publish[1].host_port: 9000 is given twice"
        );
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
