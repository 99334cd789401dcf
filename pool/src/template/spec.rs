//! The template spec: a TOML file saying where a template's root filesystem comes from, what runs
//! in it at build time, and how its sandboxes start. Parsing rejects unknown keys by name;
//! [`Spec::validate`] checks the rules that span fields.
//!
//! ```toml
//! name = "python"
//! vcpus = 1
//! mem_mib = 512
//! disk_mib = 1024            # the root filesystem image (grown to fit when smaller)
//! disk = "cow"               # each sandbox's writable root: "cow" (default) or "tmpfs"
//! run = ["echo hi > /etc/motd"]   # build steps, `sh -c` each, in a booted VM, in order
//! env = { LANG = "C.UTF-8" } # every command's environment
//! workdir = "/root"          # every command's working directory
//! user = "root"              # whom commands run as
//! start = "python3 -m http.server 8080"   # left running in the snapshot
//! ready = "python3 -c 'import urllib.request as u; u.urlopen(\"http://127.0.0.1:8080\")'"
//! ready_timeout_s = 60
//!
//! [from]                     # exactly one source
//! image = "/kiln/rootfs.ext4"                 # an ext4 image (the agent is written in)
//! # dir = "rootfs/"                           # a directory tree
//! # oci = "alpine.tar"                        # an OCI layout folder or a `docker save` tarball
//! # debian = { suite = "bookworm", packages = ["python3"] }
//!
//! [build]                    # what the build VMs (run, start, ready) may reach; none by default
//! allow_domains = ["pypi.org", "files.pythonhosted.org"]   # `*.example.com`: the names under it
//! allow_net = false          # true: any egress but private, metadata and host addresses
//!
//! [network]                  # what its sandboxes may reach unless their create says otherwise
//! allow_domains = []
//! allow_net = false
//! ```
//!
//! Every template VM and sandbox has a network interface (`eth0`, 172.16.0.2/30, the same in
//! each: every VM has a network namespace of its own), so any sandbox can be given a network;
//! what it can reach is the policy's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::types::NetPolicy;

/// Why a spec was refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("template spec {path}: {err}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The TOML does not parse or has an unknown key.
    #[error("template spec {path}: {err}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error, naming the key and line.
        err: toml::de::Error,
    },
    /// A value breaks a rule; names the field (the message of a network policy's starts with
    /// the key under it: `network.allow_domains: ...`).
    #[error("template spec: {}", invalid_text(.field, .message))]
    Invalid {
        /// The field.
        field: &'static str,
        /// The rule it breaks.
        message: String,
    },
}

/// `field: message`, unless the message already starts with the field's name.
fn invalid_text(field: &str, message: &str) -> String {
    if message.starts_with(&format!("{field}.")) {
        message.to_string()
    } else {
        format!("{field}: {message}")
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field,
        message: message.into(),
    }
}

/// Where the root filesystem comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct From {
    /// A directory tree, copied with owners and modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// An ext4 image, copied (sparse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// An OCI image layout folder or a `docker save` tarball.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<PathBuf>,
    /// Debian packages, installed with debootstrap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debian: Option<Debian>,
}

/// A Debian root filesystem from packages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Debian {
    /// The release (default `bookworm`).
    #[serde(default = "default_suite")]
    pub suite: String,
    /// Packages on top of minbase.
    #[serde(default)]
    pub packages: Vec<String>,
}

fn default_suite() -> String {
    "bookworm".into()
}

/// A template spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The template's name.
    pub name: String,
    /// The root filesystem's source.
    pub from: From,
    /// vCPUs of its sandboxes.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Memory of its sandboxes, MiB.
    #[serde(default = "default_mem")]
    pub mem_mib: u32,
    /// Size of the root filesystem image, MiB (grown to fit the tree when smaller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u64>,
    /// How each sandbox's root is writable.
    #[serde(default)]
    pub disk: DiskMode,
    /// Build steps: shell commands run in a booted VM with a writable root, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub run: Vec<String>,
    /// Environment of every command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory of every command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Whom commands run as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A command left running in the snapshot (a REPL, a server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// A command retried until it exits 0 before the snapshot is taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// How long `ready` may take to pass, seconds.
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout_s: u64,
    /// What the build's VMs (the `run` steps, `start` and `ready`) may reach.
    #[serde(default, skip_serializing_if = "NetPolicy::is_none")]
    pub build: NetPolicy,
    /// What its sandboxes may reach unless their create asks for another policy.
    #[serde(default, skip_serializing_if = "NetPolicy::is_none")]
    pub network: NetPolicy,
}

/// How a template's sandboxes write to their root filesystem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskMode {
    /// The root drive is a copy-on-write overlay over the template's image (kiln-vmm's
    /// `cow_overlay_path`): writes go to a sparse file per sandbox on the host, so they cost
    /// host disk rather than guest memory, survive pause and resume, and a fork gets a copy.
    #[default]
    Cow,
    /// The root drive is read-only under the agent's tmpfs overlay (`KILN_OVERLAY=tmpfs`):
    /// writes stay in guest memory and count against `mem_mib`.
    Tmpfs,
}

fn default_vcpus() -> u32 {
    1
}
fn default_mem() -> u32 {
    256
}
fn default_ready_timeout() -> u64 {
    60
}

/// Memory bounds for a sandbox, MiB.
pub const MEM_RANGE: std::ops::RangeInclusive<u32> = 128..=65536;
/// vCPU bounds for a sandbox.
pub const VCPU_RANGE: std::ops::RangeInclusive<u32> = 1..=32;

impl Spec {
    /// Reads and parses the spec file at `path`; relative source paths are taken from the file's
    /// folder. The result is validated.
    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|err| SpecError::Read {
            path: path.to_path_buf(),
            err,
        })?;
        let mut spec: Spec = toml::from_str(&text).map_err(|err| SpecError::Parse {
            path: path.to_path_buf(),
            err,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut spec.from.dir, &mut spec.from.image, &mut spec.from.oci]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        spec.validate()?;
        Ok(spec)
    }

    /// Parses spec TOML text (paths must be absolute) and validates it.
    pub fn parse(text: &str) -> Result<Spec, SpecError> {
        let spec: Spec = toml::from_str(text).map_err(|err| SpecError::Parse {
            path: PathBuf::from("(request)"),
            err,
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks the rules that span fields.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !valid_name(&self.name) {
            return Err(invalid(
                "name",
                format!(
                    "{:?}: use 1 to 64 of a-z, 0-9, '.', '_' and '-', starting with a letter or digit",
                    self.name
                ),
            ));
        }
        let sources = [
            self.from.dir.is_some(),
            self.from.image.is_some(),
            self.from.oci.is_some(),
            self.from.debian.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            1 => {}
            0 => return Err(invalid("from", "give one of dir, image, oci or debian")),
            _ => {
                return Err(invalid(
                    "from",
                    "give only one of dir, image, oci or debian",
                ));
            }
        }
        for (field, path) in [
            ("from.dir", &self.from.dir),
            ("from.image", &self.from.image),
            ("from.oci", &self.from.oci),
        ] {
            if let Some(p) = path
                && p.is_relative()
            {
                return Err(invalid(
                    field,
                    format!("{} is not an absolute path", p.display()),
                ));
            }
        }
        if let Some(d) = &self.from.debian {
            for p in &d.packages {
                if p.is_empty()
                    || !p
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+-.:".contains(&b))
                {
                    return Err(invalid(
                        "from.debian.packages",
                        format!("{p:?} is not a package name"),
                    ));
                }
            }
        }
        if !VCPU_RANGE.contains(&self.vcpus) {
            return Err(invalid(
                "vcpus",
                format!("{} is outside {VCPU_RANGE:?}", self.vcpus),
            ));
        }
        if !MEM_RANGE.contains(&self.mem_mib) {
            return Err(invalid(
                "mem_mib",
                format!("{} is outside {MEM_RANGE:?}", self.mem_mib),
            ));
        }
        if let Some(d) = self.disk_mib
            && !(16..=1 << 20).contains(&d)
        {
            return Err(invalid("disk_mib", format!("{d} is outside 16..=1048576")));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(invalid("env", format!("{k:?} is not a variable name")));
            }
        }
        if let Some(w) = &self.workdir
            && !w.starts_with('/')
        {
            return Err(invalid("workdir", format!("{w:?} is not an absolute path")));
        }
        if self.ready.is_some() && !(1..=3600).contains(&self.ready_timeout_s) {
            return Err(invalid("ready_timeout_s", "must be 1 to 3600"));
        }
        for (at, policy) in [("build", &self.build), ("network", &self.network)] {
            policy
                .check(at)
                .map_err(|message| SpecError::Invalid { field: at, message })?;
        }
        Ok(())
    }
}

/// Template names: 1 to 64 of a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "py"
mem_mib = 512
run = ["echo hi"]
env = { A = "1" }
workdir = "/root"
start = "sleep 1000"
ready = "true"
[from]
image = "/kiln/rootfs.ext4"
"#;

    #[test]
    fn a_good_spec_parses_with_defaults() {
        let s = Spec::parse(GOOD).unwrap();
        assert_eq!((s.vcpus, s.mem_mib, s.ready_timeout_s), (1, 512, 60));
        assert_eq!(
            s.from.image.as_deref(),
            Some(Path::new("/kiln/rootfs.ext4"))
        );
        assert_eq!(s.run, ["echo hi"]);
        assert_eq!(s.disk, DiskMode::Cow);
        let t = Spec::parse(&GOOD.replace("[from]", "disk = \"tmpfs\"\n[from]")).unwrap();
        assert_eq!(t.disk, DiskMode::Tmpfs);
    }

    #[test]
    fn bad_specs_name_the_field() {
        let cases = [
            (GOOD.replace("mem_mib", "mem_mb"), "mem_mb"),
            (GOOD.replace("\"py\"", "\"Py\""), "name"),
            (GOOD.replace("image =", "dir = \"/x\"\nimage ="), "only one"),
            (
                GOOD.replace("image = \"/kiln/rootfs.ext4\"", ""),
                "give one of",
            ),
            (GOOD.replace("/kiln/rootfs.ext4", "rel.ext4"), "from.image"),
            (GOOD.replace("mem_mib = 512", "mem_mib = 64"), "mem_mib"),
            (GOOD.replace("\"/root\"", "\"root\""), "workdir"),
            (GOOD.replace("A = ", "\"A=B\" = "), "env"),
            (GOOD.replace("[from]", "[from]\nzip = 1"), "zip"),
            (
                GOOD.replace("[from]", "disk = \"qcow2\"\n[from]"),
                "unknown variant `qcow2`, expected `cow` or `tmpfs`",
            ),
        ];
        for (text, named) in cases {
            let e = Spec::parse(&text).unwrap_err().to_string();
            assert!(e.contains(named), "{named}: {e}");
        }
    }

    #[test]
    fn network_policies_parse_and_bad_ones_name_their_key() {
        let s = Spec::parse(&GOOD.replace(
            "[from]",
            "[build]\nallow_domains = [\"pypi.org\", \"*.pythonhosted.org\"]\n[network]\nallow_net = true\n[from]",
        ))
        .unwrap();
        assert_eq!(s.build.allow_domains, ["pypi.org", "*.pythonhosted.org"]);
        assert!(!s.build.allow_net);
        assert!(s.network.allow_net && s.network.allow_domains.is_empty());
        let plain = Spec::parse(GOOD).unwrap();
        assert!(
            plain.build.is_none() && plain.network.is_none(),
            "none by default"
        );
        // Policies change the stored spec (and so the template's key); none leaves it as it was.
        let json = serde_json::to_string(&plain).unwrap();
        assert!(
            !json.contains("build") && !json.contains("network"),
            "{json}"
        );
        assert!(serde_json::to_string(&s).unwrap().contains("pythonhosted"));
        let cases = [
            (
                "[build]\nallow_domains = [\"exa mple.com\"]",
                "template spec: build.allow_domains: \"exa mple.com\" is not a domain name",
            ),
            (
                "[network]\nallow_domains = [\"*.com\"]",
                "template spec: network.allow_domains: \"*.com\" would allow",
            ),
            (
                "[network]\nallow_domains = [\"a.com\"]\nallow_net = true",
                "template spec: network.allow_net: it allows every domain already",
            ),
            ("[network]\nallow_domain = []", "allow_domain"),
            ("[build]\nallow_net = \"yes\"", "allow_net"),
        ];
        for (table, named) in cases {
            let e = Spec::parse(&GOOD.replace("[from]", &format!("{table}\n[from]")))
                .unwrap_err()
                .to_string();
            assert!(e.contains(named), "{named}: {e}");
        }
    }

    #[test]
    fn relative_sources_are_taken_from_the_spec_folder() {
        let dir = std::env::temp_dir().join(format!("kiln-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.toml");
        std::fs::write(&file, "name = \"t\"\n[from]\ndir = \"tree\"\n").unwrap();
        let s = Spec::load(&file).unwrap();
        assert_eq!(s.from.dir.unwrap(), dir.join("tree"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn names() {
        for ok in ["a", "python", "py-3.11_x", "0abc"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-a", "A", "a b", "a/b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
