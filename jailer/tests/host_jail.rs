//! kiln-jailer on the host, jailing the workspace's real kiln-vmm (see `common` for how it is
//! found) as uid:gid 123:123 under a temporary base folder with a unique id: who the VMM runs as,
//! its root, namespaces, cgroup, limits, environment and descriptors; that it reaches /dev/kvm
//! in the jail (a tiny guest boots) but no host file outside it; `--cleanup`; and that failures,
//! before and after entering the jail, leave nothing behind.

mod common;
#[path = "../../vmm/tests/common/tiny_kernel.rs"]
mod tiny_kernel;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use kiln_api::client::request;
use tiny_kernel::{Program, tiny_kernel};

/// A process in a network namespace of its own, for `--netns`.
struct Netns(std::process::Child);

impl Netns {
    fn new() -> Self {
        let mut cmd = Command::new("sleep");
        cmd.arg("120");
        // SAFETY: unshare is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        Self(
            cmd.spawn()
                .expect("start a process in a new network namespace"),
        )
    }

    fn path(&self) -> String {
        format!("/proc/{}/ns/net", self.0.id())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_jailed_vmm_is_unprivileged_rooted_namespaced_limited_and_cleaned_up() {
    require_root();
    let (id, base, _guard) = fresh("full");
    let root = jail_root(&base, &id);
    let netns = Netns::new();
    let (memory, memory_file) = memory_limit(256 << 20);
    // A descriptor the caller leaks to the jailer must not reach the VMM.
    let leaked = std::fs::File::open("/etc/hostname").expect("open a host file");
    let leaked_fd = leaked.as_raw_fd();
    let mut cmd = jailer(
        &id,
        &base,
        &[
            "--netns",
            &netns.path(),
            "--cgroup",
            &memory,
            "--resource-limit",
            "no-file=512",
            "--resource-limit",
            "fsize=1073741824",
        ],
    );
    cmd.args(["--", "--api-sock", "/api.sock"])
        .env("KILN_JAILER_TEST_SECRET", "leaks")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; it makes fd 42 a non-close-on-exec copy.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(leaked_fd, 42) == 42 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut vmm = cmd.spawn().expect("start kiln-jailer");
    let sock = root.join("api.sock");
    wait_for(&sock, Some(&mut vmm));
    let pid = vmm.id();
    let me = std::process::id().to_string();

    // Who it runs as: uid and gid 123 everywhere, no groups, no capabilities at all.
    assert_eq!(status_field(pid, "Uid"), "123 123 123 123");
    assert_eq!(status_field(pid, "Gid"), "123 123 123 123");
    assert_eq!(status_field(pid, "Groups"), "");
    for caps in ["CapPrm", "CapEff", "CapBnd", "CapAmb", "CapInh"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // Its root is the jail. readlink(/proc/PID/root) prints "/" for a process whose root is
    // in another mount namespace, so the test compares what the link resolves to instead.
    assert_eq!(
        identity(&Path::new("/proc").join(pid.to_string()).join("root")),
        identity(&root)
    );
    assert!(
        root.join("kiln-vmm").is_file(),
        "the copied binary is at /kiln-vmm"
    );
    assert_ne!(
        identity(&root.join("kiln-vmm")),
        identity(&kiln_vmm()),
        "a copy, not a link"
    );
    // Namespaces: its own mount namespace, the given network namespace, our PID namespace.
    let p = pid.to_string();
    assert_ne!(namespace(&p, "mnt"), namespace(&me, "mnt"));
    assert_eq!(
        namespace(&p, "net"),
        namespace(&netns.0.id().to_string(), "net")
    );
    assert_ne!(namespace(&p, "net"), namespace(&me, "net"));
    assert_eq!(namespace(&p, "pid"), namespace(&me, "pid"));
    // Its /proc: a procfs of the jail's own, process directories only, no setuid, devices or
    // exec; and what uid 123 sees in it is its own processes, nobody else's.
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let proc_mount = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/proc"))
        .unwrap_or_else(|| panic!("no /proc in the jail:\n{mountinfo}"));
    assert!(proc_mount.contains(" - proc proc "), "{proc_mount}");
    assert!(
        proc_mount.contains("hidepid=invisible") && proc_mount.contains("subset=pid"),
        "{proc_mount}"
    );
    let flags = proc_mount.split_whitespace().nth(5).unwrap();
    for flag in ["nosuid", "nodev", "noexec"] {
        assert!(flags.split(',').any(|f| f == flag), "{proc_mount}");
    }
    let seen = Command::new("ls")
        .arg(format!("/proc/{pid}/root/proc"))
        .uid(123)
        .gid(123)
        .output()
        .unwrap();
    assert!(seen.status.success(), "{seen:?}");
    let seen = String::from_utf8(seen.stdout).unwrap();
    let names: Vec<&str> = seen.lines().collect();
    assert!(names.contains(&p.as_str()), "{names:?}");
    assert!(names.contains(&"self"), "{names:?}");
    for hidden in ["1", me.as_str(), "sys", "kcore", "meminfo"] {
        assert!(!names.contains(&hidden), "{hidden} is visible: {names:?}");
    }
    // Its cgroup, with the limit written.
    let cgroup = memory_cgroup(&id);
    let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let wanted = format!("/kiln-vmm/{id}");
    assert!(
        membership
            .lines()
            .any(|l| l.ends_with(&wanted) && (l.contains(":memory:") || l.starts_with("0::"))),
        "{membership}"
    );
    assert_eq!(
        std::fs::read_to_string(cgroup.join(memory_file))
            .unwrap()
            .trim(),
        (256u64 << 20).to_string()
    );
    // Limits, environment, descriptors.
    assert_eq!(limit(pid, "Max open files"), ("512".into(), "512".into()));
    assert_eq!(
        limit(pid, "Max file size"),
        ("1073741824".into(), "1073741824".into())
    );
    assert_eq!(std::fs::read(format!("/proc/{pid}/environ")).unwrap(), b"");
    assert!(
        !Path::new(&format!("/proc/{pid}/fd/42")).exists(),
        "the leaked descriptor was closed"
    );
    drop(leaked);

    // The devices, owned by the VMM's ids.
    for dev in ["dev/kvm", "dev/net/tun", "dev/urandom"] {
        let meta = std::fs::metadata(root.join(dev)).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (UID, GID, 0o600),
            "{dev}"
        );
    }

    // A host file outside the jail does not exist for the VMM.
    let outside = base.join("echo.elf");
    std::fs::write(&outside, tiny_kernel(Program::Echo3, false)).unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
    let call = |method: &str, path: &str, body: Option<&str>| {
        request(&sock, method, path, body).expect("API call")
    };
    let boot =
        |path: &str| format!(r#"{{"kernel_image_path": "{path}", "boot_args": "console=ttyS0"}}"#);
    let (code, fault) = call(
        "PUT",
        "/boot-source",
        Some(&boot(outside.to_str().unwrap())),
    );
    assert_eq!(code, 400, "{fault}");
    assert!(
        fault.contains(outside.to_str().unwrap()) && fault.contains("No such file"),
        "the fault names the file the jail hides: {fault}"
    );
    let (code, fault) = call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(code, 400);
    assert!(fault.contains("boot-source is not set"), "{fault}");

    // As under Firecracker's jailer, the VMM got the jail's id and the jailer's start times
    // ahead of the caller's arguments (exec'd in place: its CPU clock goes on, no parent time).
    let (code, info) = call("GET", "/", None);
    assert_eq!(code, 200);
    assert!(info.contains(&format!(r#""id":"{id}""#)), "{info}");
    let argv = cmdline(pid);
    assert_eq!(argv[1..3], ["--id", id.as_str()], "{argv:?}");
    assert_eq!(argv[3], "--start-time-us", "{argv:?}");
    assert!(argv[4].parse::<u64>().unwrap() > 0, "{argv:?}");
    assert_eq!(argv[5], "--start-time-cpu-us", "{argv:?}");
    assert!(argv[6].parse::<u64>().is_ok(), "{argv:?}");
    assert_eq!(argv[7..9], ["--parent-cpu-time-us", "0"], "{argv:?}");
    assert_eq!(argv[9..], ["--api-sock", "/api.sock"], "{argv:?}");

    // --cleanup refuses while the VMM runs.
    let refused = cleanup(&id, &base);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr).contains(&format!("still holds process(es) {pid}")),
        "{}",
        text(&refused.stderr)
    );
    assert!(root.is_dir());

    // The same kernel inside the jail boots: /dev/kvm works for uid 123 in the jail.
    std::fs::copy(&outside, root.join("echo.elf")).unwrap();
    assert_eq!(call("PUT", "/boot-source", Some(&boot("/echo.elf"))).0, 204);
    let machine = r#"{"vcpu_count": 1, "mem_size_mib": 32}"#;
    assert_eq!(call("PUT", "/machine-config", Some(machine)).0, 204);
    let (code, fault) = call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(code, 204, "{fault}");
    vmm.stdin.take().unwrap().write_all(b"xyz").unwrap();
    let status = wait_exit(&mut vmm);
    let mut out = String::new();
    vmm.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let mut err = String::new();
    vmm.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(out, "xyz", "the guest echoed its input; stderr: {err}");
    assert_eq!(
        status.code(),
        Some(0),
        "the VMM's status is the jailer's: {err}"
    );

    let done = cleanup(&id, &base);
    assert_eq!(done.status.code(), Some(0), "{}", text(&done.stderr));
    assert_eq!(
        text(&done.stdout),
        format!(
            "removed {}\nremoved {}\n",
            base.join("kiln-vmm").join(&id).display(),
            cgroup.display()
        )
    );
    assert!(!base.join("kiln-vmm").join(&id).exists());
    assert!(!cgroup.exists());
    let again = cleanup(&id, &base);
    assert_eq!(again.status.code(), Some(0));
    assert!(
        text(&again.stderr).contains("nothing to clean up"),
        "{}",
        text(&again.stderr)
    );
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn with_a_new_pid_namespace_the_jailer_waits_and_ends_as_the_vmm_did() {
    require_root();
    let (id, base, _guard) = fresh("pidns");
    let root = jail_root(&base, &id);
    let (memory, _) = memory_limit(128 << 20);
    let mut jailer = jailer(&id, &base, &["--new-pid-ns", "--cgroup", &memory])
        .args(["--", "--api-sock", "/api.sock"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln-jailer");
    wait_for(&root.join("api.sock"), Some(&mut jailer));
    let pid_file = std::fs::read_to_string(root.join("kiln-vmm.pid")).unwrap();
    let vmm: u32 = pid_file.trim().parse().expect("a PID in kiln-vmm.pid");
    assert_ne!(vmm, jailer.id());
    assert_eq!(status_field(vmm, "PPid"), jailer.id().to_string());
    assert_eq!(
        status_field(vmm, "NSpid"),
        format!("{vmm} 1"),
        "init of its namespace"
    );
    let me = std::process::id().to_string();
    assert_ne!(namespace(&vmm.to_string(), "pid"), namespace(&me, "pid"));
    assert_ne!(namespace(&vmm.to_string(), "mnt"), namespace(&me, "mnt"));
    assert_eq!(status_field(vmm, "Uid"), "123 123 123 123");
    assert_eq!(status_field(vmm, "CapEff"), "0000000000000000");
    // Forked, the VMM's CPU clock started at zero: the jailer's CPU time is its parent's.
    let argv = cmdline(vmm);
    assert_eq!(argv[5..7], ["--start-time-cpu-us", "0"], "{argv:?}");
    assert_eq!(argv[7], "--parent-cpu-time-us", "{argv:?}");
    assert!(argv[8].parse::<u64>().unwrap() > 0, "{argv:?}");
    // The waiting jailer is still root, in the VMM's cgroup; the VMM dies, so does it, the same way.
    // SAFETY: kill on a process this test started (through the jailer).
    unsafe { libc::kill(vmm as i32, libc::SIGKILL) };
    let status = wait_exit(&mut jailer);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    let done = cleanup(&id, &base);
    assert_eq!(done.status.code(), Some(0), "{}", text(&done.stderr));
    assert!(!base.join("kiln-vmm").join(&id).exists() && !memory_cgroup(&id).exists());
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn daemonized_in_a_new_pid_namespace_the_jailer_returns_once_the_vmm_runs() {
    require_root();
    let (id, base, _guard) = fresh("daemon");
    let root = jail_root(&base, &id);
    let (memory, _) = memory_limit(128 << 20);
    let mut jailer = jailer(
        &id,
        &base,
        &["--new-pid-ns", "--daemonize", "--cgroup", &memory],
    )
    .args(["--", "--api-sock", "/api.sock"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start kiln-jailer");
    let status = wait_exit(&mut jailer);
    let mut err = String::new();
    jailer
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    let vmm: u32 = std::fs::read_to_string(root.join("kiln-vmm.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{vmm}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
    assert_eq!(
        fields[3],
        vmm.to_string(),
        "it leads its own session: {stat}"
    );
    for fd in 0..=2 {
        assert_eq!(
            std::fs::read_link(format!("/proc/{vmm}/fd/{fd}")).unwrap(),
            Path::new("/dev/null")
        );
    }
    wait_for(&root.join("api.sock"), None);
    let refused = cleanup(&id, &base);
    assert_eq!(refused.status.code(), Some(1));
    // SAFETY: kill on the VMM this test started.
    unsafe { libc::kill(vmm as i32, libc::SIGKILL) };
    wait_empty(&memory_cgroup(&id));
    let done = cleanup(&id, &base);
    assert_eq!(done.status.code(), Some(0), "{}", text(&done.stderr));
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn failures_name_the_step_and_leave_no_jail_or_cgroup() {
    require_root();
    // In the cgroup step, on the host.
    let (id, base, _guard) = fresh("fail-cgroup");
    let out = jailer(&id, &base, &["--cgroup", "memory.no_such_file=1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let cgroup = memory_cgroup(&id);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        format!(
            "kiln-jailer: cgroups: cannot write \"1\" to {}: No such file or directory (os error 2)\n",
            cgroup.join("memory.no_such_file").display()
        )
    );
    assert!(!base.join("kiln-vmm").join(&id).exists(), "no jail is left");
    assert!(!cgroup.exists(), "no cgroup is left");
    std::fs::remove_dir_all(&base).unwrap();

    // Inside the jail, after pivot_root: --daemonize's setsid fails for a process group leader.
    let (id, base, _guard) = fresh("fail-inside");
    let (memory, _) = memory_limit(64 << 20);
    let out = jailer(&id, &base, &["--daemonize", "--cgroup", &memory])
        .process_group(0)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("kiln-jailer: daemonize: --daemonize: setsid failed"),
        "{err}"
    );
    assert_eq!(
        err.lines().count(),
        1,
        "the cleanup had nothing to complain about: {err}"
    );
    assert!(!base.join("kiln-vmm").join(&id).exists(), "no jail is left");
    assert!(!memory_cgroup(&id).exists(), "no cgroup is left");
    std::fs::remove_dir_all(&base).unwrap();

    // Bad input: status 2, nothing built.
    let (id, base, _guard) = fresh("fail-input");
    let out = jailer(&id, &base, &["--resource-limit", "cpu=1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "kiln-jailer: command line: --resource-limit \"cpu=1\": the resource must be no-file or fsize\n"
    );
    assert!(!base.exists());
    let _ = std::fs::remove_dir_all(&base);
}

/// A process's command line.
fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .expect("read the VMM's command line")
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}
