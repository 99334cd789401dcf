//! kiln-jailer end to end, inside the nested lab: the lab's release kiln-vmm, jailed as 123:123,
//! boots the Debian rootfs and its agent answers through the jail's vsock socket; and the jail's
//! cgroup memory limit holds: a guest that touches more memory than the limit gets its VMM
//! killed by the OOM killer, and L1 goes on.
//!
//! L1 runs from an initramfs whose init mounts cgroup2 at /sys/fs/cgroup (the jailer picks v2 as
//! no v1 controller is mounted there). The kernel and rootfs are hard-linked into the jail (the
//! jail's base is on the same filesystem, /kiln), as a Firecracker user would.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_agent::client::wait_ready;
use kiln_agent::protocol::{ExecSpec, ExitStatus};
use kiln_api::client::request;
use kiln_tests::{guest_kernel, lab_dir, rootfs, wait_with_deadline};

/// The agent as init on the read-only rootfs with a tmpfs overlay, as `kiln run` boots it.
const AGENT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet init=/usr/sbin/kiln-agent KILN_OVERLAY=tmpfs";
/// The cgroup v2 root L1's init mounts.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// An executable on PATH (the lab's /kiln/bin holds the workspace's release binaries).
fn on_path(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not on PATH: lab tests run inside `cargo xtask lab`"))
}

/// Where jails go: on /kiln, so the kernel and rootfs can be hard-linked in.
fn jail_base(name: &str) -> PathBuf {
    let base = lab_dir().join(format!("jails-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    base
}

/// A jailed kiln-vmm waiting on its API socket, and where its jail is.
struct Jailed {
    jailer: Child,
    id: String,
    base: PathBuf,
    root: PathBuf,
}

impl Jailed {
    /// Starts kiln-jailer with `flags` and `--api-sock /api.sock` for the VMM.
    fn start(name: &str, flags: &[&str]) -> Self {
        let cgroups = Path::new(CGROUP_ROOT).join("cgroup.controllers");
        let controllers = std::fs::read_to_string(&cgroups).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (the lab's init mounts cgroup2 there)",
                cgroups.display()
            )
        });
        assert!(
            controllers.split_whitespace().any(|c| c == "memory"),
            "{controllers}"
        );
        let id = format!("lab-{name}");
        let base = jail_base(name);
        let root = base.join("kiln-vmm").join(&id).join("root");
        let jailer = Command::new(on_path("kiln-jailer"))
            .args(["--id", &id, "--exec-file"])
            .arg(on_path("kiln-vmm"))
            .args(["--uid", "123", "--gid", "123", "--chroot-base-dir"])
            .arg(&base)
            .args(flags)
            .args(["--", "--api-sock", "/api.sock"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kiln-jailer");
        let mut jailed = Self {
            jailer,
            id,
            base,
            root,
        };
        let sock = jailed.root.join("api.sock");
        let start = Instant::now();
        while !sock.exists() {
            if let Some(status) = jailed.jailer.try_wait().expect("poll kiln-jailer") {
                panic!("kiln-jailer ended ({status}): {}", jailed.output().1);
            }
            assert!(start.elapsed() < Duration::from_secs(60), "no API socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        jailed
    }

    /// Hard-links the kernel and rootfs into the jail and boots them with `mem_mib` over the API.
    fn boot(&self, mem_mib: u32) {
        for (host, name) in [(guest_kernel(), "vmlinux"), (rootfs(), "rootfs.ext4")] {
            std::fs::hard_link(&host, self.root.join(name))
                .unwrap_or_else(|e| panic!("link {} into the jail: {e}", host.display()));
        }
        let sock = self.root.join("api.sock");
        let put = |path: &str, body: String| {
            let (code, answer) = request(&sock, "PUT", path, Some(&body)).expect("API call");
            assert_eq!(code, 204, "PUT {path} {body}: {answer}");
        };
        put(
            "/boot-source",
            format!(r#"{{"kernel_image_path": "/vmlinux", "boot_args": "{AGENT_CMDLINE}"}}"#),
        );
        put(
            "/machine-config",
            format!(r#"{{"vcpu_count": 1, "mem_size_mib": {mem_mib}}}"#),
        );
        put(
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": true, "is_read_only": true}"#.into(),
        );
        put(
            "/vsock",
            r#"{"guest_cid": 3, "uds_path": "/v.sock"}"#.into(),
        );
        put("/actions", r#"{"action_type": "InstanceStart"}"#.into());
    }

    /// What the jailer (the VMM's console included) printed: (stdout, stderr).
    fn output(&mut self) -> (String, String) {
        let mut out = String::new();
        let mut err = String::new();
        self.jailer
            .stdout
            .take()
            .map(|mut o| o.read_to_string(&mut out));
        self.jailer
            .stderr
            .take()
            .map(|mut e| e.read_to_string(&mut err));
        (out, err)
    }

    /// `kiln-jailer --cleanup` for this jail; asserts it worked and removed it.
    fn clean_up(&self) {
        let out = Command::new(on_path("kiln-jailer"))
            .args(["--cleanup", "--id", &self.id, "--chroot-base-dir"])
            .arg(&self.base)
            .output()
            .expect("run kiln-jailer --cleanup");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!self.root.exists(), "the jail is gone");
        assert!(
            !Path::new(CGROUP_ROOT)
                .join("kiln-vmm")
                .join(&self.id)
                .exists(),
            "the cgroup is gone"
        );
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn a_jailed_vmm_boots_linux_and_the_agent_answers_through_the_jail() {
    let mut vm = Jailed::start(
        "boot",
        &["--new-pid-ns", "--cgroup", "memory.max=1073741824"],
    );
    vm.boot(256);
    let client = wait_ready(
        vm.root.join("v.sock"),
        Instant::now() + Duration::from_secs(180),
    )
    .unwrap_or_else(|e| panic!("the agent never answered: {e}; {:?}", vm.output()));
    let out = client
        .run(ExecSpec::new(["sh", "-c", "echo jailed; id -u"]))
        .expect("the agent runs a command");
    assert_eq!(out.status, ExitStatus::Exited(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "jailed\n0\n");
    let vmm: u32 = std::fs::read_to_string(vm.root.join("kiln-vmm.pid"))
        .expect("the jailer wrote the VMM's PID")
        .trim()
        .parse()
        .expect("a PID");
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
    assert!(
        status.lines().any(|l| l
            .split_whitespace()
            .eq(["Uid:", "123", "123", "123", "123"])),
        "{status}"
    );
    client.shutdown().expect("shutdown");
    let (status, timed_out) =
        wait_with_deadline(&mut vm.jailer, Duration::from_secs(60)).expect("wait for the VMM");
    assert!(
        !timed_out,
        "the VMM did not stop after the guest powered off"
    );
    assert_eq!(status.code(), Some(0), "{:?}", vm.output());
    vm.clean_up();
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn the_jail_cgroup_memory_limit_oom_kills_the_vmm_and_the_lab_survives() {
    use std::os::unix::process::ExitStatusExt;
    let limit: u64 = 160 << 20;
    let mut vm = Jailed::start("oom", &["--cgroup", &format!("memory.max={limit}")]);
    let cgroup = Path::new(CGROUP_ROOT).join("kiln-vmm").join(&vm.id);
    assert_eq!(
        std::fs::read_to_string(cgroup.join("memory.max"))
            .unwrap()
            .trim(),
        limit.to_string()
    );
    vm.boot(256);
    let client = wait_ready(
        vm.root.join("v.sock"),
        Instant::now() + Duration::from_secs(180),
    )
    .unwrap_or_else(|e| panic!("the agent never answered: {e}; {:?}", vm.output()));
    // 220 MiB of bytes written one by one: every page of it is touched.
    let hog = ExecSpec::new(["python3", "-c", "x = b'k' * (220 << 20); print(len(x))"]);
    let runner = std::thread::spawn(move || client.run(hog));
    let (status, timed_out) =
        wait_with_deadline(&mut vm.jailer, Duration::from_secs(300)).expect("wait for the VMM");
    let (console, err) = vm.output();
    assert!(
        !timed_out,
        "the VMM outlived its memory limit; console:\n{console}\n{err}"
    );
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{status}; console:\n{console}\nstderr:\n{err}"
    );
    let events = std::fs::read_to_string(cgroup.join("memory.events")).unwrap();
    let oom_kills: u64 = events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(oom_kills >= 1, "the OOM killer did it: {events}");
    let answer = runner.join().expect("the exec thread");
    assert!(answer.is_err(), "the command never finished: {answer:?}");
    // L1 is fine: it still runs programs and has its memory.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    assert!(meminfo.starts_with("MemTotal:"), "{meminfo}");
    assert!(Command::new("true").status().unwrap().success());
    vm.clean_up();
}
