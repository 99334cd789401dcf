//! Network interfaces in the configuration: the checks one interface must pass on its own (used
//! by `validate` for the whole configuration and by the API for each `PUT`), and the conversion
//! of the API's shapes into the device's.

use kiln_api::requests::network_interfaces::{RateLimiter, TokenBucket};
use kiln_devices::rate_limiter::{BucketConfig, BucketUpdate, RateLimiterConfig};
use kiln_devices::virtio::net::{NetConfig, parse_mac, tap};

use super::NetworkInterfaceConfig;

/// A bucket as the device takes it (an absent burst is none).
pub fn bucket(b: &TokenBucket) -> BucketConfig {
    BucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst.unwrap_or(0),
        refill_time_ms: b.refill_time,
    }
}

/// A limiter as the device takes it (absent: no limit).
pub fn rate_limiter(l: Option<&RateLimiter>) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: l.and_then(|l| l.bandwidth.as_ref()).map(bucket),
        ops: l.and_then(|l| l.ops.as_ref()).map(bucket),
    }
}

/// A `PATCH`'s limiter as bucket updates: a bucket given replaces, one left out stays.
pub fn updates(l: Option<&RateLimiter>) -> [BucketUpdate; 2] {
    let update =
        |b: Option<&TokenBucket>| b.map_or(BucketUpdate::Keep, |b| BucketUpdate::Set(bucket(b)));
    match l {
        None => [BucketUpdate::Keep; 2],
        Some(l) => [update(l.bandwidth.as_ref()), update(l.ops.as_ref())],
    }
}

/// The API's shape of a limiter the device runs (for `GET /vm/config` after a `PATCH`).
pub fn api_rate_limiter(c: &RateLimiterConfig) -> Option<RateLimiter> {
    let bucket = |b: &BucketConfig| TokenBucket {
        size: b.size,
        one_time_burst: (b.one_time_burst != 0).then_some(b.one_time_burst),
        refill_time: b.refill_time_ms,
    };
    let l = RateLimiter {
        bandwidth: c.bandwidth.as_ref().map(bucket),
        ops: c.ops.as_ref().map(bucket),
    };
    (l != RateLimiter::default()).then_some(l)
}

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

    #[test]
    fn limiters_convert_both_ways() {
        let l = RateLimiter {
            bandwidth: Some(TokenBucket {
                size: 1000,
                one_time_burst: Some(10),
                refill_time: 100,
            }),
            ops: None,
        };
        let c = rate_limiter(Some(&l));
        assert_eq!(
            c.bandwidth,
            Some(BucketConfig {
                size: 1000,
                one_time_burst: 10,
                refill_time_ms: 100
            })
        );
        assert_eq!(api_rate_limiter(&c), Some(l));
        assert_eq!(api_rate_limiter(&RateLimiterConfig::default()), None);
        assert_eq!(
            updates(Some(&l)),
            [BucketUpdate::Set(c.bandwidth.unwrap()), BucketUpdate::Keep]
        );
        assert_eq!(updates(None), [BucketUpdate::Keep; 2]);
    }
}
