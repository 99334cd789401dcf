//! Every bad command line gets an error naming the flag and the value.

use super::*;

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A command line that parses and validates: /bin/sh stands in for the VMM.
const GOOD: &[&str] = &[
    "--id",
    "vm-1",
    "--exec-file",
    "/bin/sh",
    "--uid",
    "123",
    "--gid",
    "124",
];

fn with(extra: &[&str]) -> Vec<String> {
    let mut a = args(GOOD);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn jail(list: Vec<String>) -> Result<JailArgs, ArgsError> {
    match parse(&list)? {
        Command::Jail(j) => j.validate().map(|()| j),
        other => panic!("not a jail command: {other:?}"),
    }
}

fn message(list: Vec<String>) -> String {
    jail(list).unwrap_err().to_string()
}

#[test]
fn a_full_command_line_parses_into_typed_values() {
    let j = jail(with(&[
        "--chroot-base-dir",
        "/tmp/jails",
        "--cgroup-version=2",
        "--cgroup",
        "memory.max=256M",
        "--cgroup=cpu.max=50000 100000",
        "--parent-cgroup",
        "kiln/vms",
        "--resource-limit",
        "no-file=512",
        "--resource-limit",
        "fsize=1048576",
        "--new-pid-ns",
        "--daemonize",
        "--",
        "--api-sock",
        "/api.sock",
        "--",
    ]))
    .unwrap();
    assert_eq!(j.id, "vm-1");
    assert_eq!((j.uid, j.gid), (123, 124));
    assert_eq!(j.exec_name(), "sh");
    assert_eq!(j.chroot_base, PathBuf::from("/tmp/jails"));
    assert_eq!(j.cgroup_version, Some(CgroupVersion::V2));
    assert_eq!(
        j.cgroups[1],
        CgroupSetting {
            controller: "cpu".into(),
            file: "cpu.max".into(),
            value: "50000 100000".into()
        }
    );
    assert_eq!(j.parent_cgroup(), "kiln/vms");
    assert_eq!(
        j.limits,
        [ResourceLimit::NoFile(512), ResourceLimit::FileSize(1048576)]
    );
    assert!(j.new_pid_ns && j.daemonize);
    assert_eq!(j.vmm_args, ["--api-sock", "/api.sock", "--"]);
}

#[test]
fn defaults_follow_firecracker() {
    let j = jail(args(GOOD)).unwrap();
    assert_eq!(j.chroot_base, PathBuf::from("/srv/jailer"));
    assert_eq!(
        j.parent_cgroup(),
        "sh",
        "the parent cgroup is the exec name"
    );
    assert_eq!(j.cgroup_version, None);
    assert!(j.cgroups.is_empty() && j.limits.is_empty() && j.vmm_args.is_empty());
}

#[test]
fn bad_ids_are_named() {
    let id = |id: &str| {
        let mut a = args(GOOD);
        a[1] = id.to_string();
        message(a)
    };
    assert_eq!(
        id("vm_1"),
        "--id \"vm_1\" holds '_'; an id is letters, digits and '-'"
    );
    assert_eq!(
        id("../x"),
        "--id \"../x\" holds '.'; an id is letters, digits and '-'"
    );
    assert_eq!(
        id("vm 1"),
        "--id \"vm 1\" holds ' '; an id is letters, digits and '-'"
    );
    assert_eq!(id(""), "--id \"\" is empty");
    let long = "a".repeat(65);
    assert_eq!(
        id(&long),
        format!("--id \"{long}\" is 65 characters long; at most 64")
    );
    assert!(
        jail({
            let mut a = args(GOOD);
            a[1] = "a".repeat(64);
            a
        })
        .is_ok()
    );
}

#[test]
fn files_must_exist_and_paths_be_absolute() {
    let exec = |path: &str| {
        let mut a = args(GOOD);
        a[3] = path.to_string();
        message(a)
    };
    assert_eq!(
        exec("/nonexistent/kiln-vmm"),
        "--exec-file /nonexistent/kiln-vmm: No such file or directory (os error 2)"
    );
    assert_eq!(
        exec("bin/kiln-vmm"),
        "--exec-file bin/kiln-vmm is not an absolute path"
    );
    assert_eq!(exec("/tmp"), "--exec-file /tmp is not a regular file");
    assert_eq!(
        message(with(&["--chroot-base-dir", "jails"])),
        "--chroot-base-dir jails is not an absolute path"
    );
    assert_eq!(
        message(with(&["--netns", "netns/x"])),
        "--netns netns/x is not an absolute path"
    );
    assert_eq!(
        message(with(&["--netns", "/var/run/netns/nonexistent-kiln"])),
        "--netns /var/run/netns/nonexistent-kiln: No such file or directory (os error 2)"
    );
}

#[test]
fn bad_cgroup_settings_are_named() {
    let cg = |v: &str| message(with(&["--cgroup", v]));
    assert_eq!(
        cg("memory.max"),
        "--cgroup \"memory.max\": is not FILE=VALUE"
    );
    assert_eq!(
        cg("memory=1"),
        "--cgroup \"memory=1\": FILE must be <controller>.<name>, e.g. memory.max"
    );
    let charset = "FILE must be <controller>.<name> in lowercase letters, digits, '_' and '.'";
    assert_eq!(
        cg("../memory.max=1"),
        format!("--cgroup \"../memory.max=1\": {charset}")
    );
    assert_eq!(
        cg("memory./max=1"),
        format!("--cgroup \"memory./max=1\": {charset}")
    );
    assert_eq!(cg(".max=1"), format!("--cgroup \".max=1\": {charset}"));
    assert_eq!(
        cg("memory.max="),
        "--cgroup \"memory.max=\": VALUE is empty"
    );
    assert_eq!(
        cg("memory.max=1\n2"),
        "--cgroup \"memory.max=1\\n2\": VALUE holds a newline or NUL"
    );
    assert_eq!(
        message(with(&[
            "--cgroup",
            "memory.max=1",
            "--cgroup",
            "memory.max=2"
        ])),
        "--cgroup memory.max is given twice"
    );
    assert_eq!(
        message(with(&["--cgroup-version", "3"])),
        "--cgroup-version \"3\" is not 1 or 2"
    );
    let parent = |p: &str| message(with(&["--parent-cgroup", p]));
    assert_eq!(
        parent("/abs"),
        "--parent-cgroup \"/abs\" must be relative to the cgroup root"
    );
    assert_eq!(
        parent("a/../b"),
        "--parent-cgroup \"a/../b\" must be names separated by '/', without '.' or '..'"
    );
    assert_eq!(
        parent("a b"),
        "--parent-cgroup \"a b\" may hold only letters, digits, '-', '_', '.' and '/'"
    );
}

#[test]
fn bad_resource_limits_are_named() {
    let rl = |v: &str| message(with(&["--resource-limit", v]));
    assert_eq!(
        rl("no-file"),
        "--resource-limit \"no-file\": is not no-file=N or fsize=N"
    );
    assert_eq!(
        rl("nofile=10"),
        "--resource-limit \"nofile=10\": the resource must be no-file or fsize"
    );
    assert_eq!(
        rl("fsize=-1"),
        "--resource-limit \"fsize=-1\": N is not a non-negative number"
    );
    assert_eq!(
        rl("fsize=lots"),
        "--resource-limit \"fsize=lots\": N is not a non-negative number"
    );
    assert_eq!(
        message(with(&[
            "--resource-limit",
            "fsize=1",
            "--resource-limit",
            "fsize=2"
        ])),
        "--resource-limit fsize is given twice"
    );
}

#[test]
fn unknown_missing_and_repeated_flags_are_named() {
    assert_eq!(message(with(&["--bogus"])), "unknown option --bogus");
    assert_eq!(
        message(with(&["--daemonize=yes"])),
        "unknown option --daemonize=..."
    );
    assert_eq!(
        message(with(&["stray"])),
        "unexpected argument \"stray\"; arguments for the VMM go after --"
    );
    assert_eq!(message(with(&["--netns"])), "--netns needs a value");
    assert_eq!(message(with(&["--uid", "5"])), "--uid is given twice");
    assert_eq!(
        message(with(&["--new-pid-ns", "--new-pid-ns"])),
        "--new-pid-ns is given twice"
    );
    assert_eq!(
        message(args(&["--id", "x", "--exec-file", "/bin/sh", "--uid", "1"])),
        "--gid is required"
    );
    assert_eq!(
        message(args(&["--exec-file", "/bin/sh"])),
        "--id is required"
    );
    assert_eq!(message(args(&["--id", "x"])), "--exec-file is required");
    let mut a = args(GOOD);
    a[5] = "12x".into();
    assert_eq!(message(a), "--uid \"12x\" is not a number");
    let mut a = args(GOOD);
    a[5] = "0".into();
    assert_eq!(
        message(a),
        "--uid 0 would leave the jailed process root; pick an unprivileged id"
    );
    assert_eq!(
        message(with(&["--exec-name", "x"])),
        "--exec-name is for --cleanup; a jail takes --exec-file"
    );
}

#[test]
fn cleanup_takes_only_what_names_a_jail() {
    let cleanup = |list: &[&str]| match parse(&args(list)) {
        Ok(Command::Cleanup(c)) => c.validate().map(|()| c),
        Ok(other) => panic!("not a cleanup: {other:?}"),
        Err(e) => Err(e),
    };
    let c = cleanup(&["--cleanup", "--id", "vm-1"]).unwrap();
    assert_eq!(c.exec_name, "kiln-vmm");
    assert_eq!(c.parent_cgroup(), "kiln-vmm");
    assert_eq!(c.chroot_base, PathBuf::from("/srv/jailer"));
    let c = cleanup(&["--cleanup", "--id", "vm-1", "--exec-file", "/x/vmm"]).unwrap();
    assert_eq!(c.exec_name, "vmm", "the exec file need not exist any more");
    let c = cleanup(&[
        "--cleanup",
        "--id",
        "vm-1",
        "--exec-name",
        "vmm",
        "--cgroup-version",
        "1",
        "--parent-cgroup",
        "p",
    ])
    .unwrap();
    assert_eq!(
        (c.cgroup_version, c.parent_cgroup()),
        (Some(CgroupVersion::V1), "p".into())
    );

    let err = |list: &[&str]| cleanup(list).unwrap_err().to_string();
    assert_eq!(err(&["--cleanup"]), "--id is required");
    assert_eq!(
        err(&["--cleanup", "--id", "a", "--uid", "1"]),
        "--uid does not apply to --cleanup"
    );
    assert_eq!(
        err(&["--cleanup", "--id", "a", "--", "x"]),
        "-- does not apply to --cleanup"
    );
    assert_eq!(
        err(&[
            "--cleanup",
            "--id",
            "a",
            "--exec-name",
            "x",
            "--exec-file",
            "/x"
        ]),
        "--exec-name and --exec-file both name the jail; give one"
    );
    assert_eq!(
        err(&["--cleanup", "--id", "a", "--exec-name", ".."]),
        "--exec-name \"..\" does not name a file"
    );
    assert_eq!(
        err(&["--cleanup", "--id", "a/b"]),
        "--id \"a/b\" holds '/'; an id is letters, digits and '-'"
    );
}

#[test]
fn help_and_version_win() {
    assert_eq!(parse(&args(&["--bogus", "--help"])).ok(), None);
    assert_eq!(parse(&args(&["--help", "--bogus"])), Ok(Command::Help));
    assert_eq!(parse(&args(&["-V"])), Ok(Command::Version));
}

#[test]
fn the_flags_the_jailer_passes_itself_are_refused_after_the_separator() {
    for extra in [
        &["--", "--id", "other"][..],
        &["--", "--api-sock", "/a", "--start-time-us", "1"],
        &["--", "--start-time-cpu-us=0"],
        &["--", "--parent-cpu-time-us", "5"],
    ] {
        let flag = extra[1..]
            .iter()
            .find(|a| a.starts_with("--") && *a != &"--api-sock")
            .unwrap();
        assert_eq!(
            message(with(extra)),
            format!(
                "{flag} after --: kiln-jailer passes --id and the start times to the VMM itself, as Firecracker's jailer does"
            )
        );
    }
    // The jailer does not know kiln-vmm's flags, so a word that is exactly one of them is
    // refused even as another flag's value; one that only contains it is not.
    assert!(jail(with(&["--", "--serial-out", "--id"])).is_err());
    assert!(jail(with(&["--", "--api-sock", "/run/--id.sock"])).is_ok());
}
