//! `kiln-net`: the host side of a sandbox's network.
//!
//! This crate owns everything created on the host for one VM's network, and removes all of it
//! when the VM ends: a network namespace of its own ([`netns`]), the TAP kiln-vmm attaches and
//! the links around it ([`link`]), the packet filter ([`nft`]), a resolver that answers only
//! allowed names and pins each answer ([`dns`]), an egress proxy that lets TCP through only to a
//! pinned address whose TLS SNI or HTTP Host names an allowed domain ([`proxy`], [`sni`]), the
//! report of everything refused ([`refusal`], [`nflog`]), and listeners on 127.0.0.1 that
//! publish guest ports ([`publish`]). [`sandbox`] puts them together. What a sandbox may reach
//! is its [`policy`]; where the guest sits is fixed ([`addr`]).
//!
//! It calls the kernel (namespaces, TAP and interface ioctls, netlink for NFLOG), `nft` and, for
//! `--allow-net`, `ip`; DNS through hickory, HTTP through hyper, on a tokio runtime of its own.
//! It talks to a VM only through its network and, for published ports without a network
//! interface, through the guest agent's forwarding port (`kiln_agent::client::forward`); it
//! knows nothing of kiln-vmm. The `kiln` CLI and the pool manager (`kilnd`, which also takes
//! over the namespaces of VMs a killed kilnd left running: [`Sandbox::adopt`]) call it.

pub mod addr;
pub mod dns;
pub mod http;
pub mod link;
pub mod netns;
pub mod nflog;
pub mod nft;
pub mod policy;
pub mod proxy;
pub mod publish;
pub mod refusal;
pub mod sandbox;
pub mod sni;
pub mod uplink;

pub use policy::{DomainPattern, Policy};
pub use publish::{PublishSpec, Published, Publisher, Target};
pub use refusal::Refusal;
pub use sandbox::{Sandbox, SandboxConfig, SandboxError};
