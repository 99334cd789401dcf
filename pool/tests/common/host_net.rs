//! What a sandbox network leaves on the host: processes and descriptors in its namespace,
//! listeners on its published ports, its uplink (`kn-N`).

use std::path::Path;
use std::time::{Duration, Instant};

/// Everything on this host that refers to the network namespace `ns` (`net:[INODE]`):
/// processes in it and descriptors held on it.
pub fn refs(ns: &str) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let p = entry.path();
        if std::fs::read_link(p.join("ns/net")).is_ok_and(|l| l.to_string_lossy() == ns) {
            n += 1;
        }
        for fd in std::fs::read_dir(p.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == ns) {
                n += 1;
            }
        }
    }
    n
}

/// Waits until nothing refers to namespace `ns`, the host ports are closed and the uplinks
/// named are gone.
pub fn gone(what: &str, ns: &str, ports: &[u16], links: &[String]) {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let left_ns = refs(ns);
        let open: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
            .collect();
        let left_links: Vec<&String> = links
            .iter()
            .filter(|l| Path::new("/sys/class/net").join(l).exists())
            .collect();
        if left_ns == 0 && open.is_empty() && left_links.is_empty() {
            return;
        }
        assert!(
            Instant::now() < end,
            "{what} left {left_ns} references to {ns}, listeners on {open:?}, links {left_links:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The uplink ends (`kn-N`) on this host.
pub fn uplinks() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("kn-"))
        .collect()
}
