//! A network interface for a lab VM without a sandbox network's rules: a TAP in a namespace of
//! its own, the host's end at the gateway address of `kiln_net::addr`, so the guest (with that
//! module's fixed address) reaches whatever listens there. For throughput benchmarks and API
//! replays, where the rules and the proxy would only be in the way.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;

use kiln_net::addr::{GATEWAY_IP, PREFIX, TAP_MAC, TAP_NAME};
use kiln_net::link;
use kiln_net::netns::NetNs;

/// The namespace with its TAP (gone when the last handle and process in it are).
pub struct Nic {
    /// The namespace holding the TAP (and the host end of every connection).
    pub ns: Arc<NetNs>,
}

impl Nic {
    /// Makes the namespace and its TAP `kiln_net::addr::TAP_NAME`, up at the gateway address.
    pub fn new() -> Result<Nic, String> {
        let ns = NetNs::new().map_err(|e| format!("a namespace: {e}"))?;
        ns.run(|| -> Result<(), link::LinkError> {
            link::up("lo")?;
            link::create_tap(TAP_NAME, TAP_MAC)?;
            link::set_address(TAP_NAME, GATEWAY_IP, PREFIX)?;
            link::up(TAP_NAME)
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("the TAP: {e}"))?;
        Ok(Nic { ns: Arc::new(ns) })
    }

    /// Makes `cmd` start inside the namespace.
    pub fn enter_on_spawn(&self, cmd: &mut Command) {
        let ns = self.ns.as_raw_fd();
        // SAFETY: setns is one system call on a descriptor `self` keeps open past the spawn, safe
        // between fork and exec.
        unsafe { cmd.pre_exec(move || kiln_net::netns::enter_raw(ns)) };
    }
}
