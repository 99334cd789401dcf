//! KVM's own per-VM counters, read from L1's debugfs.

/// KVM's counters for the VM of process `pid` (L1's debugfs: `<pid>-<fd>/`): exits, page
/// faults fixed (each one a nested page fault in the lab) and 4K pages mapped. `None` without
/// debugfs.
pub fn counters(pid: u32) -> Option<[u64; 3]> {
    let dir = std::fs::read_dir("/sys/kernel/debug/kvm")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{pid}-")))
        })?;
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some([read("exits")?, read("pf_fixed")?, read("pages_4k")?])
}
