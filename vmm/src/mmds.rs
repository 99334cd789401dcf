//! The MMDS on a network interface: kiln-mmds's network stack ([`MmdsStack`]) as the virtio-net
//! device's frame hook, answering the guest at the configured address (169.254.169.254 by
//! default) from the instance's data store, which the API's `PUT`/`PATCH /mmds` keep changing.
//! The guest reaches it with a route to that address on the interface (`ip route add
//! 169.254.169.254 dev eth0`), as with Firecracker; nothing of it goes through the TAP.

use std::sync::{Arc, Mutex};

use kiln_api::requests::mmds::{DEFAULT_MMDS_ADDRESS, MmdsConfig};
use kiln_devices::virtio::net::FrameHook;
use kiln_devices::virtio::net::hook::frame_targets_ipv4;
use kiln_mmds::{Mmds, MmdsStack};

/// The MMDS's MAC address, as the guest's ARP cache shows it (locally administered).
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];

/// The frame hook serving the MMDS on one interface.
pub struct MmdsHook {
    stack: MmdsStack,
    mmds: Arc<Mutex<Mmds>>,
    address: [u8; 4],
}

impl MmdsHook {
    /// A hook answering at `config`'s address from `mmds`.
    pub fn new(config: &MmdsConfig, mmds: Arc<Mutex<Mmds>>) -> Self {
        let address = config.ipv4_address.unwrap_or(DEFAULT_MMDS_ADDRESS);
        Self {
            stack: MmdsStack::new(address, MMDS_MAC),
            mmds,
            address: address.octets(),
        }
    }
}

impl FrameHook for MmdsHook {
    fn claims(&self, head: &[u8]) -> bool {
        frame_targets_ipv4(head, self.address)
    }

    fn guest_frame(&mut self, frame: &[u8]) {
        let mmds = self.mmds.lock().unwrap_or_else(|p| p.into_inner());
        self.stack.guest_frame(frame, &mmds);
    }

    fn has_frame_for_guest(&self) -> bool {
        self.stack.has_frame_for_guest()
    }

    fn frame_for_guest(&mut self, buf: &mut [u8]) -> Option<usize> {
        let frame = self.stack.frame_for_guest()?;
        if frame.len() > buf.len() {
            log::warn!(
                "mmds: a {}-byte frame does not fit the guest's {}-byte buffer; dropped",
                frame.len(),
                buf.len()
            );
            return Some(0);
        }
        buf[..frame.len()].copy_from_slice(&frame);
        Some(frame.len())
    }
}

/// The hook for interface `iface_id`, when the MMDS is configured on it.
pub fn hook_for(
    iface_id: &str,
    config: Option<&MmdsConfig>,
    mmds: &Arc<Mutex<Mmds>>,
) -> Option<MmdsHook> {
    let config = config?;
    config
        .network_interfaces
        .iter()
        .any(|i| i == iface_id)
        .then(|| MmdsHook::new(config, mmds.clone()))
}

/// The first interface `config` names that is not among `interfaces` (the configured ones).
pub fn unknown_interface<'c>(config: &'c MmdsConfig, interfaces: &[&str]) -> Option<&'c str> {
    config
        .network_interfaces
        .iter()
        .map(String::as_str)
        .find(|i| !interfaces.contains(i))
}
