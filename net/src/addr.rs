//! The fixed addressing every sandboxed VM gets. Each VM has a network namespace of its own, so
//! every VM (and every clone of a snapshot) can have the same guest address, gateway, MACs and TAP
//! name: a snapshot's network state stays valid in any clone, and nothing needs renumbering.

use std::net::Ipv4Addr;

use kiln_agent::protocol::NetSpec;

/// The TAP inside each VM's namespace.
pub const TAP_NAME: &str = "kiln0";
/// The guest's address.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);
/// The host end of the TAP: gateway, name server and proxy for the guest.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
/// The prefix length of the guest's link (a /30: the guest and the gateway).
pub const PREFIX: u8 = 30;
/// The guest's MAC address (locally administered, unicast).
pub const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
/// The TAP's MAC address, which the guest's ARP cache keeps across snapshots.
pub const TAP_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x01];
/// Where the per-VM resolver listens (on the gateway address).
pub const DNS_PORT: u16 = 53;
/// Where the egress proxy listens (on the gateway address); guest TCP is redirected there.
pub const PROXY_PORT: u16 = 15001;
/// The guest's interface id in kiln-vmm.
pub const IFACE_ID: &str = "eth0";

/// The settings the guest agent applies to eth0 (on the kernel command line at boot, in the
/// `restored` request of a clone).
pub fn guest_net_spec() -> NetSpec {
    NetSpec {
        address: format!("{GUEST_IP}/{PREFIX}"),
        gateway: GATEWAY_IP.to_string(),
        dns: vec![GATEWAY_IP.to_string()],
    }
}

/// A MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The `--net` argument of kiln-vmm for the sandbox's interface.
pub fn vmm_net_arg() -> String {
    format!(
        "id={IFACE_ID},tap={TAP_NAME},mac={}",
        mac_string(&GUEST_MAC)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_settings_are_valid_and_match_the_link() {
        let net = guest_net_spec().validate().unwrap();
        assert_eq!(
            (net.address, net.prefix, net.gateway),
            (GUEST_IP, PREFIX, GATEWAY_IP)
        );
        assert_eq!(net.dns, [GATEWAY_IP]);
        assert_eq!(vmm_net_arg(), "id=eth0,tap=kiln0,mac=06:00:ac:10:00:02");
        assert_eq!(GUEST_MAC[0] & 1, 0, "unicast");
        assert_eq!(GUEST_MAC[0] & 2, 2, "locally administered");
    }
}
