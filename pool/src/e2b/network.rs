//! E2B's network options of a create (`allow_internet_access` and `network`, the SDK's
//! `SandboxNetworkConfig`) in kilnd's terms: a sandbox either has the internet (`allow_net`:
//! anything but private, loopback, link-local, metadata and the host's own addresses) or reaches
//! only the domains it is allowed, by name. What kilnd cannot express is refused by name, never
//! dropped:
//!
//! - `allowOut` may hold domains (`example.com`, `*.example.com`) and `0.0.0.0/0` (everything);
//!   an address or CIDR block is refused: kilnd allows egress by name only.
//! - `denyOut` may hold `0.0.0.0/0` (deny everything not allowed), blocks inside the ranges no
//!   sandbox ever reaches (private, loopback, link-local, ...) and IPv6 blocks (a sandbox has no
//!   IPv6 egress at all); with the internet allowed, any other block is refused (kilnd cannot
//!   cut a hole in it), and without, it is what the sandbox gets anyway (allowed entries take
//!   precedence over denied ones on E2B too). Domains are refused, as on E2B.
//! - `dnsServers`: a sandbox's DNS always goes to kilnd's resolver (whatever server it asks),
//!   which answers allowed names only; an empty list is accepted, servers are refused.
//! - `allowPublicTraffic: true`, `maskRequestHost`, `httpsPorts` (kilnd serves no sandbox URLs),
//!   `egressProxy` and `rules` (header transforms) are refused.
//!
//! With neither field, the sandbox gets the internet when kilnd runs with
//! `--e2b-internet-default allow` (E2B's default), else its template's default policy (Kiln's
//! promise: no egress unless asked).

use std::net::{IpAddr, Ipv4Addr};

use serde::Deserialize;
use serde_json::Value;

use super::rest::ApiError;
use crate::types::NetworkRequest;

/// E2B's `SandboxNetworkConfig`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct E2bNetwork {
    allow_public_traffic: Option<bool>,
    allow_out: Option<Vec<String>>,
    deny_out: Option<Vec<String>>,
    dns_servers: Option<Vec<String>>,
    egress_proxy: Option<Value>,
    mask_request_host: Option<String>,
    https_ports: Option<Vec<Value>>,
    rules: Option<Value>,
}

/// One `allowOut`/`denyOut` entry.
#[derive(Debug, PartialEq, Eq)]
enum Dest {
    /// `0.0.0.0/0`.
    All,
    /// An IPv4 block.
    V4(Ipv4Addr, u8),
    /// An IPv6 address or block.
    V6,
    /// Not an address: a domain (pattern).
    Name(String),
}

fn dest(field: &str, s: &str) -> Result<Dest, ApiError> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let Ok(ip) = addr.parse::<IpAddr>() else {
        return match len {
            Some(_) => Err(ApiError::bad(format!("{field}: {s:?} is not a CIDR block"))),
            None => Ok(Dest::Name(s.to_string())),
        };
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| ApiError::bad(format!("{field}: {s:?} is not a CIDR block")))?,
    };
    Ok(match ip {
        IpAddr::V4(_) if len == 0 => Dest::All,
        IpAddr::V4(a) => Dest::V4(a, len),
        IpAddr::V6(_) => Dest::V6,
    })
}

/// Whether the IPv4 block `addr/len` lies inside a range no sandbox ever reaches.
fn always_refused(addr: Ipv4Addr, len: u8) -> bool {
    let mask = |l: u8| u32::MAX.checked_shl(32 - u32::from(l)).unwrap_or(0);
    kiln_net::nft::REFUSED_V4.iter().any(|(net, nlen)| {
        let net: Ipv4Addr = net.parse().unwrap_or(Ipv4Addr::UNSPECIFIED);
        *nlen <= len && u32::from(addr) & mask(*nlen) == u32::from(net)
    })
}

/// The network of an E2B create: `None` for the template's default policy.
pub fn request(
    allow_internet_access: Option<bool>,
    network: Option<Value>,
    internet_default: bool,
) -> Result<Option<NetworkRequest>, ApiError> {
    let given = network.filter(|v| !v.is_null());
    if allow_internet_access.is_none() && given.is_none() {
        return Ok(internet_default.then(|| NetworkRequest {
            allow_domains: Some(Vec::new()),
            allow_net: Some(true),
            publish: Vec::new(),
        }));
    }
    let n: E2bNetwork = match given {
        Some(v) => serde_json::from_value(v).map_err(|e| ApiError::bad(format!("network: {e}")))?,
        None => E2bNetwork::default(),
    };
    refuse_the_rest(&n)?;

    let (mut allow_all, mut domains) = (false, Vec::new());
    for s in n.allow_out.iter().flatten() {
        match dest("network.allowOut", s)? {
            Dest::All => allow_all = true,
            Dest::Name(d) => {
                d.parse::<kiln_net::DomainPattern>()
                    .map_err(|e| ApiError::bad(format!("network.allowOut: {}", e.reason())))?;
                domains.push(d);
            }
            Dest::V4(..) | Dest::V6 => {
                return Err(ApiError::bad(format!(
                    "network.allowOut: {s:?}: kilnd allows egress by domain name only (or to \
                     everything with 0.0.0.0/0), not to addresses"
                )));
            }
        }
    }
    let (mut deny_all, mut holes) = (false, Vec::new());
    for s in n.deny_out.iter().flatten() {
        match dest("network.denyOut", s)? {
            Dest::All => deny_all = true,
            Dest::V4(a, l) if !always_refused(a, l) => holes.push(s.clone()),
            Dest::V4(..) | Dest::V6 => {}
            Dest::Name(_) => {
                return Err(ApiError::bad(format!(
                    "network.denyOut: {s:?}: only addresses and CIDR blocks can be denied"
                )));
            }
        }
    }
    // Allowed entries win over denied ones, as on E2B; without either, the internet is what
    // allow_internet_access says, else kilnd's default for E2B. Domains allowed on top of the
    // internet add nothing.
    let internet = allow_all
        || (!deny_all && allow_internet_access.unwrap_or(internet_default && domains.is_empty()));
    if internet && let Some(hole) = holes.first() {
        return Err(ApiError::bad(format!(
            "network.denyOut: {hole:?}: kilnd cannot deny part of the internet while allowing \
             the rest; deny 0.0.0.0/0 and list the domains the sandbox may reach in allowOut"
        )));
    }
    Ok(Some(NetworkRequest {
        allow_domains: Some(if internet { Vec::new() } else { domains }),
        allow_net: Some(internet),
        publish: Vec::new(),
    }))
}

/// Refuses the options kilnd has nothing for, naming each.
fn refuse_the_rest(n: &E2bNetwork) -> Result<(), ApiError> {
    if n.allow_public_traffic == Some(true) {
        return Err(ApiError::bad(
            "network.allowPublicTraffic: kilnd serves no sandbox URLs (publish ports with \
             kilnd's own API instead)",
        ));
    }
    if n.mask_request_host.is_some() {
        return Err(ApiError::bad(
            "network.maskRequestHost: kilnd serves no sandbox URLs",
        ));
    }
    if n.https_ports.as_ref().is_some_and(|p| !p.is_empty()) {
        return Err(ApiError::bad(
            "network.httpsPorts: kilnd serves no sandbox URLs",
        ));
    }
    if n.dns_servers.as_ref().is_some_and(|d| !d.is_empty()) {
        return Err(ApiError::bad(
            "network.dnsServers: a kilnd sandbox's DNS always goes to kilnd's own resolver (any \
             server address reaches it), which answers only the names it may reach; other \
             traffic to a DNS server cannot be allowed",
        ));
    }
    if !matches!(n.egress_proxy, None | Some(Value::Null)) {
        return Err(ApiError::bad(
            "network.egressProxy: kilnd cannot tunnel a sandbox's egress through a proxy",
        ));
    }
    if !matches!(&n.rules, None | Some(Value::Null))
        && n.rules
            .as_ref()
            .and_then(Value::as_object)
            .is_none_or(|m| !m.is_empty())
    {
        return Err(ApiError::bad(
            "network.rules: kilnd does not transform a sandbox's requests",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ok(
        access: Option<bool>,
        network: Value,
        internet_default: bool,
    ) -> Option<(Vec<String>, bool)> {
        request(
            access,
            Some(network).filter(|v| !v.is_null()),
            internet_default,
        )
        .unwrap()
        .map(|r| (r.allow_domains.unwrap(), r.allow_net.unwrap()))
    }

    fn refused(access: Option<bool>, network: Value) -> String {
        let e = request(access, Some(network), false).unwrap_err();
        assert_eq!(e.status(), 400);
        e.message().to_string()
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn saying_nothing_gets_the_template_default_or_the_internet_by_kilnds_flag() {
        assert_eq!(ok(None, Value::Null, false), None, "the template's default");
        assert_eq!(ok(None, Value::Null, true), Some((vec![], true)));
        assert_eq!(ok(Some(true), Value::Null, false), Some((vec![], true)));
        assert_eq!(ok(Some(false), Value::Null, true), Some((vec![], false)));
    }

    #[test]
    fn domains_are_allowed_by_name_and_win_over_a_deny_all() {
        let net = json!({"allowOut": ["pypi.org", "*.pythonhosted.org"], "denyOut": ["0.0.0.0/0"]});
        let want = Some((s(&["pypi.org", "*.pythonhosted.org"]), false));
        assert_eq!(ok(None, net.clone(), true), want);
        assert_eq!(
            ok(Some(true), net, false),
            want,
            "the deny-all says no internet"
        );
        // Without internet, the allowed domains are all it reaches.
        assert_eq!(
            ok(Some(false), json!({"allowOut": ["api.example.com"]}), true),
            Some((s(&["api.example.com"]), false))
        );
        // With kilnd's deny default, allowOut alone means those names (no internet to add to).
        assert_eq!(
            ok(None, json!({"allowOut": ["api.example.com"]}), false),
            Some((s(&["api.example.com"]), false))
        );
        // Allowing everything allows everything.
        assert_eq!(
            ok(
                Some(false),
                json!({"allowOut": ["0.0.0.0/0"], "denyOut": ["0.0.0.0/0"]}),
                false
            ),
            Some((vec![], true))
        );
        // The internet with domains on top is the internet.
        assert_eq!(
            ok(Some(true), json!({"allowOut": ["a.example.com"]}), false),
            Some((vec![], true))
        );
    }

    #[test]
    fn denies_kilnd_enforces_anyway_are_accepted() {
        for deny in [
            "10.0.0.0/8",
            "169.254.169.254",
            "192.168.1.0/24",
            "fd00::/8",
            "::/0",
        ] {
            assert_eq!(
                ok(Some(true), json!({"denyOut": [deny]}), false),
                Some((vec![], true)),
                "{deny}"
            );
        }
        // Without the internet, any block is denied already.
        assert_eq!(
            ok(Some(false), json!({"denyOut": ["8.8.8.8/32"]}), false),
            Some((vec![], false))
        );
        assert_eq!(
            ok(
                None,
                json!({"dnsServers": [], "allowPublicTraffic": false}),
                false
            ),
            Some((vec![], false))
        );
    }

    #[test]
    fn what_kilnd_cannot_express_is_refused_by_name() {
        let cases = [
            (
                Some(true),
                json!({"denyOut": ["8.8.8.0/24"]}),
                "network.denyOut: \"8.8.8.0/24\": kilnd cannot deny part of the internet",
            ),
            (
                None,
                json!({"allowOut": ["1.1.1.1"]}),
                "network.allowOut: \"1.1.1.1\": kilnd allows egress by domain name only",
            ),
            (
                None,
                json!({"allowOut": ["8.8.8.0/24"]}),
                "network.allowOut: \"8.8.8.0/24\"",
            ),
            (
                None,
                json!({"allowOut": ["bad name.com"]}),
                "network.allowOut: \"bad name.com\" is not a domain name",
            ),
            (
                None,
                json!({"allowOut": ["*.com"]}),
                "network.allowOut: \"*.com\" would allow a whole top-level domain",
            ),
            (
                None,
                json!({"allowOut": ["1.2.3.4/40"]}),
                "network.allowOut: \"1.2.3.4/40\" is not a CIDR block",
            ),
            (
                None,
                json!({"denyOut": ["example.com"]}),
                "network.denyOut: \"example.com\": only addresses",
            ),
            (
                None,
                json!({"dnsServers": ["1.1.1.1"]}),
                "network.dnsServers: ",
            ),
            (
                None,
                json!({"allowPublicTraffic": true}),
                "network.allowPublicTraffic: ",
            ),
            (
                None,
                json!({"maskRequestHost": "${PORT}-x.example.com"}),
                "network.maskRequestHost: ",
            ),
            (None, json!({"httpsPorts": [3000]}), "network.httpsPorts: "),
            (
                None,
                json!({"egressProxy": {"address": "p:1080"}}),
                "network.egressProxy: ",
            ),
            (
                None,
                json!({"rules": {"api.example.com": [{"transform": {}}]}}),
                "network.rules: ",
            ),
            (
                None,
                json!({"allowOutt": []}),
                "network: unknown field `allowOutt`",
            ),
        ];
        for (access, net, named) in cases {
            let msg = refused(access, net.clone());
            assert!(msg.starts_with(named), "{net}: {msg}");
        }
    }
}
