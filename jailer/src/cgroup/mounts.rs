//! Finding the host's cgroup hierarchies: where each is mounted (`/proc/self/mountinfo`), which
//! controllers it has, and which cgroup this process is in there (`/proc/self/cgroup`).

use std::path::{Path, PathBuf};

use super::{CgroupError, Hierarchy};
use crate::args::CgroupVersion;

/// The v1 controllers the kernel knows; other mount options (`rw`, `name=systemd`,
/// `clone_children`, ...) are not controllers.
const V1_CONTROLLERS: &[&str] = &[
    "blkio",
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "freezer",
    "hugetlb",
    "memory",
    "misc",
    "net_cls",
    "net_prio",
    "perf_event",
    "pids",
    "rdma",
];

/// The hierarchies mounted for this process, v1 and v2.
pub fn detect() -> Result<Vec<Hierarchy>, CgroupError> {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|err| CgroupError::Read {
            path: path.into(),
            err,
        })
    };
    let mut hierarchies = parse(&read("/proc/self/mountinfo")?, &read("/proc/self/cgroup")?);
    for h in hierarchies
        .iter_mut()
        .filter(|h| h.version == CgroupVersion::V2)
    {
        let path = h.mount.join("cgroup.controllers");
        let offered =
            std::fs::read_to_string(&path).map_err(|err| CgroupError::Read { path, err })?;
        h.controllers = offered.split_whitespace().map(String::from).collect();
    }
    Ok(hierarchies)
}

/// The hierarchies in `mountinfo` (the first mount of each), with this process's cgroup in each
/// from `proc_cgroup`. A v2 hierarchy's controllers are left empty: they are read from the
/// hierarchy itself. Named v1 hierarchies without controllers (`name=systemd`) are left out.
pub fn parse(mountinfo: &str, proc_cgroup: &str) -> Vec<Hierarchy> {
    let mut hierarchies: Vec<(String, Hierarchy)> = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let theirs: Vec<&str> = right.split(' ').collect();
        let (Some(dev), Some(root), Some(mount_point), Some(fstype), Some(options)) = (
            fields.get(2),
            fields.get(3),
            fields.get(4),
            theirs.first(),
            theirs.get(2),
        ) else {
            continue;
        };
        let (version, controllers) = match *fstype {
            "cgroup" => {
                let controllers: Vec<String> = options
                    .split(',')
                    .filter(|o| V1_CONTROLLERS.contains(o))
                    .map(String::from)
                    .collect();
                if controllers.is_empty() {
                    continue;
                }
                (CgroupVersion::V1, controllers)
            }
            "cgroup2" => (CgroupVersion::V2, Vec::new()),
            _ => continue,
        };
        if hierarchies.iter().any(|(d, _)| d == dev) {
            continue;
        }
        let current = current_cgroup(proc_cgroup, version, &controllers)
            .map(|path| relative_to(&path, &unescape(root)))
            .unwrap_or_default();
        hierarchies.push((
            dev.to_string(),
            Hierarchy {
                version,
                controllers,
                mount: PathBuf::from(unescape(mount_point)),
                current,
            },
        ));
    }
    hierarchies.into_iter().map(|(_, h)| h).collect()
}

/// This process's cgroup path in the hierarchy with `controllers` (v1) or the unified one (v2).
fn current_cgroup(
    proc_cgroup: &str,
    version: CgroupVersion,
    controllers: &[String],
) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, names, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match version {
            CgroupVersion::V2 => id == "0" && names.is_empty(),
            CgroupVersion::V1 => names.split(',').any(|n| controllers.iter().any(|c| c == n)),
        };
        matches.then(|| path.to_string())
    })
}

/// `path` relative to the mount's `root` (a container may mount a hierarchy from a subtree);
/// the mount's root itself when `path` is not below it.
fn relative_to(path: &str, root: &str) -> PathBuf {
    Path::new(path)
        .strip_prefix(root)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                let v = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's layout: v1 controllers, a named systemd hierarchy, an empty unified one.
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/net_cls,net_prio rw,relatime - cgroup cgroup rw,net_cls,net_prio
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 23 0:32 / /mnt/memory\\040again rw,relatime - cgroup cgroup rw,memory
";
    const HYBRID_CGROUP: &str = "\
9:name=systemd:/
8:net_cls,net_prio:/
4:memory:/process_api/7fe1
1:cpu:/
0::/
";

    #[test]
    fn a_hybrid_host_has_v1_controllers_and_a_unified_hierarchy() {
        let hs = parse(HYBRID, HYBRID_CGROUP);
        let mounts: Vec<&Path> = hs.iter().map(|h| h.mount.as_path()).collect();
        assert_eq!(
            mounts,
            [
                "/sys/fs/cgroup/cpu",
                "/sys/fs/cgroup/memory",
                "/sys/fs/cgroup/net_cls,net_prio",
                "/sys/fs/cgroup/unified"
            ]
            .map(Path::new),
            "named hierarchies and second mounts are left out"
        );
        assert_eq!(hs[1].current, PathBuf::from("process_api/7fe1"));
        assert_eq!(hs[0].current, PathBuf::new());
        assert_eq!(hs[2].controllers, ["net_cls", "net_prio"]);
        assert_eq!(hs[3].version, CgroupVersion::V2);
        assert_eq!(super::super::pick_version(&hs, None), CgroupVersion::V1);
        assert_eq!(
            super::super::pick_version(&hs, Some(CgroupVersion::V2)),
            CgroupVersion::V2
        );
    }

    #[test]
    fn a_v2_host_in_a_container_sees_paths_below_its_mount_root() {
        let mountinfo =
            "29 23 0:26 /kubepods/pod1 /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let hs = parse(mountinfo, "0::/kubepods/pod1/app\n");
        assert_eq!(hs.len(), 1);
        assert_eq!(hs[0].mount, PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(hs[0].current, PathBuf::from("app"));
        assert_eq!(super::super::pick_version(&hs, None), CgroupVersion::V2);
    }

    #[test]
    fn escapes_are_undone() {
        assert_eq!(unescape("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape("/trailing\\04"), "/trailing\\04");
    }
}
