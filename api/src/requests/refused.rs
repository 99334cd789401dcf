//! Firecracker resources whose devices Kiln does not have by design, answered with a 400 that
//! names what is missing and what Kiln offers, whatever the method or body: a client learns at
//! once that the feature is absent rather than that its request was malformed.

/// The devices a Kiln VM can have, for the refusals' messages.
const OFFERED: &str = "it offers only block, vsock, net and balloon devices";

/// The refusal for `path`, if it belongs to a resource Kiln does not have.
pub fn refusal(path: &str) -> Option<String> {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let message = match first {
        "entropy" => format!("Kiln has no entropy device: {OFFERED}"),
        "pmem" => format!("Kiln has no pmem devices: {OFFERED}"),
        "hotplug" => format!(
            "Kiln has no memory hotplug (virtio-mem): {OFFERED}; size memory with machine-config.mem_size_mib"
        ),
        "cpu-config" => "Kiln has no custom CPU templates: its vCPUs see the host's CPU as KVM \
                         supports it (machine-config.cpu_template takes \"None\")"
            .to_string(),
        _ => return None,
    };
    Some(message)
}

#[cfg(test)]
mod tests {
    use crate::requests::tests::fault;

    #[test]
    fn missing_devices_are_named_whatever_the_method() {
        assert_eq!(
            fault("PUT", "/entropy", "{}"),
            "Kiln has no entropy device: it offers only block, vsock, net and balloon devices"
        );
        for (method, path) in [("PUT", "/pmem/p0"), ("PATCH", "/pmem/p0")] {
            assert!(fault(method, path, "{}").starts_with("Kiln has no pmem devices"));
        }
        for method in ["GET", "PUT", "PATCH"] {
            let body = if method == "GET" { "" } else { "{}" };
            assert!(
                fault(method, "/hotplug/memory", body).starts_with("Kiln has no memory hotplug")
            );
        }
        assert!(fault("PUT", "/cpu-config", "{}").starts_with("Kiln has no custom CPU templates"));
        let r =
            crate::ApiResponse::from(crate::parse_request("PUT", "/entropy", b"{}").unwrap_err());
        assert_eq!(r.status(), 400);
    }
}
