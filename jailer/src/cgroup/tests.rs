//! The cgroup writers against a temporary tree standing in for cgroupfs.

use std::os::fd::BorrowedFd;

use super::*;
use crate::dirfd::remove_tree_at;

/// A stand-in for the kernel: a new cgroup directory comes with empty interface files, and
/// removing it removes them.
struct FakeKernel;

static FAKE: FakeKernel = FakeKernel;

/// The interface files a new fake cgroup has (a v1 cgroup has some, a v2 one others; the fake
/// gives all of them to every cgroup).
const FILES: &[&str] = &[
    "cgroup.procs",
    "cgroup.subtree_control",
    "cpu.shares",
    "cpuset.cpus",
    "cpuset.mems",
    "memory.limit_in_bytes",
    "memory.max",
    "pids.max",
];

impl CgroupFs for FakeKernel {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)?;
        for f in FILES {
            std::fs::write(path.join(f), b"")?;
        }
        Ok(())
    }

    fn remove_dir_at(&self, parent: BorrowedFd, name: &CStr) -> io::Result<()> {
        remove_tree_at(parent, name)
    }
}

/// A fresh tree for one test: the roots of the hierarchies and their files.
fn tree(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("kiln-jailer-cgroup-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// v1 roots `memory`, `cpu,cpuacct` and `cpuset` under `root`, made the way the kernel would.
fn v1(root: &Path) -> Vec<Hierarchy> {
    let mut hs = Vec::new();
    for (dir, controllers) in [
        ("memory", &["memory"][..]),
        ("cpu,cpuacct", &["cpu", "cpuacct"]),
        ("cpuset", &["cpuset"]),
    ] {
        FAKE.create_dir(&root.join(dir)).unwrap();
        hs.push(Hierarchy {
            version: CgroupVersion::V1,
            controllers: controllers.iter().map(|c| c.to_string()).collect(),
            mount: root.join(dir),
            current: PathBuf::new(),
        });
    }
    std::fs::write(root.join("cpuset/cpuset.cpus"), "0-1\n").unwrap();
    std::fs::write(root.join("cpuset/cpuset.mems"), "0\n").unwrap();
    hs
}

fn v2(root: &Path) -> Vec<Hierarchy> {
    FAKE.create_dir(&root.join("unified")).unwrap();
    vec![Hierarchy {
        version: CgroupVersion::V2,
        controllers: vec!["cpu".into(), "memory".into(), "pids".into()],
        mount: root.join("unified"),
        current: PathBuf::new(),
    }]
}

fn setting(file: &str, value: &str) -> CgroupSetting {
    CgroupSetting {
        controller: file.split('.').next().unwrap().to_string(),
        file: file.to_string(),
        value: value.to_string(),
    }
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn v1_settings_go_to_their_controllers_hierarchy() {
    let root = tree("v1");
    let hs = v1(&root);
    let mut undo = Undo::new();
    let settings = [
        setting("memory.limit_in_bytes", "268435456"),
        setting("cpu.shares", "512"),
        setting("cpuset.cpus", "1"),
    ];
    let placed = create(
        &hs,
        CgroupVersion::V1,
        "kiln-vmm",
        "vm-1",
        &settings,
        &FAKE,
        &mut undo,
    )
    .unwrap();
    let dirs: Vec<&Path> = placed.iter().map(|p| p.dir.as_path()).collect();
    assert_eq!(
        dirs,
        [
            root.join("memory/kiln-vmm/vm-1"),
            root.join("cpu,cpuacct/kiln-vmm/vm-1"),
            root.join("cpuset/kiln-vmm/vm-1")
        ]
    );
    assert_eq!(
        read(root.join("memory/kiln-vmm/vm-1/memory.limit_in_bytes")),
        "268435456"
    );
    assert_eq!(
        read(root.join("cpu,cpuacct/kiln-vmm/vm-1/cpu.shares")),
        "512"
    );
    // The cpuset cgroup and its new parent inherit mems; cpus is the one asked for.
    assert_eq!(read(root.join("cpuset/kiln-vmm/cpuset.mems")), "0");
    assert_eq!(read(root.join("cpuset/kiln-vmm/vm-1/cpuset.mems")), "0");
    assert_eq!(read(root.join("cpuset/kiln-vmm/vm-1/cpuset.cpus")), "1");

    join(&placed, &mut undo).unwrap();
    let pid = std::process::id().to_string();
    assert_eq!(read(root.join("memory/kiln-vmm/vm-1/cgroup.procs")), pid);
    assert!(undo.run().is_empty());
    assert_eq!(
        read(root.join("memory/cgroup.procs")),
        pid,
        "the undo moved the process back to where it was"
    );
    for dir in &dirs {
        assert!(!dir.exists(), "{} is removed", dir.display());
    }
    assert!(
        root.join("memory/kiln-vmm").is_dir(),
        "the shared parent stays"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_failure_part_way_removes_the_cgroups_already_made() {
    let root = tree("v1-fail");
    let hs = v1(&root);
    let mut undo = Undo::new();
    let settings = [
        setting("memory.limit_in_bytes", "1000000"),
        setting("cpu.no_such_file", "1"),
    ];
    let err = create(
        &hs,
        CgroupVersion::V1,
        "p/q",
        "vm-2",
        &settings,
        &FAKE,
        &mut undo,
    )
    .unwrap_err();
    let file = root.join("cpu,cpuacct/p/q/vm-2/cpu.no_such_file");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot write \"1\" to {}: No such file or directory (os error 2)",
            file.display()
        )
    );
    assert_eq!(undo.created().len(), 2, "both cgroups were recorded");
    assert!(undo.run().is_empty());
    assert!(!root.join("memory/p/q/vm-2").exists());
    assert!(!root.join("cpu,cpuacct/p/q/vm-2").exists());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn an_existing_cgroup_or_a_missing_controller_is_refused() {
    let root = tree("v1-refuse");
    let hs = v1(&root);
    let mut undo = Undo::new();
    let settings = [setting("memory.limit_in_bytes", "1")];
    create(
        &hs,
        CgroupVersion::V1,
        "kiln-vmm",
        "same",
        &settings,
        &FAKE,
        &mut undo,
    )
    .unwrap();
    let mut second = Undo::new();
    let err = create(
        &hs,
        CgroupVersion::V1,
        "kiln-vmm",
        "same",
        &settings,
        &FAKE,
        &mut second,
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "cgroup {} already exists",
            root.join("memory/kiln-vmm/same").display()
        )),
        "{err}"
    );
    assert!(
        second.created().is_empty(),
        "the other jail's cgroup is not ours"
    );
    let err = create(
        &hs,
        CgroupVersion::V1,
        "kiln-vmm",
        "other",
        &[setting("pids.max", "10")],
        &FAKE,
        &mut second,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "no cgroup v1 hierarchy on this host has the pids controller (for pids.max); \
         mounted: memory, cpu, cpuacct, cpuset"
    );
    assert!(undo.run().is_empty());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn v2_enables_controllers_down_to_the_parent_and_writes_the_leaf() {
    let root = tree("v2");
    let hs = v2(&root);
    let mut undo = Undo::new();
    let settings = [
        setting("memory.max", "167772160"),
        setting("pids.max", "64"),
    ];
    let placed = create(
        &hs,
        CgroupVersion::V2,
        "kiln/vms",
        "vm-3",
        &settings,
        &FAKE,
        &mut undo,
    )
    .unwrap();
    let leaf = root.join("unified/kiln/vms/vm-3");
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].dir, leaf);
    assert_eq!(read(leaf.join("memory.max")), "167772160");
    assert_eq!(read(leaf.join("pids.max")), "64");
    // The fake's subtree_control keeps the last write; the kernel's keeps them all.
    for level in ["unified", "unified/kiln", "unified/kiln/vms"] {
        assert_eq!(
            read(root.join(level).join("cgroup.subtree_control")),
            "+pids"
        );
    }
    join(&placed, &mut undo).unwrap();
    assert_eq!(
        read(leaf.join("cgroup.procs")),
        std::process::id().to_string()
    );
    assert!(undo.run().is_empty());
    assert!(!leaf.exists());
    assert!(root.join("unified/kiln/vms").is_dir());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn v2_refuses_controllers_it_does_not_offer_before_making_anything() {
    let root = tree("v2-refuse");
    let hs = v2(&root);
    let mut undo = Undo::new();
    let err = create(
        &hs,
        CgroupVersion::V2,
        "kiln-vmm",
        "vm-4",
        &[setting("hugetlb.2MB.max", "0")],
        &FAKE,
        &mut undo,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "the cgroup v2 hierarchy at {} does not offer the hugetlb controller \
             (for hugetlb.2MB.max); it offers: cpu, memory, pids",
            root.join("unified").display()
        )
    );
    assert!(!root.join("unified/kiln-vmm").exists());
    let err = create(
        &v1(&root),
        CgroupVersion::V2,
        "kiln-vmm",
        "vm-4",
        &[setting("memory.max", "1")],
        &FAKE,
        &mut undo,
    )
    .unwrap_err();
    assert!(matches!(err, CgroupError::NoV2), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn no_settings_make_no_cgroup() {
    let root = tree("none");
    let hs = v2(&root);
    let mut undo = Undo::new();
    let placed = create(
        &hs,
        CgroupVersion::V2,
        "kiln-vmm",
        "vm-5",
        &[],
        &FAKE,
        &mut undo,
    )
    .unwrap();
    assert!(placed.is_empty());
    assert!(!root.join("unified/kiln-vmm").exists());
    std::fs::remove_dir_all(&root).unwrap();
}
