//! The device flags' `key=value,...` syntax: `--drive id=ID,path=PATH[,cow=OVERLAY][,ro][,root]
//! [,engine=Sync|Async]`,
//! `--vsock cid=N,uds=PATH`, `--net id=ID,tap=NAME[,mac=MAC]` and `--balloon [amount_mib=N]
//! [,deflate_on_oom][,stats_polling_interval_s=N][,free_page_reporting]`.

use std::path::PathBuf;

use super::{BalloonConfig, DriveConfig, NetworkInterfaceConfig, VsockConfig};

/// Splits `a=1,b,c=3` into pairs; a bare word has no value. Empty items are errors.
fn items<'a>(flag: &str, spec: &'a str) -> Result<Vec<(&'a str, Option<&'a str>)>, String> {
    spec.split(',')
        .map(|item| match item.split_once('=') {
            _ if item.is_empty() => Err(format!("{flag} {spec:?} has an empty item")),
            Some((k, v)) => Ok((k, Some(v))),
            None => Ok((item, None)),
        })
        .collect()
}

/// Parses `--drive id=ID,path=PATH[,cow=OVERLAY][,ro][,root][,engine=Sync|Async]`.
pub fn parse_drive(spec: &str) -> Result<DriveConfig, String> {
    use kiln_api::requests::drives::IoEngine;
    let (mut id, mut path, mut cow, mut ro, mut root) = (None, None, None, false, false);
    let mut engine = None;
    for (key, value) in items("--drive", spec)? {
        match (key, value) {
            ("id", Some(v)) => id = Some(v.to_string()),
            ("path", Some(v)) => path = Some(PathBuf::from(v)),
            ("cow", Some(v)) => cow = Some(PathBuf::from(v)),
            ("ro", None) => ro = true,
            ("root", None) => root = true,
            ("engine", Some("Sync")) => engine = Some(IoEngine::Sync),
            ("engine", Some("Async")) => engine = Some(IoEngine::Async),
            ("engine", v) => {
                return Err(format!(
                    "--drive {spec:?}: engine={} is not an I/O engine (want Sync or Async)",
                    v.unwrap_or_default()
                ));
            }
            (k, _) => {
                return Err(format!(
                    "--drive {spec:?}: unknown or malformed item {k:?} (want id=, path=, cow=, ro, root, engine=)"
                ));
            }
        }
    }
    Ok(DriveConfig {
        drive_id: id.ok_or_else(|| format!("--drive {spec:?} needs id=ID"))?,
        path_on_host: path.ok_or_else(|| format!("--drive {spec:?} needs path=PATH"))?,
        is_root_device: root,
        is_read_only: ro,
        cow_overlay_path: cow,
        partuuid: None,
        cache_type: None,
        io_engine: engine,
        rate_limiter: None,
    })
}

/// Parses `--vsock cid=N,uds=PATH`.
pub fn parse_vsock(spec: &str) -> Result<VsockConfig, String> {
    let (mut cid, mut uds) = (None, None);
    for (key, value) in items("--vsock", spec)? {
        match (key, value) {
            ("cid", Some(v)) => {
                cid = Some(
                    v.parse()
                        .map_err(|_| format!("--vsock {spec:?}: cid {v:?} is not a number"))?,
                )
            }
            ("uds", Some(v)) => uds = Some(PathBuf::from(v)),
            (k, _) => {
                return Err(format!(
                    "--vsock {spec:?}: unknown or malformed item {k:?} (want cid=, uds=)"
                ));
            }
        }
    }
    Ok(VsockConfig {
        guest_cid: cid.ok_or_else(|| format!("--vsock {spec:?} needs cid=N"))?,
        uds_path: uds.ok_or_else(|| format!("--vsock {spec:?} needs uds=PATH"))?,
        vsock_id: None,
    })
}

/// Parses `--net id=ID,tap=NAME[,mac=MAC]`.
pub fn parse_net(spec: &str) -> Result<NetworkInterfaceConfig, String> {
    let (mut id, mut tap, mut mac) = (None, None, None);
    for (key, value) in items("--net", spec)? {
        match (key, value) {
            ("id", Some(v)) => id = Some(v.to_string()),
            ("tap", Some(v)) => tap = Some(v.to_string()),
            ("mac", Some(v)) => mac = Some(v.to_string()),
            (k, _) => {
                return Err(format!(
                    "--net {spec:?}: unknown or malformed item {k:?} (want id=, tap=, mac=)"
                ));
            }
        }
    }
    Ok(NetworkInterfaceConfig {
        iface_id: id.ok_or_else(|| format!("--net {spec:?} needs id=ID"))?,
        host_dev_name: tap.ok_or_else(|| format!("--net {spec:?} needs tap=NAME"))?,
        guest_mac: mac,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    })
}

/// Parses `--balloon [amount_mib=N][,deflate_on_oom][,stats_polling_interval_s=N]
/// [,free_page_reporting]` (Firecracker's field names; `-` for none of them).
pub fn parse_balloon(spec: &str) -> Result<BalloonConfig, String> {
    let mut b = BalloonConfig {
        amount_mib: 0,
        deflate_on_oom: false,
        stats_polling_interval_s: 0,
        free_page_hinting: false,
        free_page_reporting: false,
    };
    if spec == "-" {
        return Ok(b);
    }
    let number =
        |key: &str, v: &str| format!("--balloon {spec:?}: {key} {v:?} is not a valid number");
    for (key, value) in items("--balloon", spec)? {
        match (key, value) {
            ("amount_mib", Some(v)) => b.amount_mib = v.parse().map_err(|_| number(key, v))?,
            ("stats_polling_interval_s", Some(v)) => {
                b.stats_polling_interval_s = v.parse().map_err(|_| number(key, v))?
            }
            ("deflate_on_oom", None) => b.deflate_on_oom = true,
            ("free_page_reporting", None) => b.free_page_reporting = true,
            (k, _) => {
                return Err(format!(
                    "--balloon {spec:?}: unknown or malformed item {k:?} (want amount_mib=, deflate_on_oom, stats_polling_interval_s=, free_page_reporting)"
                ));
            }
        }
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_parses_and_bad_values_are_named() {
        let n = parse_net("id=eth0,tap=kiln0,mac=06:00:ac:10:00:02").unwrap();
        assert_eq!(
            (
                n.iface_id.as_str(),
                n.host_dev_name.as_str(),
                n.guest_mac.as_deref()
            ),
            ("eth0", "kiln0", Some("06:00:ac:10:00:02"))
        );
        assert_eq!(
            parse_net("tap=t").unwrap_err(),
            "--net \"tap=t\" needs id=ID"
        );
        assert_eq!(
            parse_net("id=e").unwrap_err(),
            "--net \"id=e\" needs tap=NAME"
        );
        assert!(
            parse_net("id=e,tap=t,host_dev_name=x")
                .unwrap_err()
                .contains("item \"host_dev_name\"")
        );
    }

    #[test]
    fn drives_parse_with_flags() {
        let d = parse_drive("id=rootfs,path=/img/root.ext4,root,ro").unwrap();
        assert_eq!(d.drive_id, "rootfs");
        assert_eq!(d.path_on_host, PathBuf::from("/img/root.ext4"));
        assert!(d.is_root_device && d.is_read_only);
        let d = parse_drive("path=/x,id=data").unwrap();
        assert!(!d.is_root_device && !d.is_read_only);
        assert_eq!(
            d.io_engine, None,
            "Firecracker's default (Sync) unless asked"
        );
        use kiln_api::requests::drives::IoEngine;
        let d = parse_drive("id=data,path=/x,engine=Async").unwrap();
        assert_eq!(d.io_engine, Some(IoEngine::Async));
        let d = parse_drive("id=data,path=/x,engine=Sync").unwrap();
        assert_eq!(d.io_engine, Some(IoEngine::Sync));
        assert_eq!(
            parse_drive("id=a,path=/x,engine=uring").unwrap_err(),
            "--drive \"id=a,path=/x,engine=uring\": engine=uring is not an I/O engine (want Sync or Async)"
        );
    }

    #[test]
    fn bad_drives_are_named() {
        assert_eq!(
            parse_drive("path=/x").unwrap_err(),
            "--drive \"path=/x\" needs id=ID"
        );
        assert_eq!(
            parse_drive("id=a").unwrap_err(),
            "--drive \"id=a\" needs path=PATH"
        );
        assert!(
            parse_drive("id=a,path=/x,rw")
                .unwrap_err()
                .contains("unknown or malformed item \"rw\"")
        );
        assert!(
            parse_drive("id=a,,path=/x")
                .unwrap_err()
                .contains("empty item")
        );
        assert!(
            parse_drive("id,path=/x")
                .unwrap_err()
                .contains("item \"id\"")
        );
    }

    #[test]
    fn vsock_parses_and_bad_values_are_named() {
        let v = parse_vsock("cid=3,uds=/run/v.sock").unwrap();
        assert_eq!((v.guest_cid, v.uds_path), (3, PathBuf::from("/run/v.sock")));
        assert_eq!(
            parse_vsock("cid=x,uds=/v").unwrap_err(),
            "--vsock \"cid=x,uds=/v\": cid \"x\" is not a number"
        );
        assert_eq!(
            parse_vsock("uds=/v").unwrap_err(),
            "--vsock \"uds=/v\" needs cid=N"
        );
        assert!(
            parse_vsock("cid=3,path=/v")
                .unwrap_err()
                .contains("item \"path\"")
        );
    }

    #[test]
    fn balloon_parses_and_bad_values_are_named() {
        let b = parse_balloon(
            "amount_mib=64,deflate_on_oom,stats_polling_interval_s=1,free_page_reporting",
        )
        .unwrap();
        assert_eq!(
            (
                b.amount_mib,
                b.deflate_on_oom,
                b.stats_polling_interval_s,
                b.free_page_reporting
            ),
            (64, true, 1, true)
        );
        let b = parse_balloon("-").unwrap();
        assert_eq!(
            (b.amount_mib, b.deflate_on_oom, b.free_page_reporting),
            (0, false, false)
        );
        assert_eq!(
            parse_balloon("amount_mib=x").unwrap_err(),
            "--balloon \"amount_mib=x\": amount_mib \"x\" is not a valid number"
        );
        assert!(
            parse_balloon("free_page_hinting")
                .unwrap_err()
                .contains("unknown or malformed item \"free_page_hinting\"")
        );
        assert!(parse_balloon("deflate_on_oom=yes").is_err());
    }
}
