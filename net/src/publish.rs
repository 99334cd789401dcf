//! Published ports (`--publish [HOSTPORT:]GUESTPORT`): a listener on 127.0.0.1 only (never on
//! another address: a published sandbox port is for this host's user), each connection carried to
//! the guest port. With a network interface it goes over the guest's link, from inside the VM's
//! namespace; without one, over vsock through the guest agent's forwarding port. Either way no
//! egress needs to be allowed, and the listeners close with the sandbox.

use std::net::{
    Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener as StdListener, TcpStream as StdStream,
};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::runtime::{Handle, Runtime};

use crate::addr::GUEST_IP;
use crate::netns::NetNs;

/// How long reaching the guest port may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One `--publish` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishSpec {
    /// The port on 127.0.0.1; `None` lets the host pick a free one.
    pub host_port: Option<u16>,
    /// The port in the guest.
    pub guest_port: u16,
}

/// Why a port could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Not `[HOSTPORT:]GUESTPORT`.
    #[error("--publish {0:?} is not [HOSTPORT:]GUESTPORT with ports from 1 to 65535")]
    Syntax(String),
    /// Two specs publish the same host port.
    #[error("--publish: host port {0} is given twice")]
    Twice(u16),
    /// The listener could not be made.
    #[error("--publish {spec}: cannot listen on {addr}: {err}")]
    Listen {
        /// The spec as given.
        spec: String,
        /// The address.
        addr: SocketAddrV4,
        /// Why.
        err: std::io::Error,
    },
}

impl FromStr for PublishSpec {
    type Err = PublishError;

    fn from_str(s: &str) -> Result<Self, PublishError> {
        let bad = || PublishError::Syntax(s.into());
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
        Ok(match s.split_once(':') {
            Some((h, g)) => PublishSpec {
                host_port: Some(port(h)?),
                guest_port: port(g)?,
            },
            None => PublishSpec {
                host_port: None,
                guest_port: port(s)?,
            },
        })
    }
}

impl std::fmt::Display for PublishSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host_port {
            Some(h) => write!(f, "{h}:{}", self.guest_port),
            None => write!(f, "{}", self.guest_port),
        }
    }
}

/// How connections reach the guest.
#[derive(Debug, Clone)]
pub enum Target {
    /// Over the guest's network interface, from inside its namespace.
    Nic(Arc<NetNs>),
    /// Over vsock, through the guest agent's forwarding port behind the VMM's vsock socket.
    Vsock(PathBuf),
}

/// A published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Published {
    /// Where the host reaches it.
    pub host: SocketAddrV4,
    /// The guest port behind it.
    pub guest_port: u16,
}

/// Published ports and, when they have one of their own, the runtime serving them; dropping it
/// closes the listeners.
pub struct Publisher {
    runtime: Option<Runtime>,
    ports: Vec<Published>,
}

impl Publisher {
    /// Publishes `specs` to `target`, served on `on` (a sandbox's runtime, which then owns the
    /// listeners) or, without one, on a small runtime of the publisher's own.
    pub fn start(
        specs: &[PublishSpec],
        target: Target,
        on: Option<&Handle>,
    ) -> Result<Publisher, PublishError> {
        let runtime = match on {
            Some(_) => None,
            None => Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("kiln-publish")
                    .enable_all()
                    .build()
                    .map_err(|err| PublishError::Listen {
                        spec: "(runtime)".into(),
                        addr: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
                        err,
                    })?,
            ),
        };
        let handle = match (&runtime, on) {
            (Some(rt), _) => rt.handle().clone(),
            (None, Some(h)) => h.clone(),
            (None, None) => unreachable!("a runtime was made above"),
        };
        let ports = start(&handle, specs, target)?;
        Ok(Publisher { runtime, ports })
    }

    /// The ports, in the order of the specs.
    pub fn ports(&self) -> &[Published] {
        &self.ports
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Binds a listener on 127.0.0.1 for each spec (failing on the first that cannot be had), then
/// serves them on `rt` until it stops.
pub fn start(
    rt: &Handle,
    specs: &[PublishSpec],
    target: Target,
) -> Result<Vec<Published>, PublishError> {
    let mut bound = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        if let Some(h) = spec.host_port
            && specs[..i].iter().any(|o| o.host_port == Some(h))
        {
            return Err(PublishError::Twice(h));
        }
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, spec.host_port.unwrap_or(0));
        let listen_err = |err| PublishError::Listen {
            spec: spec.to_string(),
            addr,
            err,
        };
        let l = StdListener::bind(addr).map_err(listen_err)?;
        l.set_nonblocking(true).map_err(listen_err)?;
        let host = match l.local_addr().map_err(listen_err)? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound to an IPv4 address"),
        };
        bound.push((
            l,
            Published {
                host,
                guest_port: spec.guest_port,
            },
        ));
    }
    let mut out = Vec::new();
    for (l, p) in bound {
        let _guard = rt.enter();
        let l = TcpListener::from_std(l).map_err(|err| PublishError::Listen {
            spec: p.guest_port.to_string(),
            addr: p.host,
            err,
        })?;
        rt.spawn(serve(l, p.guest_port, target.clone()));
        out.push(p);
    }
    Ok(out)
}

async fn serve(listener: TcpListener, guest_port: u16, target: Target) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let target = target.clone();
        tokio::spawn(async move {
            let _ = conn.set_nodelay(true);
            match target {
                Target::Nic(ns) => {
                    let dst = SocketAddr::from((GUEST_IP, guest_port));
                    let made = tokio::task::spawn_blocking(move || {
                        ns.run(|| StdStream::connect_timeout(&dst, CONNECT_TIMEOUT))
                            .ok()?
                            .ok()
                    })
                    .await;
                    let Some(Ok(mut guest)) = made.ok().flatten().map(|s| {
                        s.set_nonblocking(true)?;
                        TcpStream::from_std(s)
                    }) else {
                        return;
                    };
                    let _ = guest.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut guest).await;
                }
                Target::Vsock(uds) => {
                    let made = tokio::task::spawn_blocking(move || {
                        kiln_agent::client::forward(&uds, guest_port, CONNECT_TIMEOUT).ok()
                    })
                    .await;
                    let Some(Ok(mut guest)) = made.ok().flatten().map(|s| {
                        s.set_nonblocking(true)?;
                        UnixStream::from_std(s)
                    }) else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut guest).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_mistakes_are_named() {
        assert_eq!(
            "8080".parse::<PublishSpec>().unwrap(),
            PublishSpec {
                host_port: None,
                guest_port: 8080
            }
        );
        assert_eq!(
            "18080:8080".parse::<PublishSpec>().unwrap(),
            PublishSpec {
                host_port: Some(18080),
                guest_port: 8080
            }
        );
        for bad in ["", "0", "8080:", ":8080", "70000", "a:b", "1:2:3", "0:80"] {
            assert_eq!(
                bad.parse::<PublishSpec>().unwrap_err().to_string(),
                format!("--publish {bad:?} is not [HOSTPORT:]GUESTPORT with ports from 1 to 65535")
            );
        }
    }

    #[test]
    fn listeners_are_on_loopback_and_taken_ports_are_named() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let specs = ["8080".parse().unwrap(), "9090".parse().unwrap()];
        let got = start(rt.handle(), &specs, Target::Vsock("/nonexistent".into())).unwrap();
        assert_eq!(got.len(), 2);
        assert!(
            got.iter()
                .all(|p| *p.host.ip() == Ipv4Addr::LOCALHOST && p.host.port() != 0)
        );
        assert_eq!(got[1].guest_port, 9090);
        let taken = format!("{}:80", got[0].host.port()).parse().unwrap();
        let e = start(rt.handle(), &[taken], Target::Vsock("/x".into())).unwrap_err();
        assert!(e.to_string().contains("cannot listen on 127.0.0.1:"), "{e}");
        let twice = ["5000:1".parse().unwrap(), "5000:2".parse().unwrap()];
        assert_eq!(
            start(rt.handle(), &twice, Target::Vsock("/x".into()))
                .unwrap_err()
                .to_string(),
            "--publish: host port 5000 is given twice"
        );
        // A connection whose guest side cannot be reached is closed, not left hanging.
        use std::io::Read;
        let mut c = std::net::TcpStream::connect(got[0].host).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).unwrap(), 0);
    }
}
