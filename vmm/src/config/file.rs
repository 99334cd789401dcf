//! `--config-file`: Firecracker's JSON configuration file, restricted to what Kiln supports.

use std::path::Path;

use super::VmConfig;

/// Reads and parses a configuration file; unknown keys are errors that name the key.
pub fn parse_config_file(path: &Path) -> Result<VmConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    parse_config_text(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

/// Parses the JSON text of a configuration file.
pub fn parse_config_text(text: &str) -> Result<VmConfig, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn firecracker_shaped_file_parses() {
        let cfg = parse_config_text(
            r#"{
                "boot-source": {"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0",
                                "initrd_path": "/k/initrd"},
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false,
                                   "track_dirty_pages": true},
                "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                                        "guest_mac": "06:00:ac:10:00:02",
                                        "rx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 10}}}]
            }"#,
        )
        .unwrap();
        assert_eq!(
            cfg.boot_source.kernel_image_path,
            PathBuf::from("/k/vmlinux")
        );
        assert_eq!(
            cfg.boot_source.initrd_path,
            Some(PathBuf::from("/k/initrd"))
        );
        assert_eq!(crate::config::boot_args(&cfg.boot_source), "console=ttyS0");
        assert_eq!(cfg.machine.vcpu_count, 2);
        assert_eq!(cfg.machine.mem_size_mib, 256);
        assert!(cfg.machine.track_dirty_pages);
        assert_eq!(cfg.serial.serial_out_path, None);
        let eth0 = &cfg.network_interfaces[0];
        assert_eq!(
            (eth0.iface_id.as_str(), eth0.host_dev_name.as_str()),
            ("eth0", "tap0")
        );
        assert_eq!(eth0.rx_rate_limiter.unwrap().bandwidth.unwrap().size, 1000);
        assert_eq!(cfg.balloon, None);
    }

    #[test]
    fn the_balloon_object_is_firecrackers() {
        let cfg = parse_config_text(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 512},
                "balloon": {"amount_mib": 64, "deflate_on_oom": true,
                            "stats_polling_interval_s": 2, "free_page_reporting": true}}"#,
        )
        .unwrap();
        let b = cfg.balloon.unwrap();
        assert_eq!(
            (
                b.amount_mib,
                b.deflate_on_oom,
                b.stats_polling_interval_s,
                b.free_page_reporting
            ),
            (64, true, 2, true)
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse_config_text(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "cpu_templ": "T2"}}"#,
        )
        .unwrap_err();
        assert!(err.contains("unknown field `cpu_templ`"), "{err}");
        // Firecracker's static templates parse, and validation names what Kiln takes.
        let cfg = parse_config_text(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2"}}"#,
        )
        .unwrap();
        let e = crate::config::validate_machine(&cfg.machine)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cpu_template T2: Kiln has no CPU templates"),
            "{e}"
        );
        let err = parse_config_text(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}, "frobnicator": {}}"#,
        )
        .unwrap_err();
        assert!(err.contains("unknown field `frobnicator`"), "{err}");
        let err = parse_config_text(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
                "balloon": {"amount_mib": 0, "deflate_on_oom": true, "inflate": 1}}"#,
        )
        .unwrap_err();
        assert!(err.contains("unknown field `inflate`"), "{err}");
    }

    #[test]
    fn missing_and_mistyped_values_are_named() {
        let err = parse_config_text(r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#)
            .unwrap_err();
        assert!(err.contains("missing field `boot-source`"), "{err}");
        let err = parse_config_text(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "machine-config": {"vcpu_count": -1, "mem_size_mib": 64}}"#,
        )
        .unwrap_err();
        assert!(err.contains("invalid value: integer `-1`"), "{err}");
        assert!(parse_config_text("{").unwrap_err().contains("EOF"));
    }

    #[test]
    fn unreadable_file_is_named() {
        let err = parse_config_file(Path::new("/nonexistent/kiln.json")).unwrap_err();
        assert!(
            err.starts_with("config file /nonexistent/kiln.json: "),
            "{err}"
        );
    }
}
