//! The resolver each sandbox gets, on its gateway address (all guest DNS is redirected to it): it
//! answers A queries only for allowed names (all names with `--allow-net`), from the host's
//! upstream name servers, and pins every address it hands out to the name asked for, so the
//! egress proxy can check that a connection goes where that name resolved. Answers are flattened
//! (the guest sees A records for the name it asked, never the CNAME chain), private, loopback,
//! link-local and metadata addresses are dropped from them (no DNS rebinding into the host's
//! networks), AAAA questions get empty answers (the guest has no IPv6), and every other type gets
//! an empty answer too (no TXT, no HTTPS records carrying ECH keys). A name that is not allowed
//! gets NXDOMAIN and is reported.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use crate::policy::{Policy, normalize, refused_range};
use crate::refusal::Refusals;

/// The longest an answer is cached by the guest: short, so a name that moves is asked again.
pub const MAX_TTL: u32 = 300;
/// Names the pin table holds; past that, new names are answered but not pinned (and so cannot
/// be connected to through the proxy).
pub const MAX_PINNED_NAMES: usize = 10_000;
/// How long a TCP DNS connection may sit idle.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Why the upstream name servers could not be found.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// `/etc/resolv.conf` could not be read.
    #[error("cannot read the host's name servers from /etc/resolv.conf: {0}")]
    SystemConf(String),
}

/// The addresses handed out for each name.
#[derive(Debug, Clone, Default)]
pub struct Pins(Arc<Mutex<HashMap<String, HashSet<Ipv4Addr>>>>);

impl Pins {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashSet<Ipv4Addr>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `name` (normalized) resolved to `ip`; false when the table is full.
    pub fn pin(&self, name: &str, ip: Ipv4Addr) -> bool {
        let mut map = self.lock();
        if !map.contains_key(name) && map.len() >= MAX_PINNED_NAMES {
            return false;
        }
        map.entry(name.to_string()).or_default().insert(ip);
        true
    }

    /// Whether `name` resolved to `ip`.
    pub fn is_pinned(&self, name: &str, ip: Ipv4Addr) -> bool {
        normalize(name).is_some_and(|n| self.lock().get(&n).is_some_and(|s| s.contains(&ip)))
    }
}

/// Where the resolver asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// The host's `/etc/resolv.conf`.
    System,
    /// These servers (UDP, falling back to TCP).
    Servers(Vec<SocketAddr>),
}

/// A sandbox's resolver.
#[derive(Clone)]
pub struct Resolver {
    policy: Arc<Policy>,
    pins: Pins,
    refusals: Refusals,
    upstream: TokioResolver,
}

impl Resolver {
    /// A resolver for `policy`, asking `upstream`, pinning into `pins`, reporting to
    /// `refusals`. Must be called inside a tokio runtime.
    pub fn new(
        policy: Arc<Policy>,
        upstream: &Upstream,
        pins: Pins,
        refusals: Refusals,
    ) -> Result<Self, DnsError> {
        // A policy that allows no name never asks upstream, so a host without name servers
        // (no /etc/resolv.conf) can still run a sandbox that has --net alone.
        let asks = policy.allow_net || !policy.domains.is_empty();
        let (config, mut opts) = match upstream {
            _ if !asks => (ResolverConfig::new(), ResolverOpts::default()),
            Upstream::System => hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| DnsError::SystemConf(e.to_string()))?,
            Upstream::Servers(list) => {
                let mut config = ResolverConfig::new();
                for addr in list {
                    config.add_name_server(NameServerConfig::new(*addr, Protocol::Udp));
                    config.add_name_server(NameServerConfig::new(*addr, Protocol::Tcp));
                }
                (config, ResolverOpts::default())
            }
        };
        // The guest's own resolver caches; this one only spares the upstream repeated questions.
        opts.cache_size = 256;
        opts.attempts = 2;
        opts.timeout = Duration::from_secs(3);
        let upstream =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                .with_options(opts)
                .build();
        Ok(Self {
            policy,
            pins,
            refusals,
            upstream,
        })
    }

    /// The answer to one query message (`None` for something that is not a query at all,
    /// which gets no answer).
    pub async fn answer(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let query = Message::from_vec(bytes).ok()?;
        if query.message_type() != MessageType::Query {
            return None;
        }
        let mut resp = Message::new();
        resp.set_id(query.id())
            .set_message_type(MessageType::Response)
            .set_op_code(query.op_code())
            .set_recursion_desired(query.recursion_desired())
            .set_recursion_available(true);
        let [q] = query.queries() else {
            resp.set_response_code(ResponseCode::FormErr);
            return resp.to_vec().ok();
        };
        resp.add_query(q.clone());
        if query.op_code() != OpCode::Query {
            resp.set_response_code(ResponseCode::NotImp);
            return resp.to_vec().ok();
        }
        let asked = q.name().to_ascii();
        let Some(name) = normalize(&asked) else {
            self.refusals
                .record("dns", Some(asked), None, "not a host name");
            resp.set_response_code(ResponseCode::NXDomain);
            return resp.to_vec().ok();
        };
        if !self.policy.allows_name(&name) {
            self.refusals
                .record("dns", Some(name), None, "not an allowed domain");
            resp.set_response_code(ResponseCode::NXDomain);
            return resp.to_vec().ok();
        }
        if q.query_type() != RecordType::A {
            // NOERROR with nothing: the name exists, but only its IPv4 addresses are handed out.
            return resp.to_vec().ok();
        }
        match self.upstream.ipv4_lookup(name.as_str()).await {
            Ok(lookup) => {
                let ttl = lookup
                    .as_lookup()
                    .records()
                    .iter()
                    .map(Record::ttl)
                    .min()
                    .unwrap_or(MAX_TTL)
                    .min(MAX_TTL);
                for a in lookup.iter() {
                    let ip = a.0;
                    if let Some(why) = refused_range(IpAddr::V4(ip)) {
                        self.refusals.record(
                            "dns",
                            Some(name.clone()),
                            Some(ip.to_string()),
                            format!("the answer is in {why}"),
                        );
                        continue;
                    }
                    if self.pins.pin(&name, ip) {
                        resp.add_answer(Record::from_rdata(q.name().clone(), ttl, RData::A(A(ip))));
                    }
                }
            }
            Err(e) if e.is_nx_domain() => {
                resp.set_response_code(ResponseCode::NXDomain);
            }
            Err(e) if e.is_no_records_found() => {}
            Err(_) => {
                resp.set_response_code(ResponseCode::ServFail);
            }
        }
        resp.to_vec().ok()
    }

    /// Answers queries on `sock` until the runtime stops.
    pub async fn serve_udp(self, sock: UdpSocket) {
        let sock = Arc::new(sock);
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                continue;
            };
            let query = buf[..n].to_vec();
            let (me, sock) = (self.clone(), sock.clone());
            tokio::spawn(async move {
                if let Some(answer) = me.answer(&query).await {
                    let _ = sock.send_to(&answer, from).await;
                }
            });
        }
    }

    /// Answers queries over TCP on `listener` until the runtime stops.
    pub async fn serve_tcp(self, listener: TcpListener) {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 2];
                    let read = tokio::time::timeout(TCP_IDLE, conn.read_exact(&mut len)).await;
                    if !matches!(read, Ok(Ok(_))) {
                        return;
                    }
                    let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if conn.read_exact(&mut query).await.is_err() {
                        return;
                    }
                    let Some(answer) = me.answer(&query).await else {
                        return;
                    };
                    let mut out = (answer.len() as u16).to_be_bytes().to_vec();
                    out.extend_from_slice(&answer);
                    if conn.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
}

#[cfg(test)]
#[path = "dns_tests.rs"]
mod tests;
