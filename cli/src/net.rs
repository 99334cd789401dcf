//! A `kiln run`'s network, from `kiln-net`: the sandbox (namespace, TAP, rules, resolver, proxy)
//! made before the VMM starts inside it, the published ports opened once the VMM's vsock socket
//! is known, what kiln-vmm and the guest agent must be told, and the report for `--json`.
//! Refusals are printed on stderr as they happen. Everything goes when this is dropped (or, if
//! kiln is killed, with its process and its VMM).

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use kiln_agent::protocol::NetSpec;
use kiln_api::requests::snapshot::NetworkOverride;
use kiln_net::addr::{GUEST_IP, IFACE_ID, TAP_NAME};
use kiln_net::dns::Upstream;
use kiln_net::{Policy, Publisher, Sandbox, SandboxConfig, Target};

use crate::args::NetArgs;

/// The network of one VM.
pub struct Network {
    sandbox: Option<Sandbox>,
    publisher: Option<Publisher>,
}

impl Network {
    /// Makes the sandbox `args` asks for (none without `--net` and its kin).
    pub fn create(args: &NetArgs, vm_id: &str) -> Result<Network, String> {
        let sandbox = match args.nic {
            false => None,
            true => Some(
                Sandbox::create(SandboxConfig {
                    vm_id: vm_id.to_string(),
                    policy: Policy {
                        domains: args.domains.clone(),
                        allow_net: args.allow_net,
                    },
                    upstream: Upstream::System,
                    uplink: None,
                    on_refusal: Some(Box::new(|r| eprintln!("kiln: net: {r}"))),
                })
                .map_err(|e| format!("network sandbox: {e}"))?,
            ),
        };
        Ok(Network {
            sandbox,
            publisher: None,
        })
    }

    /// The namespace kiln-vmm must enter, when there is a network interface.
    pub fn netns_fd(&self) -> Option<RawFd> {
        self.sandbox.as_ref().map(|s| s.netns().as_raw_fd())
    }

    /// kiln-vmm's `--net` argument and the kernel command-line word for the guest agent.
    pub fn boot_args(&self) -> Option<(String, String)> {
        let s = self.sandbox.as_ref()?;
        Some((
            kiln_net::addr::vmm_net_arg(),
            s.guest_net_spec().to_cmdline(),
        ))
    }

    /// eth0's settings, for the `restored` step of a clone.
    pub fn guest_net_spec(&self) -> Option<NetSpec> {
        self.sandbox.as_ref().map(Sandbox::guest_net_spec)
    }

    /// The `network_overrides` of a restore: the sandbox's TAP for the snapshot's interface.
    pub fn overrides(&self) -> Vec<NetworkOverride> {
        match self.sandbox {
            Some(_) => vec![NetworkOverride {
                iface_id: IFACE_ID.into(),
                host_dev_name: TAP_NAME.into(),
            }],
            None => Vec::new(),
        }
    }

    /// Opens the published ports of `args` (over the NIC if there is one, else over the VMM's
    /// vsock socket `uds`) and prints where each is.
    pub fn publish(&mut self, args: &NetArgs, uds: &Path) -> Result<(), String> {
        if args.publish.is_empty() {
            return Ok(());
        }
        let (target, on) = match &self.sandbox {
            Some(s) => (Target::Nic(Arc::clone(s.netns())), Some(s.runtime())),
            None => (Target::Vsock(uds.to_path_buf()), None),
        };
        let p = Publisher::start(&args.publish, target, on).map_err(|e| e.to_string())?;
        for port in p.ports() {
            eprintln!(
                "kiln: published {} -> guest port {}",
                port.host, port.guest_port
            );
        }
        self.publisher = Some(p);
        Ok(())
    }

    /// The `network` object of `--json`: the guest's address, the published ports and what was
    /// refused; `None` when the run had neither an interface nor published ports.
    pub fn report(&self) -> Option<serde_json::Value> {
        if self.sandbox.is_none() && self.publisher.is_none() {
            return None;
        }
        let published = self.publisher.as_ref().map_or(&[][..], Publisher::ports);
        let (refused, total) = self
            .sandbox
            .as_ref()
            .map_or((Vec::new(), 0), Sandbox::refusals);
        Some(serde_json::json!({
            "address": self.sandbox.as_ref().map(|_| GUEST_IP.to_string()),
            "published": published.iter().map(|p| serde_json::json!({
                "host": p.host.to_string(),
                "host_port": p.host.port(),
                "guest_port": p.guest_port,
            })).collect::<Vec<_>>(),
            "refused": refused,
            "refused_total": total,
        }))
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Listeners first: they may ride on the sandbox's runtime.
        self.publisher.take();
        self.sandbox.take();
    }
}
