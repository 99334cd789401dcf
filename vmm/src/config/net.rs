//! Network interfaces in the configuration: the checks one interface must pass on its own (used
//! by `validate` for the whole configuration and by the API for each `PUT`), and the conversion
//! of the API's shapes into the device's.

use kiln_devices::virtio::net::{NetConfig, parse_mac, tap};

use super::NetworkInterfaceConfig;
use super::rate_limiter::rate_limiter;

/// Checks one interface on its own; the message names the field and value.
pub fn check_interface(n: &NetworkInterfaceConfig) -> Result<(), String> {
    let id_ok = !n.iface_id.is_empty()
        && n.iface_id.len() <= 64
        && n.iface_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !id_ok {
        return Err("iface_id must be 1 to 64 letters, digits, '_' or '-'".into());
    }
    if !tap::valid_name(&n.host_dev_name) {
        return Err(format!(
            "host_dev_name {:?} is not an interface name (1 to {} bytes, no '/', spaces or NUL)",
            n.host_dev_name,
            tap::MAX_NAME_LEN
        ));
    }
    if let Some(mac) = &n.guest_mac {
        let bytes = parse_mac(mac)
            .ok_or_else(|| format!("guest_mac {mac:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
        if bytes[0] & 1 != 0 {
            return Err(format!(
                "guest_mac {mac} is a multicast address; a NIC needs a unicast one"
            ));
        }
    }
    for (what, l) in [
        ("rx_rate_limiter", &n.rx_rate_limiter),
        ("tx_rate_limiter", &n.tx_rate_limiter),
    ] {
        rate_limiter(l.as_ref())
            .check(what)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The device's configuration for an interface that passed [`check_interface`].
pub fn device_config(n: &NetworkInterfaceConfig) -> NetConfig {
    NetConfig {
        id: n.iface_id.clone(),
        host_dev_name: n.host_dev_name.clone(),
        guest_mac: n.guest_mac.as_deref().and_then(parse_mac),
        rx_rate_limiter: rate_limiter(n.rx_rate_limiter.as_ref()),
        tx_rate_limiter: rate_limiter(n.tx_rate_limiter.as_ref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api::requests::rate_limiter::{RateLimiter, TokenBucket};

    fn iface(id: &str, tap: &str, mac: Option<&str>) -> NetworkInterfaceConfig {
        NetworkInterfaceConfig {
            iface_id: id.into(),
            host_dev_name: tap.into(),
            guest_mac: mac.map(str::to_string),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }
    }

    #[test]
    fn interfaces_are_checked_by_field() {
        assert_eq!(
            check_interface(&iface("eth0", "tap0", Some("06:00:ac:10:00:02"))),
            Ok(())
        );
        let e = |n| check_interface(&n).unwrap_err();
        assert!(e(iface("", "tap0", None)).starts_with("iface_id must be"));
        assert!(e(iface("eth 0", "tap0", None)).starts_with("iface_id must be"));
        assert!(
            e(iface("eth0", "a-very-long-tap-name", None))
                .starts_with("host_dev_name \"a-very-long-tap-name\" is not an interface name")
        );
        assert_eq!(
            e(iface("eth0", "tap0", Some("06:00:ac:10:00"))),
            "guest_mac \"06:00:ac:10:00\" is not a MAC address (aa:bb:cc:dd:ee:ff)"
        );
        assert_eq!(
            e(iface("eth0", "tap0", Some("01:00:5e:00:00:01"))),
            "guest_mac 01:00:5e:00:00:01 is a multicast address; a NIC needs a unicast one"
        );
        let mut n = iface("eth0", "tap0", None);
        n.rx_rate_limiter = Some(RateLimiter {
            bandwidth: Some(TokenBucket {
                size: 1,
                one_time_burst: None,
                refill_time: u64::MAX,
            }),
            ops: None,
        });
        assert!(e(n).starts_with("rx_rate_limiter: refill_time"));
    }
}
