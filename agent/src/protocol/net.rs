//! The guest's network settings as the host passes them: an IPv4 address with its prefix, the
//! gateway, and name servers. At boot they ride on the kernel command line
//! (`kiln.net=ADDR/PREFIX,GATEWAY,DNS[,DNS...]`, read by the agent as PID 1); after a snapshot
//! restore, in the `restored` request's `net` field, so a clone's eth0 is set again whatever its
//! snapshot held. [`NetSpec::validate`] is the one place the rules live.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The interface the settings are for: the guest's first (and Kiln's only) network interface.
pub const INTERFACE: &str = "eth0";
/// The kernel command-line word carrying the settings at boot.
pub const CMDLINE_KEY: &str = "kiln.net=";
/// The most name servers `/etc/resolv.conf` takes (glibc reads three).
pub const MAX_DNS: usize = 3;

/// Network settings as sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    /// The guest's address and prefix length, `a.b.c.d/n`.
    pub address: String,
    /// The default gateway, inside the address's subnet.
    pub gateway: String,
    /// Name servers for `/etc/resolv.conf`, 1 to [`MAX_DNS`].
    pub dns: Vec<String>,
}

/// Checked settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Net {
    /// The guest's address.
    pub address: Ipv4Addr,
    /// Its prefix length (1 to 30).
    pub prefix: u8,
    /// The default gateway.
    pub gateway: Ipv4Addr,
    /// Name servers.
    pub dns: Vec<Ipv4Addr>,
}

/// Why settings are not acceptable; each message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetSpecError {
    /// `address` is not `a.b.c.d/n` with n from 1 to 30.
    #[error(
        "net.address {0:?} is not an IPv4 address with a prefix length from 1 to 30 (a.b.c.d/n)"
    )]
    Address(String),
    /// `address` is the subnet's network or broadcast address.
    #[error("net.address {0} is its subnet's network or broadcast address")]
    NotAHost(String),
    /// `gateway` is not an IPv4 address.
    #[error("net.gateway {0:?} is not an IPv4 address")]
    Gateway(String),
    /// `gateway` is outside the subnet, or is the address itself.
    #[error("net.gateway {gateway} is not another host of {address}'s subnet")]
    GatewayOutside {
        /// The gateway.
        gateway: String,
        /// The address.
        address: String,
    },
    /// A `dns` entry is not an IPv4 address.
    #[error("net.dns entry {0:?} is not an IPv4 address")]
    Dns(String),
    /// Too few or too many name servers.
    #[error("net.dns has {0} entries; 1 to {MAX_DNS} are needed")]
    DnsCount(usize),
    /// A kernel command-line word that is not `kiln.net=ADDR/PREFIX,GATEWAY,DNS...`.
    #[error("kernel command line {0:?} is not kiln.net=ADDR/PREFIX,GATEWAY,DNS[,DNS...]")]
    Cmdline(String),
}

impl Net {
    /// The subnet mask.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix)))
    }
}

impl NetSpec {
    /// Checks every field.
    pub fn validate(&self) -> Result<Net, NetSpecError> {
        let bad_address = || NetSpecError::Address(self.address.clone());
        let (addr, prefix) = self.address.split_once('/').ok_or_else(bad_address)?;
        let address: Ipv4Addr = addr.parse().map_err(|_| bad_address())?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (1..=30).contains(p))
            .ok_or_else(bad_address)?;
        let gateway: Ipv4Addr = self
            .gateway
            .parse()
            .map_err(|_| NetSpecError::Gateway(self.gateway.clone()))?;
        let net = Net {
            address,
            prefix,
            gateway,
            dns: Vec::new(),
        };
        let mask = u32::from(net.netmask());
        let host = |ip: Ipv4Addr| {
            let bits = u32::from(ip) & !mask;
            bits != 0 && bits != !mask
        };
        if !host(address) {
            return Err(NetSpecError::NotAHost(self.address.clone()));
        }
        let same_subnet = u32::from(address) & mask == u32::from(gateway) & mask;
        if !same_subnet || !host(gateway) || gateway == address {
            return Err(NetSpecError::GatewayOutside {
                gateway: self.gateway.clone(),
                address: self.address.clone(),
            });
        }
        if self.dns.is_empty() || self.dns.len() > MAX_DNS {
            return Err(NetSpecError::DnsCount(self.dns.len()));
        }
        let dns = self
            .dns
            .iter()
            .map(|d| d.parse().map_err(|_| NetSpecError::Dns(d.clone())))
            .collect::<Result<_, _>>()?;
        Ok(Net { dns, ..net })
    }

    /// The kernel command-line word carrying these settings.
    pub fn to_cmdline(&self) -> String {
        let mut parts = vec![self.address.clone(), self.gateway.clone()];
        parts.extend(self.dns.iter().cloned());
        format!("{CMDLINE_KEY}{}", parts.join(","))
    }

    /// The settings in a kernel command line, if it has a `kiln.net=` word (the last one wins,
    /// as the kernel does with its own parameters).
    pub fn from_cmdline(cmdline: &str) -> Option<Result<NetSpec, NetSpecError>> {
        let word = cmdline
            .split_whitespace()
            .filter_map(|w| w.strip_prefix(CMDLINE_KEY))
            .next_back()?;
        let parts: Vec<&str> = word.split(',').collect();
        Some(match parts.as_slice() {
            [address, gateway, dns @ ..] if !dns.is_empty() => Ok(NetSpec {
                address: address.to_string(),
                gateway: gateway.to_string(),
                dns: dns.iter().map(|d| d.to_string()).collect(),
            }),
            _ => Err(NetSpecError::Cmdline(format!("{CMDLINE_KEY}{word}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(address: &str, gateway: &str, dns: &[&str]) -> NetSpec {
        NetSpec {
            address: address.into(),
            gateway: gateway.into(),
            dns: dns.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn a_slash_30_validates_and_round_trips_through_the_command_line() {
        let s = spec("172.16.0.2/30", "172.16.0.1", &["172.16.0.1"]);
        let net = s.validate().unwrap();
        assert_eq!(net.address, Ipv4Addr::new(172, 16, 0, 2));
        assert_eq!(net.netmask(), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(
            s.to_cmdline(),
            "kiln.net=172.16.0.2/30,172.16.0.1,172.16.0.1"
        );
        let line = format!("console=ttyS0 {} quiet", s.to_cmdline());
        assert_eq!(NetSpec::from_cmdline(&line), Some(Ok(s)));
        assert_eq!(NetSpec::from_cmdline("console=ttyS0"), None);
        assert_eq!(
            NetSpec::from_cmdline("kiln.net=10.0.0.2/24"),
            Some(Err(NetSpecError::Cmdline("kiln.net=10.0.0.2/24".into())))
        );
    }

    #[test]
    fn mistakes_name_the_field() {
        let e = |s: NetSpec| s.validate().unwrap_err().to_string();
        assert!(
            e(spec("172.16.0.2", "172.16.0.1", &["1.1.1.1"]))
                .starts_with("net.address \"172.16.0.2\"")
        );
        assert!(e(spec("172.16.0.2/31", "172.16.0.1", &["1.1.1.1"])).starts_with("net.address"));
        assert!(e(spec("300.0.0.2/24", "172.16.0.1", &["1.1.1.1"])).starts_with("net.address"));
        assert_eq!(
            e(spec("172.16.0.3/30", "172.16.0.1", &["1.1.1.1"])),
            "net.address 172.16.0.3/30 is its subnet's network or broadcast address"
        );
        assert_eq!(
            e(spec("172.16.0.2/30", "172.16.0.5", &["1.1.1.1"])),
            "net.gateway 172.16.0.5 is not another host of 172.16.0.2/30's subnet"
        );
        assert!(
            e(spec("172.16.0.2/30", "172.16.0.2", &["1.1.1.1"]))
                .starts_with("net.gateway 172.16.0.2 is not another")
        );
        assert_eq!(
            e(spec("172.16.0.2/30", "172.16.0.1", &[])),
            "net.dns has 0 entries; 1 to 3 are needed"
        );
        assert_eq!(
            e(spec("172.16.0.2/30", "172.16.0.1", &["dns.example"])),
            "net.dns entry \"dns.example\" is not an IPv4 address"
        );
    }
}
