//! `PUT /boot-source`: the kernel, its command line and an optional initramfs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Firecracker's `BootSource` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Uncompressed ELF vmlinux or bzImage, on the host.
    pub kernel_image_path: PathBuf,
    /// Kernel command line; the VMM's default when absent.
    #[serde(default)]
    pub boot_args: Option<String>,
    /// Optional initramfs, on the host.
    #[serde(default)]
    pub initrd_path: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiRequest;
    use crate::requests::{parse_request, tests::fault};

    #[test]
    fn good_body() {
        let body = br#"{"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0",
                        "initrd_path": "/k/initrd"}"#;
        let want = BootSource {
            kernel_image_path: "/k/vmlinux".into(),
            boot_args: Some("console=ttyS0".into()),
            initrd_path: Some("/k/initrd".into()),
        };
        assert_eq!(
            parse_request("PUT", "/boot-source", body).unwrap(),
            ApiRequest::PutBootSource(want)
        );
        let body = br#"{"kernel_image_path": "vmlinux"}"#;
        let ApiRequest::PutBootSource(b) = parse_request("PUT", "/boot-source", body).unwrap()
        else {
            panic!("wrong variant")
        };
        assert_eq!((b.boot_args, b.initrd_path), (None, None));
    }

    #[test]
    fn unknown_and_missing_fields_are_named() {
        let f = fault(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "k", "cmdline": "x"}"#,
        );
        assert!(f.starts_with("boot-source: unknown field `cmdline`"), "{f}");
        let f = fault("PUT", "/boot-source", r#"{"boot_args": "x"}"#);
        assert!(
            f.starts_with("boot-source: missing field `kernel_image_path`"),
            "{f}"
        );
    }

    #[test]
    fn wrong_method() {
        assert_eq!(
            fault("GET", "/boot-source", ""),
            "/boot-source does not accept GET"
        );
    }
}
