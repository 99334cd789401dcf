//! What a sandbox may reach: the domains it was allowed (`--allow-domain`, exact names or
//! `*.suffix`), or everything (`--allow-net`), and never the address ranges no sandbox may touch
//! whatever it was allowed: private, loopback, link-local (the cloud metadata address
//! 169.254.169.254 among them), shared (CGNAT), multicast and reserved space, IPv4 or IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a domain pattern is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Not a domain name.
    #[error(
        "--allow-domain {0:?} is not a domain name (letters, digits and '-' in dot-separated labels of 1 to 63 characters)"
    )]
    BadName(String),
    /// A wildcard anywhere but as the whole first label.
    #[error("--allow-domain {0:?}: a wildcard is only allowed as \"*.\" in front of a domain")]
    BadWildcard(String),
    /// A wildcard over a top-level domain.
    #[error("--allow-domain {0:?} would allow a whole top-level domain; name the domain under it")]
    TooBroad(String),
}

impl PolicyError {
    /// What is wrong with the value, without naming the command-line flag (for callers that
    /// name their own field: a spec key, a JSON field).
    pub fn reason(&self) -> String {
        let full = self.to_string();
        full.strip_prefix("--allow-domain ")
            .unwrap_or(&full)
            .to_string()
    }
}

/// One `--allow-domain` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainPattern {
    /// Lower case, no trailing dot; for a wildcard, the part after `*.`.
    name: String,
    /// `*.name`: names under `name` (not `name` itself).
    wildcard: bool,
}

/// `name` in lower case without a trailing dot, if it is a valid host name.
pub fn normalize(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then_some(name)
}

impl FromStr for DomainPattern {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let (wildcard, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        if rest.contains('*') {
            return Err(PolicyError::BadWildcard(s.into()));
        }
        let name = normalize(rest).ok_or_else(|| PolicyError::BadName(s.into()))?;
        if wildcard && !name.contains('.') {
            return Err(PolicyError::TooBroad(s.into()));
        }
        Ok(DomainPattern { name, wildcard })
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

impl DomainPattern {
    /// Whether `name` (already normalized) matches.
    pub fn matches(&self, name: &str) -> bool {
        if self.wildcard {
            name.len() > self.name.len() + 1
                && name.ends_with(&self.name)
                && name.as_bytes()[name.len() - self.name.len() - 1] == b'.'
        } else {
            name == self.name
        }
    }
}

/// What egress a sandbox has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Names it may resolve and reach on ports 80 and 443.
    pub domains: Vec<DomainPattern>,
    /// Any destination (but the refused ranges), any protocol.
    pub allow_net: bool,
}

impl Policy {
    /// Whether the guest may resolve and reach `name`.
    pub fn allows_name(&self, name: &str) -> bool {
        match normalize(name) {
            Some(n) => self.allow_net || self.domains.iter().any(|d| d.matches(&n)),
            None => false,
        }
    }
}

/// Why no sandbox may reach `ip`, or `None` when it is ordinary public address space.
pub fn refused_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => refused_v6(v6),
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(match o {
        [169, 254, 169, 254] => "the cloud metadata address 169.254.169.254",
        [0, ..] => "the unspecified network 0.0.0.0/8",
        [10, ..] => "the private range 10.0.0.0/8",
        [100, b, ..] if (64..128).contains(&b) => "the shared address space 100.64.0.0/10",
        [127, ..] => "loopback 127.0.0.0/8",
        [169, 254, ..] => "link-local 169.254.0.0/16",
        [172, b, ..] if (16..32).contains(&b) => "the private range 172.16.0.0/12",
        [192, 0, 0, _] => "the IETF protocol range 192.0.0.0/24",
        [192, 168, ..] => "the private range 192.168.0.0/16",
        [198, b, ..] if b == 18 || b == 19 => "the benchmarking range 198.18.0.0/15",
        [a, ..] if a >= 224 => "multicast or reserved space 224.0.0.0/3",
        _ => return None,
    })
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return refused_v4(v4);
    }
    let s = ip.segments();
    Some(match s {
        _ if ip.is_unspecified() => "the unspecified address ::",
        _ if ip.is_loopback() => "loopback ::1",
        [a, ..] if a & 0xfe00 == 0xfc00 => "the unique local range fc00::/7",
        [a, ..] if a & 0xffc0 == 0xfe80 => "link-local fe80::/10",
        [a, ..] if a & 0xff00 == 0xff00 => "multicast ff00::/8",
        [0x64, 0xff9b, ..] => "the NAT64 range 64:ff9b::/96",
        [0, 0, 0, 0, 0, 0, ..] => "IPv4-compatible space ::/96",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> DomainPattern {
        s.parse().unwrap()
    }

    #[test]
    fn exact_and_wildcard_patterns_match_as_documented() {
        let exact = p("PyPI.org.");
        assert!(exact.matches("pypi.org"));
        assert!(!exact.matches("files.pypi.org"));
        let wild = p("*.pythonhosted.org");
        assert!(wild.matches("files.pythonhosted.org"));
        assert!(wild.matches("a.b.pythonhosted.org"));
        assert!(!wild.matches("pythonhosted.org"), "not the apex");
        assert!(
            !wild.matches("evilpythonhosted.org"),
            "a label boundary, not a string suffix"
        );
        let policy = Policy {
            domains: vec![exact, wild],
            allow_net: false,
        };
        assert!(policy.allows_name("PYPI.ORG."));
        assert!(!policy.allows_name("example.com"));
        assert!(!policy.allows_name("bad name"));
        assert!(
            Policy {
                domains: vec![],
                allow_net: true
            }
            .allows_name("example.com")
        );
    }

    #[test]
    fn bad_patterns_are_named() {
        let e = |s: &str| s.parse::<DomainPattern>().unwrap_err().to_string();
        assert!(
            e("exa mple.com").starts_with("--allow-domain \"exa mple.com\" is not a domain name")
        );
        assert!(e("").contains("is not a domain name"));
        assert!(e("-a.com").contains("is not a domain name"));
        assert!(e("a.*.com").contains("a wildcard is only allowed"));
        assert!(e("*").contains("is not a domain name") || e("*").contains("wildcard"));
        assert_eq!(
            e("*.com"),
            "--allow-domain \"*.com\" would allow a whole top-level domain; name the domain under it"
        );
        assert!(e(&"a".repeat(64)).contains("is not a domain name"));
        let err = "a b".parse::<DomainPattern>().unwrap_err();
        assert!(
            err.reason().starts_with("\"a b\" is not a domain name"),
            "{}",
            err.reason()
        );
    }

    #[test]
    fn refused_ranges_cover_private_loopback_link_local_and_metadata() {
        let r = |s: &str| refused_range(s.parse().unwrap());
        assert_eq!(
            r("169.254.169.254"),
            Some("the cloud metadata address 169.254.169.254")
        );
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(r(ip).is_some(), "{ip} must be refused");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.15.0.1",
            "172.32.0.1",
            "100.128.0.1",
            "203.0.113.10",
            "198.51.100.53",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(r(ip), None, "{ip} is public");
        }
    }
}
