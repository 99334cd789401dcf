//! `kilnd`, Kiln's pool manager: it builds templates (root filesystem -> boot -> build steps ->
//! start -> snapshot), keeps warm pools of sandboxes restored from them, and serves sandboxes over
//! an HTTP API on a Unix socket: create, exec, files, pause and resume, fork, kill, with records
//! in SQLite so a restarted daemon knows every sandbox.
//!
//! It reaches VMs only as a user would: `kiln-vmm` processes driven through their API socket
//! ([`vm`]) and the guest agent's protocol (`kiln_agent::client`); the VMM never depends on it.
//! Each VM's network (namespace, TAP, rules, resolver, proxy, published ports) is `kiln-net`'s,
//! made and held per VM by [`net`].
//! [`types`], [`client`] and [`template::spec`] are what clients (the `kiln` CLI) use; they are
//! all the crate holds without its `daemon` feature.

#[cfg(feature = "daemon")]
pub mod api;
pub mod client;
#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod db;
#[cfg(feature = "daemon")]
pub mod disk;
#[cfg(feature = "daemon")]
pub mod e2b;
#[cfg(feature = "daemon")]
pub mod jail;
#[cfg(feature = "daemon")]
pub mod net;
pub mod template;
pub mod types;
#[cfg(feature = "daemon")]
pub mod vm;
