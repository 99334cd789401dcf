//! The packet filter, as nftables JSON fed to `nft -j -f -`: one table in each VM's namespace
//! (where the guest cannot reach it), and for `--allow-net` one shared table in the uplink
//! namespace that NATs every sandbox's veth range.
//!
//! In the VM's namespace, traffic from the TAP goes like this. DNS (UDP and TCP port 53, to any
//! address) is redirected to the VM's resolver on the gateway. With a domain allowlist, all other
//! TCP is redirected to the egress proxy, which decides per connection, and nothing else is let
//! through. With `--allow-net`, other traffic is forwarded out the veth and masqueraded, except to
//! the refused ranges and the uplink's own addresses. Whatever is refused is first sent to NFLOG
//! group [`LOG_GROUP`] (rate-limited), whose reader reports it with the VM's id, then rejected
//! with a TCP reset or an ICMP error so the guest's program fails at once.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::addr::{DNS_PORT, GATEWAY_IP, PROXY_PORT, TAP_NAME};

/// TCP's protocol number: numbers, not names, so nft needs no /etc/protocols (minimal hosts lack
/// one).
const IPPROTO_TCP: u8 = 6;

/// The NFLOG group refused packets go to (per namespace).
pub const LOG_GROUP: u16 = 100;
/// The table in each VM's namespace.
pub const VM_TABLE: &str = "kiln";
/// The shared table in the uplink namespace.
pub const UPLINK_TABLE: &str = "kiln-uplink";
/// The veth inside a VM's namespace (`--allow-net`).
pub const VETH_INSIDE: &str = "uplink0";
/// Names of the uplink ends of the veths: `kn-<index>`.
pub const VETH_OUTSIDE_PREFIX: &str = "kn-";
/// The range the veth links are numbered from, a /30 each.
pub const VETH_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 201, 0, 0), 16);

/// The prefixes no sandbox may reach (the same as [`crate::policy::refused_range`] for IPv4).
pub const REFUSED_V4: &[(&str, u8)] = &[
    ("0.0.0.0", 8),
    ("10.0.0.0", 8),
    ("100.64.0.0", 10),
    ("127.0.0.0", 8),
    ("169.254.0.0", 16),
    ("172.16.0.0", 12),
    ("192.0.0.0", 24),
    ("192.168.0.0", 16),
    ("198.18.0.0", 15),
    ("224.0.0.0", 3),
];

/// Why the filter could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` is not installed.
    #[error("nft is not installed: network sandboxes need nftables (apt-get install nftables)")]
    Missing,
    /// `nft` could not be run.
    #[error("cannot run nft: {0}")]
    Spawn(std::io::Error),
    /// `nft` refused the ruleset.
    #[error("nft refused the {what} ruleset: {why}")]
    Refused {
        /// Which table.
        what: &'static str,
        /// Its status and stderr.
        why: String,
    },
}

/// What egress the VM's table allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// TCP only through the proxy, UDP only DNS.
    Proxied,
    /// Forwarded and NATed out the veth, but never to the refused ranges or `host_addrs`.
    Routed,
}

fn m(op: &str, left: Value, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}
fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}
fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}
fn iif(name: &str) -> Value {
    m("==", meta("iifname"), json!(name))
}
fn oif(name: &str) -> Value {
    m("==", meta("oifname"), json!(name))
}
fn ct_state(states: &[&str]) -> Value {
    m("in", json!({"ct": {"key": "state"}}), json!(states))
}
fn prefixes(list: &[(String, u8)]) -> Value {
    let items: Vec<Value> = list
        .iter()
        .map(|(a, l)| json!({"prefix": {"addr": a, "len": l}}))
        .collect();
    json!({"set": items})
}
/// Log to NFLOG (at most 20 a second, bursts of 50) with `prefix` telling why.
fn log(prefix: &str) -> [Value; 2] {
    [
        json!({"limit": {"rate": 20, "per": "second", "burst": 50}}),
        json!({"log": {"group": LOG_GROUP, "prefix": prefix}}),
    ]
}

struct Table {
    family: &'static str,
    name: &'static str,
    cmds: Vec<Value>,
}

impl Table {
    fn new(family: &'static str, name: &'static str) -> Self {
        let cmds = vec![json!({"add": {"table": {"family": family, "name": name}}})];
        Self { family, name, cmds }
    }
    fn chain(&mut self, name: &str, kind: &str, hook: &str, prio: i32, policy: &str) {
        self.cmds.push(
            json!({"add": {"chain": {"family": self.family, "table": self.name,
            "name": name, "type": kind, "hook": hook, "prio": prio, "policy": policy}}}),
        );
    }
    fn rule(&mut self, chain: &str, expr: Vec<Value>) {
        self.cmds.push(
            json!({"add": {"rule": {"family": self.family, "table": self.name,
            "chain": chain, "expr": expr}}}),
        );
    }
    fn json(self) -> Value {
        json!({"nftables": self.cmds})
    }
}

/// Adds two rules matching `matches`: one logging (rate-limited) with `prefix`, one with the
/// verdict, so a flood that outruns the log limit is still refused.
fn log_then(t: &mut Table, chain: &str, matches: Vec<Value>, prefix: &str, verdict: Value) {
    let mut logged = matches.clone();
    logged.extend(log(prefix));
    t.rule(chain, logged);
    let mut ruled = matches;
    ruled.push(verdict);
    t.rule(chain, ruled);
}

/// Refuses with a TCP reset or an ICMP error, so the guest fails at once instead of waiting.
fn reject_rules(t: &mut Table, chain: &str, matches: Vec<Value>, prefix: &str) {
    let mut tcp = matches.clone();
    tcp.push(m("==", meta("l4proto"), json!(IPPROTO_TCP)));
    log_then(
        t,
        chain,
        tcp,
        prefix,
        json!({"reject": {"type": "tcp reset"}}),
    );
    log_then(t, chain, matches, prefix, json!({"reject": null}));
}

/// The VM namespace's table. `host_addrs` are the uplink's own addresses, refused with
/// [`Egress::Routed`] (with a proxy, connections to them are the proxy's to refuse).
///
/// The namespace forwards in both modes: what is neither redirected nor for the gateway goes
/// through the forward chain, where it is logged and refused with a reset or an ICMP error (with
/// a proxy, a default route back out of the TAP makes sure it gets there; nothing is accepted).
pub fn vm_ruleset(egress: Egress, host_addrs: &[Ipv4Addr]) -> Value {
    let mut t = Table::new("inet", VM_TABLE);
    let tap = || iif(TAP_NAME);
    let gw = GATEWAY_IP.to_string();

    t.chain("dnat", "nat", "prerouting", -100, "accept");
    for proto in ["udp", "tcp"] {
        t.rule(
            "dnat",
            vec![
                tap(),
                m("==", payload(proto, "dport"), json!(DNS_PORT)),
                json!({"redirect": {"port": DNS_PORT}}),
            ],
        );
    }
    if egress == Egress::Proxied {
        t.rule(
            "dnat",
            vec![
                tap(),
                m("==", meta("l4proto"), json!(IPPROTO_TCP)),
                m("!=", payload("ip", "daddr"), json!(gw)),
                json!({"redirect": {"port": PROXY_PORT}}),
            ],
        );
    }

    // IPv6 is off on the guest's link; a guest sending it anyway is only logged.
    t.chain("guest", "filter", "prerouting", 0, "accept");
    log_then(
        &mut t,
        "guest",
        vec![tap(), m("==", meta("nfproto"), json!("ipv6"))],
        "ipv6",
        json!({"drop": null}),
    );

    // To the gateway itself: only the resolver and (redirected) the proxy.
    t.chain("input", "filter", "input", 0, "drop");
    t.rule("input", vec![iif("lo"), json!({"accept": null})]);
    t.rule(
        "input",
        vec![
            ct_state(&["established", "related"]),
            json!({"accept": null}),
        ],
    );
    for proto in ["udp", "tcp"] {
        t.rule(
            "input",
            vec![
                tap(),
                m("==", payload(proto, "dport"), json!(DNS_PORT)),
                json!({"accept": null}),
            ],
        );
    }
    if egress == Egress::Proxied {
        t.rule(
            "input",
            vec![
                tap(),
                m("==", payload("tcp", "dport"), json!(PROXY_PORT)),
                m("in", json!({"ct": {"key": "status"}}), json!("dnat")),
                json!({"accept": null}),
            ],
        );
    }
    reject_rules(&mut t, "input", vec![tap()], "gateway");

    t.chain("forward", "filter", "forward", 0, "drop");
    match egress {
        Egress::Proxied => reject_rules(&mut t, "forward", vec![tap()], "egress"),
        Egress::Routed => {
            let refused: Vec<(String, u8)> = REFUSED_V4
                .iter()
                .map(|(a, l)| (a.to_string(), *l))
                .collect();
            reject_rules(
                &mut t,
                "forward",
                vec![tap(), m("==", payload("ip", "daddr"), prefixes(&refused))],
                "range",
            );
            if !host_addrs.is_empty() {
                let hosts: Vec<(String, u8)> =
                    host_addrs.iter().map(|a| (a.to_string(), 32)).collect();
                reject_rules(
                    &mut t,
                    "forward",
                    vec![tap(), m("==", payload("ip", "daddr"), prefixes(&hosts))],
                    "host",
                );
            }
            t.rule(
                "forward",
                vec![tap(), oif(VETH_INSIDE), json!({"accept": null})],
            );
            t.rule(
                "forward",
                vec![
                    iif(VETH_INSIDE),
                    oif(TAP_NAME),
                    ct_state(&["established", "related"]),
                    json!({"accept": null}),
                ],
            );
            t.chain("snat", "nat", "postrouting", 100, "accept");
            t.rule("snat", vec![oif(VETH_INSIDE), json!({"masquerade": null})]);
        }
    }
    t.json()
}

/// The uplink namespace's shared table: masquerade the veth range out of any other interface,
/// keep sandboxes off the uplink's own addresses, and refuse forwarding to the refused ranges.
pub fn uplink_ruleset() -> Value {
    let mut t = Table::new("inet", UPLINK_TABLE);
    let veths = || {
        m(
            "==",
            meta("iifname"),
            json!(format!("{VETH_OUTSIDE_PREFIX}*")),
        )
    };
    let range = vec![(VETH_RANGE.0.to_string(), VETH_RANGE.1)];
    t.chain("snat", "nat", "postrouting", 100, "accept");
    t.rule(
        "snat",
        vec![
            m("==", payload("ip", "saddr"), prefixes(&range)),
            m(
                "!=",
                meta("oifname"),
                json!(format!("{VETH_OUTSIDE_PREFIX}*")),
            ),
            json!({"masquerade": null}),
        ],
    );
    t.chain("input", "filter", "input", 0, "accept");
    t.rule(
        "input",
        vec![
            veths(),
            ct_state(&["new", "invalid"]),
            json!({"drop": null}),
        ],
    );
    t.chain("forward", "filter", "forward", 0, "accept");
    let refused: Vec<(String, u8)> = REFUSED_V4
        .iter()
        .map(|(a, l)| (a.to_string(), *l))
        .collect();
    t.rule(
        "forward",
        vec![
            veths(),
            m("==", payload("ip", "daddr"), prefixes(&refused)),
            json!({"drop": null}),
        ],
    );
    t.json()
}

/// Loads `ruleset` with `nft -j -f` from a pipe (in the calling thread's namespace); `what`
/// names it in errors.
pub fn apply(what: &'static str, ruleset: &Value) -> Result<(), NftError> {
    // Not `-f -`: nft turns that into /dev/stdin, which a minimal /dev (an initramfs's, a
    // container's) lacks; /proc/self/fd/0 is the same pipe wherever /proc is mounted.
    run(
        &["-j", "-f", "/proc/self/fd/0"],
        Some(ruleset.to_string().as_bytes()),
    )
    .map(drop)
    .map_err(|e| match e {
        NftError::Refused { why, .. } => NftError::Refused { what, why },
        e => e,
    })
}

/// Whether table `name` of `family` exists (in the calling thread's namespace).
pub fn table_exists(family: &str, name: &str) -> Result<bool, NftError> {
    match run(&["list", "table", family, name], None) {
        Ok(_) => Ok(true),
        Err(NftError::Refused { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The whole ruleset as `nft list ruleset` prints it (for leak checks).
pub fn list_ruleset() -> Result<String, NftError> {
    run(&["list", "ruleset"], None)
}

fn run(args: &[&str], stdin: Option<&[u8]>) -> Result<String, NftError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                NftError::Missing
            } else {
                NftError::Spawn(e)
            }
        })?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(data).map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Refused {
            what: "",
            why: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::NetNs;

    #[test]
    fn the_refused_prefixes_are_the_policys() {
        for (addr, len) in REFUSED_V4 {
            let ip: Ipv4Addr = addr.parse().unwrap();
            assert!(
                crate::policy::refused_range(ip.into()).is_some(),
                "{addr}/{len}"
            );
            let last = Ipv4Addr::from(u32::from(ip) | (u32::MAX >> len));
            assert!(
                crate::policy::refused_range(last.into()).is_some(),
                "end of {addr}/{len}"
            );
        }
    }

    #[test]
    fn every_ruleset_loads_into_a_namespace() {
        let ns = NetNs::new().expect("needs root");
        ns.run(|| {
            crate::link::create_tap(TAP_NAME, crate::addr::TAP_MAC).unwrap();
            apply("test VM (proxied)", &vm_ruleset(Egress::Proxied, &[])).unwrap();
            assert!(table_exists("inet", VM_TABLE).unwrap());
            let listed = list_ruleset().unwrap();
            assert!(listed.contains("redirect to :15001"), "{listed}");
            assert!(listed.contains("log prefix \"egress\" group 100"), "{listed}");
            assert!(listed.contains("reject with tcp reset"), "{listed}");
            run(&["flush", "ruleset"], None).unwrap();
            let hosts = [Ipv4Addr::new(203, 0, 113, 1)];
            apply("test VM (routed)", &vm_ruleset(Egress::Routed, &hosts)).unwrap();
            let listed = list_ruleset().unwrap();
            assert!(listed.contains("masquerade"), "{listed}");
            assert!(listed.contains("203.0.113.1"), "{listed}");
            apply("test uplink", &uplink_ruleset()).unwrap();
            assert!(table_exists("inet", UPLINK_TABLE).unwrap());
            assert!(!table_exists("inet", "nope").unwrap());
            let e = apply("broken", &json!({"nftables": [{"add": {"rule": {"family": "inet", "table": "nope", "chain": "x", "expr": []}}}]}))
                .unwrap_err();
            assert!(e.to_string().starts_with("nft refused the broken ruleset: "), "{e}");
        })
        .unwrap();
    }
}
