//! The egress proxy of a sandbox with a domain allowlist: every TCP connection the guest opens
//! (but to its gateway) is redirected here by the packet filter, and this decides. Port 443
//! passes only when the TLS ClientHello names an allowed domain and the connection goes to an
//! address the resolver handed out for that very name ([`crate::sni`]); port 80 passes request
//! by request when the Host header does the same ([`crate::http`]). That closes IP literals,
//! `/etc/hosts` entries, shared CDN addresses used under another name, and fronting where the
//! SNI or Host names the real target. Other ports, the refused ranges and the host's own
//! addresses never pass. Every refusal is reported with the VM's id.
//!
//! The listening socket lives in the VM's namespace; connections out are made from the uplink
//! namespace (the runtime's threads), as the host itself would make them.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::dns::Pins;
use crate::policy::{Policy, refused_range};
use crate::refusal::Refusals;
use crate::sni::{self, Hello};

/// Connections one sandbox may have through the proxy at once; more are refused.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a client may take to send its ClientHello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the destination may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the proxy knows.
#[derive(Clone)]
pub struct Proxy {
    pub(crate) policy: Arc<Policy>,
    pub(crate) pins: Pins,
    pub(crate) refusals: Refusals,
    /// The uplink's own addresses.
    pub(crate) host_addrs: Arc<HashSet<IpAddr>>,
    slots: Arc<Semaphore>,
}

/// The destination a redirected connection was meant for (`SO_ORIGINAL_DST`).
pub fn original_dst(conn: &TcpStream) -> io::Result<SocketAddrV4> {
    // SAFETY: sockaddr_in is plain data; getsockopt fills at most `len` bytes of it.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a valid socket, option buffer and length.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut sin as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    ))
}

/// Closes `conn` with a reset, so the guest's client fails at once.
fn reset(conn: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the size passed. With a zero timeout close
    // does not block: it sends a reset at once.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    drop(conn);
}

impl Proxy {
    /// A proxy for `policy`, trusting `pins`, reporting to `refusals`, never connecting to
    /// `host_addrs`.
    pub fn new(
        policy: Arc<Policy>,
        pins: Pins,
        refusals: Refusals,
        host_addrs: HashSet<IpAddr>,
    ) -> Self {
        Self {
            policy,
            pins,
            refusals,
            host_addrs: Arc::new(host_addrs),
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }

    /// Serves redirected connections from `listener` until the runtime stops.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let Ok(dst) = original_dst(&conn) else {
                    return;
                };
                let Ok(slot) = me.slots.clone().try_acquire_owned() else {
                    me.refusals.record(
                        "tcp",
                        None,
                        Some(dst.to_string()),
                        format!("more than {MAX_CONNECTIONS} connections at once"),
                    );
                    return reset(conn);
                };
                me.handle(conn, dst).await;
                drop(slot);
            });
        }
    }

    /// Why nothing may connect to `ip` whatever the name, if so.
    pub(crate) fn refused_address(&self, ip: IpAddr) -> Option<String> {
        if let Some(why) = refused_range(ip) {
            return Some(why.to_string());
        }
        self.host_addrs
            .contains(&ip)
            .then(|| "an address of the host itself".to_string())
    }

    /// Why `name` may not be reached at `ip`, if so.
    pub(crate) fn refused_name(&self, name: &str, ip: Ipv4Addr) -> Option<String> {
        if !self.policy.allows_name(name) {
            return Some("not an allowed domain".into());
        }
        if !self.pins.is_pinned(name, ip) {
            return Some(format!("{name} did not resolve to {ip} in this sandbox"));
        }
        None
    }

    async fn handle(&self, conn: TcpStream, dst: SocketAddrV4) {
        let refuse = |conn: TcpStream, name: Option<String>, why: String| {
            self.refusals
                .record("tcp", name, Some(dst.to_string()), why);
            reset(conn);
        };
        if let Some(why) = self.refused_address(IpAddr::V4(*dst.ip())) {
            return refuse(conn, None, why);
        }
        match dst.port() {
            443 => self.tls(conn, dst).await,
            80 => crate::http::serve(self.clone(), conn, dst).await,
            port => refuse(
                conn,
                None,
                format!("port {port}: only 80 and 443 pass, to allowed domains"),
            ),
        }
    }

    async fn tls(&self, mut conn: TcpStream, dst: SocketAddrV4) {
        let mut buf = Vec::with_capacity(4096);
        let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
            let mut chunk = [0u8; 4096];
            loop {
                match sni::parse(&buf) {
                    Hello::Incomplete if buf.len() < sni::MAX_HELLO + 5 * 8 => {}
                    other => return Some(other),
                }
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        let record = |name: Option<String>, why: String| {
            self.refusals
                .record("tcp", name, Some(dst.to_string()), why);
        };
        let name = match hello {
            Err(_) => {
                record(None, "no TLS ClientHello within 10 s".into());
                return reset(conn);
            }
            // The client went away.
            Ok(None) => return,
            Ok(Some(Hello::Parsed(Some(name)))) => name,
            Ok(Some(Hello::Parsed(None))) => {
                record(
                    None,
                    "TLS without a server name (SNI): an address alone is never enough".into(),
                );
                return reset(conn);
            }
            Ok(Some(Hello::NotTls(what))) => {
                record(None, format!("port 443 without TLS ({what})"));
                return reset(conn);
            }
            Ok(Some(Hello::Incomplete)) => {
                record(None, "a ClientHello longer than 64 KiB".into());
                return reset(conn);
            }
        };
        if let Some(why) = self.refused_name(&name, *dst.ip()) {
            record(Some(name), why);
            return reset(conn);
        }
        let Some(mut upstream) = connect(SocketAddr::V4(dst)).await else {
            return reset(conn);
        };
        if tokio::io::AsyncWriteExt::write_all(&mut upstream, &buf)
            .await
            .is_err()
        {
            return reset(conn);
        }
        let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
    }
}

/// Connects to `dst` from the uplink namespace, within [`CONNECT_TIMEOUT`].
pub(crate) async fn connect(dst: SocketAddr) -> Option<TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::DomainPattern;

    fn proxy(patterns: &[&str]) -> (Proxy, Pins, Refusals) {
        let policy = Policy {
            domains: patterns
                .iter()
                .map(|p| p.parse::<DomainPattern>().unwrap())
                .collect(),
            allow_net: false,
        };
        let (pins, refusals) = (Pins::default(), Refusals::new("vm-p", None));
        let host = HashSet::from([IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))]);
        (
            Proxy::new(Arc::new(policy), pins.clone(), refusals.clone(), host),
            pins,
            refusals,
        )
    }

    #[test]
    fn names_pass_only_to_their_own_pinned_addresses() {
        let (p, pins, _) = proxy(&["allowed.test", "other.test"]);
        let a = Ipv4Addr::new(203, 0, 113, 10);
        let b = Ipv4Addr::new(203, 0, 113, 30);
        pins.pin("allowed.test", a);
        pins.pin("other.test", b);
        assert_eq!(p.refused_name("allowed.test", a), None);
        assert_eq!(p.refused_name("Allowed.Test.", a), None);
        assert_eq!(
            p.refused_name("allowed.test", b).as_deref(),
            Some("allowed.test did not resolve to 203.0.113.30 in this sandbox"),
            "another allowed name's address (a shared CDN)"
        );
        assert_eq!(
            p.refused_name("blocked.test", a).as_deref(),
            Some("not an allowed domain")
        );
        assert_eq!(
            p.refused_name("203.0.113.10", a).as_deref(),
            Some("not an allowed domain"),
            "an IP literal as the name"
        );
    }

    #[test]
    fn private_metadata_and_host_addresses_never_pass() {
        let (p, _, _) = proxy(&["allowed.test"]);
        let r = |ip: &str| p.refused_address(ip.parse().unwrap());
        assert_eq!(
            r("169.254.169.254").as_deref(),
            Some("the cloud metadata address 169.254.169.254")
        );
        assert!(r("10.1.1.1").is_some());
        assert!(r("127.0.0.1").is_some());
        assert_eq!(
            r("203.0.113.1").as_deref(),
            Some("an address of the host itself")
        );
        assert_eq!(r("203.0.113.10"), None);
    }
}
