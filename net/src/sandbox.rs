//! One VM's network, put together in order: a namespace, loopback and the TAP with the gateway
//! address, the uplink veth for `--allow-net`, the packet filter, then the services on a runtime
//! of their own (the resolver, the proxy for a domain allowlist), and the NFLOG reader. kiln-vmm
//! is then started inside the namespace ([`Sandbox::netns`]) with `--net` for the TAP.
//!
//! A sandbox whose services died with their process (its VM running on in the namespace) is
//! taken over with [`Sandbox::adopt`], which starts the services again in that namespace.
//!
//! Nothing created here outlives the sandbox and its VM: the namespace is held only by this value,
//! the VMM and the sockets made in it, and its TAP, veth and rules go with it. Dropping the
//! sandbox stops the services; if the process is killed instead, the kernel closes the sockets
//! and the namespace goes when the VMM does.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;

use kiln_agent::protocol::NetSpec;
use tokio::runtime::Runtime;

use crate::addr::{DNS_PORT, GATEWAY_IP, PREFIX, PROXY_PORT, TAP_MAC, TAP_NAME};
use crate::dns::{DnsError, Pins, Resolver, Upstream};
use crate::link::{self, LinkError};
use crate::netns::{NetNs, NetNsError};
use crate::nflog::{NflogError, NflogReader};
use crate::nft::{self, Egress, NftError};
use crate::policy::Policy;
use crate::proxy::Proxy;
use crate::refusal::{Refusal, Refusals};
use crate::uplink::{self, UplinkError, Veth};

/// Why a sandbox could not be made; each names the step.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A namespace could not be made or entered.
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    /// A link could not be set up.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The packet filter could not be loaded.
    #[error(transparent)]
    Nft(#[from] NftError),
    /// The uplink could not be set up.
    #[error(transparent)]
    Uplink(#[from] UplinkError),
    /// The resolver could not be set up.
    #[error(transparent)]
    Dns(#[from] DnsError),
    /// The NFLOG reader could not start.
    #[error(transparent)]
    Nflog(#[from] NflogError),
    /// A service socket could not be made.
    #[error("cannot listen on {addr} for the {what}: {err}")]
    Listen {
        /// The service.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        err: std::io::Error,
    },
    /// The services' runtime could not start.
    #[error("cannot start the network services: {0}")]
    Runtime(std::io::Error),
    /// A namespace to adopt does not hold what the sandbox had.
    #[error("cannot adopt the network of vm {vm}: {what}")]
    Adopt {
        /// The VM.
        vm: String,
        /// What is missing or different.
        what: String,
    },
}

/// What a sandbox is for.
pub struct SandboxConfig {
    /// The VM's id, in every refusal report.
    pub vm_id: String,
    /// What the guest may reach.
    pub policy: Policy,
    /// Where the resolver asks.
    pub upstream: Upstream,
    /// Where connections out are made; `None` is this process's namespace (the host's).
    pub uplink: Option<NetNs>,
    /// Told of each refusal as it happens.
    pub on_refusal: Option<OnRefusal>,
}

/// A callback told of each refusal.
pub type OnRefusal = Box<dyn Fn(&Refusal) + Send + Sync>;

/// A VM's network, ready for its VMM.
pub struct Sandbox {
    ns: Arc<NetNs>,
    runtime: Option<Runtime>,
    nflog: Option<NflogReader>,
    refusals: Refusals,
    veth: Option<Veth>,
}

/// What egress `policy` needs from the packet filter.
fn egress_of(policy: &Policy) -> Egress {
    if policy.allow_net {
        Egress::Routed
    } else {
        Egress::Proxied
    }
}

/// The addresses of the uplink's interfaces (the host's own: no sandbox may reach them).
fn host_addresses(uplink: &NetNs) -> Result<HashSet<IpAddr>, SandboxError> {
    uplink.run(local_addresses)?.map_err(|e| {
        SandboxError::Runtime(std::io::Error::new(
            e.kind(),
            format!("listing the host's addresses: {e}"),
        ))
    })
}

/// The addresses of the calling thread's namespace's interfaces.
pub fn local_addresses() -> std::io::Result<HashSet<IpAddr>> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = HashSet::new();
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says which struct it is.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.insert(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ));
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.insert(IpAddr::from(sin6.sin6_addr.s6_addr));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}

impl Sandbox {
    /// Builds the sandbox `cfg` describes.
    pub fn create(cfg: SandboxConfig) -> Result<Sandbox, SandboxError> {
        let ns = Arc::new(NetNs::new()?);
        let uplink = match cfg.uplink.as_ref() {
            Some(u) => u.try_clone()?,
            None => NetNs::current()?,
        };
        let host_addrs = host_addresses(&uplink)?;

        ns.run(|| -> Result<(), LinkError> {
            link::up("lo")?;
            link::create_tap(TAP_NAME, TAP_MAC)?;
            link::set_address(TAP_NAME, GATEWAY_IP, PREFIX)?;
            link::up(TAP_NAME)?;
            // No IPv6 on the guest's link (where the kernel has IPv6 at all).
            let _ = link::sysctl("net/ipv6/conf/all/disable_ipv6", "1");
            let _ = link::sysctl(&format!("net/ipv6/conf/{TAP_NAME}/disable_ipv6"), "1");
            // What the guest sends elsewhere reaches the forward chain, to be logged and refused.
            link::sysctl("net/ipv4/ip_forward", "1")
        })??;

        let egress = egress_of(&cfg.policy);
        let veth = match egress {
            Egress::Routed => Some(uplink::attach(&ns, &uplink)?),
            Egress::Proxied => {
                // No way out: the default route leads back into the forward chain's refusal.
                ns.run(|| link::default_route_dev(TAP_NAME))??;
                None
            }
        };
        let host_v4: Vec<_> = host_addrs
            .iter()
            .filter_map(|a| match a {
                IpAddr::V4(v4) if !v4.is_loopback() => Some(*v4),
                _ => None,
            })
            .collect();
        ns.run(|| nft::apply("sandbox", &nft::vm_ruleset(egress, &host_v4)))??;
        Sandbox::start(ns, cfg, uplink, host_addrs, veth)
    }

    /// Takes over the namespace `ns` of a sandbox whose services died with the process that
    /// made them (a daemon killed while its VM ran on): its TAP, rules and uplink are still
    /// there, held by the VMM inside, so only the services are started again, for the same
    /// `cfg.policy`. A namespace that does not hold what a sandbox with that policy has (the TAP,
    /// the table, the uplink veth exactly when the policy allows the net) is refused by name.
    /// The resolver's pins start empty: the guest resolves again before it connects.
    pub fn adopt(ns: NetNs, cfg: SandboxConfig) -> Result<Sandbox, SandboxError> {
        let ns = Arc::new(ns);
        let uplink = match cfg.uplink.as_ref() {
            Some(u) => u.try_clone()?,
            None => NetNs::current()?,
        };
        let host_addrs = host_addresses(&uplink)?;
        let missing = |what: String| SandboxError::Adopt {
            vm: cfg.vm_id.clone(),
            what,
        };
        if !ns.run(|| link::exists(TAP_NAME))? {
            return Err(missing(format!("its namespace has no TAP {TAP_NAME}")));
        }
        if !ns.run(|| nft::table_exists("inet", nft::VM_TABLE))?? {
            return Err(missing(format!(
                "its namespace has no nftables table {}",
                nft::VM_TABLE
            )));
        }
        let veth = uplink::existing(&ns)?;
        match (egress_of(&cfg.policy), &veth) {
            (Egress::Routed, None) => {
                return Err(missing(
                    "its policy allows the net but its namespace has no uplink".into(),
                ));
            }
            (Egress::Proxied, Some(v)) => {
                return Err(missing(format!(
                    "its policy allows no routed egress but its namespace has uplink {}",
                    v.outside
                )));
            }
            _ => {}
        }
        Sandbox::start(ns, cfg, uplink, host_addrs, veth)
    }

    /// Starts the services of the sandbox in `ns`: the resolver, the proxy (for a domain
    /// allowlist) and the NFLOG reader.
    fn start(
        ns: Arc<NetNs>,
        cfg: SandboxConfig,
        uplink: NetNs,
        host_addrs: HashSet<IpAddr>,
        veth: Option<Veth>,
    ) -> Result<Sandbox, SandboxError> {
        let refusals = Refusals::new(&cfg.vm_id, cfg.on_refusal);
        let egress = egress_of(&cfg.policy);
        // The services' sockets are made inside the namespace; their connections out are made
        // by the runtime's threads, which live in the uplink namespace.
        let dns_addr = SocketAddr::from((GATEWAY_IP, DNS_PORT));
        let proxy_addr = SocketAddr::from((GATEWAY_IP, PROXY_PORT));
        let listen = |what, addr| move |err| SandboxError::Listen { what, addr, err };
        let (udp, tcp, proxy_listener) = ns.run(|| -> Result<_, SandboxError> {
            let udp = UdpSocket::bind(dns_addr).map_err(listen("resolver", dns_addr))?;
            let tcp = TcpListener::bind(dns_addr).map_err(listen("resolver", dns_addr))?;
            let proxy = match egress {
                Egress::Proxied => {
                    Some(TcpListener::bind(proxy_addr).map_err(listen("proxy", proxy_addr))?)
                }
                Egress::Routed => None,
            };
            for fd in [&udp as &dyn std::os::fd::AsRawFd, &tcp] {
                set_nonblocking(fd.as_raw_fd()).map_err(listen("resolver", dns_addr))?;
            }
            if let Some(p) = &proxy {
                p.set_nonblocking(true)
                    .map_err(listen("proxy", proxy_addr))?;
            }
            Ok((udp, tcp, proxy))
        })??;

        let uplink_for_threads = Arc::new(uplink);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kiln-net")
            .enable_all()
            .on_thread_start(move || {
                // Outbound connections and upstream DNS go where the host's would.
                if let Err(e) = uplink_for_threads.enter() {
                    eprintln!(
                        "kiln-net: a service thread could not enter the uplink namespace: {e}"
                    );
                }
            })
            .build()
            .map_err(SandboxError::Runtime)?;
        let policy = Arc::new(cfg.policy);
        let pins = Pins::default();
        let resolver = {
            let _g = runtime.enter();
            Resolver::new(
                policy.clone(),
                &cfg.upstream,
                pins.clone(),
                refusals.clone(),
            )?
        };
        {
            let _g = runtime.enter();
            let udp = tokio::net::UdpSocket::from_std(udp).map_err(listen("resolver", dns_addr))?;
            let tcp =
                tokio::net::TcpListener::from_std(tcp).map_err(listen("resolver", dns_addr))?;
            runtime.spawn(resolver.clone().serve_udp(udp));
            runtime.spawn(resolver.serve_tcp(tcp));
            if let Some(l) = proxy_listener {
                let l =
                    tokio::net::TcpListener::from_std(l).map_err(listen("proxy", proxy_addr))?;
                runtime.spawn(Proxy::new(policy, pins, refusals.clone(), host_addrs).serve(l));
            }
        }
        let nflog = NflogReader::start(&ns, refusals.clone())?;
        Ok(Sandbox {
            ns,
            runtime: Some(runtime),
            nflog: Some(nflog),
            refusals,
            veth,
        })
    }

    /// Gives the sandbox's TAP to `uid`:`gid`, the VMM's under a jailer (without CAP_NET_ADMIN):
    /// then no other unprivileged uid may attach it. Call it before that VMM attaches.
    pub fn set_tap_owner(&self, uid: u32, gid: u32) -> Result<(), SandboxError> {
        Ok(self.ns.run(|| link::set_tap_owner(TAP_NAME, uid, gid))??)
    }

    /// The VM's namespace: start kiln-vmm in it (`setns` between fork and exec).
    pub fn netns(&self) -> &Arc<NetNs> {
        &self.ns
    }

    /// The runtime the services run on (published ports can share it).
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        self.runtime
            .as_ref()
            .map(Runtime::handle)
            .expect("the runtime lives as long as the sandbox")
    }

    /// The guest's eth0 settings.
    pub fn guest_net_spec(&self) -> NetSpec {
        crate::addr::guest_net_spec()
    }

    /// The refusals so far (the first [`crate::refusal::KEPT`]) and how many there were.
    pub fn refusals(&self) -> (Vec<Refusal>, u64) {
        self.refusals.list()
    }

    /// The uplink veth, with `--allow-net`.
    pub fn veth(&self) -> Option<&Veth> {
        self.veth.as_ref()
    }
}

fn set_nonblocking(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: FIONBIO reads one int from the valid pointer.
    if unsafe { libc::ioctl(fd, libc::FIONBIO, &on) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.nflog.take();
        if let Some(rt) = self.runtime.take() {
            // Every task is dropped, closing its sockets, before this returns (a connection to
            // the guest being made on a blocking thread is given a second).
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
        }
    }
}
