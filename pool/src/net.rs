//! A VM's network in kilnd, from `kiln-net`: the sandbox network (a namespace of its own with the
//! TAP kiln-vmm attaches as `eth0`, the packet filter, the resolver and the egress proxy) that
//! every template VM and sandbox gets, and the guest ports published on the host's 127.0.0.1.
//!
//! A [`VmNet`] belongs to one VMM process ([`crate::vm::VmProcess`] holds it) and goes with it:
//! killing the VM, a failed create or restore, and the end of the daemon drop it, and with it the
//! services and the listeners; the namespace (with its TAP and rules) goes when the last of its
//! holders, this value and the VMM inside, does. A daemon killed while its VMs run on leaves
//! their namespaces held by the VMMs alone; the next one takes each over ([`VmNet::adopt`]).
//!
//! Published ports reach the guest over vsock through the agent's forwarding port, not over the
//! network interface: they work whatever the policy, for servers listening on the guest's
//! loopback too, and with no interface at all.

use std::os::fd::AsRawFd;
use std::path::Path;

use kiln_net::addr::{GUEST_IP, IFACE_ID, TAP_NAME};
use kiln_net::dns::Upstream;
use kiln_net::{Policy, PublishSpec, Publisher, Refusal, Sandbox, SandboxConfig, Target};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::types::{NetPolicy, NetworkInfo, PortRequest, PublishedPort};

/// Why a VM's network could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The sandbox network could not be made or adopted.
    #[error("the network of {vm}: {err}")]
    Sandbox {
        /// The VM (a sandbox's id, or a template build's VM).
        vm: String,
        /// Why.
        err: kiln_net::SandboxError,
    },
    /// A port could not be published (`HOST:GUEST: why`).
    #[error("network.publish {0}")]
    Publish(String),
}

impl From<kiln_net::publish::PublishError> for NetError {
    fn from(e: kiln_net::publish::PublishError) -> Self {
        // kiln-net names its errors after `kiln run`'s flag; kilnd's callers know the field.
        let text = e.to_string();
        let bare = text
            .strip_prefix("--publish: ")
            .or_else(|| text.strip_prefix("--publish "))
            .unwrap_or(&text);
        NetError::Publish(bare.to_string())
    }
}

/// What kilnd keeps of a sandbox's network in its record, so that resume, a fork and a
/// restarted kilnd give it the same one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRecord {
    /// Its VM has a network interface (its template was built with one).
    #[serde(default)]
    pub nic: bool,
    /// What it may reach.
    #[serde(default)]
    pub policy: NetPolicy,
    /// The ports it asked to publish.
    #[serde(default)]
    pub publish: Vec<PortRequest>,
    /// The host ports they last had (tried first when they are opened again).
    #[serde(default)]
    pub ports: Vec<PublishedPort>,
}

/// What was refused, without the VM's id: `PROTO NAME at DEST: REASON`.
fn refusal_text(r: &Refusal) -> String {
    let what = match (&r.name, &r.dest) {
        (Some(n), Some(d)) => format!("{n} at {d}"),
        (Some(n), None) => n.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => "-".into(),
    };
    format!("{} {what}: {}", r.proto, r.reason)
}

/// Each refusal goes to kilnd's log with the VM's id.
fn log_refusal(r: &Refusal) {
    tracing::info!(sandbox = %r.vm, "network refused {}", refusal_text(r));
}

fn config(vm_id: &str, policy: Policy) -> SandboxConfig {
    SandboxConfig {
        vm_id: vm_id.into(),
        policy,
        upstream: Upstream::System,
        uplink: None,
        on_refusal: Some(Box::new(log_refusal)),
    }
}

/// A VM's network: its sandbox network when it has an interface, and its published ports.
#[derive(Default)]
pub struct VmNet {
    sandbox: Option<Sandbox>,
    publisher: Option<Publisher>,
    published: Vec<PublishedPort>,
}

impl VmNet {
    /// No network interface (a template built without one), and nothing published yet.
    pub fn none() -> VmNet {
        VmNet::default()
    }

    fn on(sandbox: Sandbox) -> VmNet {
        VmNet {
            sandbox: Some(sandbox),
            publisher: None,
            published: Vec::new(),
        }
    }

    /// A new sandbox network for VM `vm_id` (its refusals logged under that id) with `policy`.
    pub fn create(vm_id: &str, policy: Policy) -> Result<VmNet, NetError> {
        let sandbox = Sandbox::create(config(vm_id, policy)).map_err(|err| NetError::Sandbox {
            vm: vm_id.into(),
            err,
        })?;
        Ok(VmNet::on(sandbox))
    }

    /// The network of VM `vm_id`, whose VMM `pid` runs on in the namespace a killed kilnd made
    /// for it with `policy`: its services are started again there (see
    /// [`kiln_net::Sandbox::adopt`]).
    pub fn adopt(vm_id: &str, pid: u32, policy: Policy) -> Result<VmNet, NetError> {
        let err = |err| NetError::Sandbox {
            vm: vm_id.into(),
            err,
        };
        let ns = kiln_net::netns::NetNs::of_process(pid).map_err(|e| err(e.into()))?;
        let sandbox = Sandbox::adopt(ns, config(vm_id, policy)).map_err(err)?;
        Ok(VmNet::on(sandbox))
    }

    /// Whether the VM has a network interface.
    pub fn has_nic(&self) -> bool {
        self.sandbox.is_some()
    }

    /// The namespace the VMM must run in: a path the jailer can open (`--netns`) while kilnd
    /// holds it, and the descriptor itself (for an unjailed VMM, which enters it before exec).
    pub fn netns(&self) -> Option<(String, std::os::fd::RawFd)> {
        let fd = self.sandbox.as_ref()?.netns().as_raw_fd();
        Some((format!("/proc/{}/fd/{fd}", std::process::id()), fd))
    }

    /// Gives the TAP to a jailed VMM's uid (and gid), before it attaches.
    pub fn give_tap(&self, uid: u32) -> Result<(), NetError> {
        match &self.sandbox {
            Some(s) => s.set_tap_owner(uid, uid).map_err(|err| NetError::Sandbox {
                vm: format!("uid {uid}'s VM"),
                err,
            }),
            None => Ok(()),
        }
    }

    /// `PUT /network-interfaces/eth0` for a VM booted with the interface.
    pub fn interface(&self) -> Option<Value> {
        self.sandbox.as_ref()?;
        Some(json!({"iface_id": IFACE_ID, "host_dev_name": TAP_NAME,
                    "guest_mac": kiln_net::addr::mac_string(&kiln_net::addr::GUEST_MAC)}))
    }

    /// The kernel command-line word that has the agent set eth0 up at boot.
    pub fn cmdline_word(&self) -> Option<String> {
        self.sandbox
            .as_ref()
            .map(|s| s.guest_net_spec().to_cmdline())
    }

    /// The `network_overrides` of a restore: the snapshot's interface on this network's TAP.
    pub fn overrides(&self) -> Option<Value> {
        self.sandbox.as_ref()?;
        Some(json!([{"iface_id": IFACE_ID, "host_dev_name": TAP_NAME}]))
    }

    /// Publishes `ports` to the guest behind the VMM's vsock socket `vsock`, on the host ports
    /// of `prefer` where they are free (what the sandbox had before a pause or a restart), else
    /// as asked.
    pub fn publish(
        &mut self,
        ports: &[PortRequest],
        prefer: &[PublishedPort],
        vsock: &Path,
    ) -> Result<(), NetError> {
        self.publisher = None;
        self.published.clear();
        if ports.is_empty() {
            return Ok(());
        }
        let asked: Vec<PublishSpec> = ports
            .iter()
            .map(|p| PublishSpec {
                host_port: p.host_port,
                guest_port: p.guest_port,
            })
            .collect();
        let again: Vec<PublishSpec> = asked
            .iter()
            .zip(prefer.iter().map(Some).chain(std::iter::repeat(None)))
            .map(|(a, had)| match had {
                Some(had) if had.guest_port == a.guest_port => PublishSpec {
                    host_port: Some(had.host_port),
                    ..*a
                },
                _ => *a,
            })
            .collect();
        let on = self.sandbox.as_ref().map(Sandbox::runtime);
        let target = || Target::Vsock(vsock.to_path_buf());
        let publisher = match Publisher::start(&again, target(), on) {
            Ok(p) => p,
            Err(_) if again != asked => Publisher::start(&asked, target(), on)?,
            Err(e) => return Err(e.into()),
        };
        self.published = publisher
            .ports()
            .iter()
            .map(|p| PublishedPort {
                host_port: p.host.port(),
                guest_port: p.guest_port,
            })
            .collect();
        self.publisher = Some(publisher);
        Ok(())
    }

    /// The ports published now.
    pub fn published(&self) -> &[PublishedPort] {
        &self.published
    }

    /// The first `n` refusals, `; `-separated (and how many more), if there were any.
    pub fn refusal_summary(&self, n: usize) -> Option<String> {
        let (kept, total) = self.sandbox.as_ref()?.refusals();
        if total == 0 {
            return None;
        }
        let mut text: Vec<String> = kept.iter().take(n).map(refusal_text).collect();
        if total > text.len() as u64 {
            text.push(format!("and {} more", total - text.len() as u64));
        }
        Some(text.join("; "))
    }

    /// How many connections and lookups were refused.
    pub fn refused(&self) -> u64 {
        self.sandbox.as_ref().map_or(0, |s| s.refusals().1)
    }
}

impl Drop for VmNet {
    fn drop(&mut self) {
        // Listeners first: they may ride on the sandbox network's runtime.
        self.publisher.take();
        self.sandbox.take();
    }
}

/// The network part of a sandbox's info: `record`'s policy, and what `vm` (while it runs) has.
pub fn info(record: &NetRecord, vm: Option<&VmNet>) -> NetworkInfo {
    NetworkInfo {
        allow_domains: record.policy.allow_domains.clone(),
        allow_net: record.policy.allow_net,
        address: record.nic.then(|| GUEST_IP.to_string()),
        published: vm.map_or_else(Vec::new, |v| v.published().to_vec()),
        refused: vm.map_or(0, VmNet::refused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(guest_port: u16, host_port: Option<u16>) -> PortRequest {
        PortRequest {
            guest_port,
            host_port,
        }
    }

    #[test]
    fn ports_open_where_they_were_or_as_asked_when_those_are_taken() {
        let mut net = VmNet::none();
        let vsock = Path::new("/nonexistent/vsock.sock");
        net.publish(&[port(8080, None), port(9090, None)], &[], vsock)
            .unwrap();
        let first = net.published().to_vec();
        assert_eq!(first.len(), 2);
        assert_eq!((first[0].guest_port, first[1].guest_port), (8080, 9090));
        // Opened again (a resume) on the same host ports, once these are free.
        drop(net);
        let mut net = VmNet::none();
        net.publish(&[port(8080, None), port(9090, None)], &first, vsock)
            .unwrap();
        assert_eq!(net.published(), first.as_slice());
        // Taken by someone else meanwhile: a free port instead, for a port not asked for by
        // number.
        let mut other = VmNet::none();
        other
            .publish(&[port(8080, None), port(9090, None)], &first, vsock)
            .unwrap();
        assert_eq!(other.published().len(), 2);
        assert_ne!(other.published(), first.as_slice());
        // A port asked for by number that is taken is an error naming it.
        let taken = first[0].host_port;
        let e = VmNet::none()
            .publish(&[port(1, Some(taken))], &[], vsock)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!(
                "network.publish {taken}:1: cannot listen on 127.0.0.1:{taken}: "
            )),
            "{e}"
        );
        let i = info(
            &NetRecord {
                nic: false,
                policy: NetPolicy::default(),
                publish: vec![],
                ports: vec![],
            },
            Some(&net),
        );
        assert_eq!((i.address, i.published.len(), i.refused), (None, 2, 0));
    }
}
