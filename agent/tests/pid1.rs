//! The agent as PID 1, on the host: `unshare` gives it fresh PID, mount, UTS, IPC and network
//! namespaces, so its mounts, hostname and loopback change nothing outside. Checks what init
//! sets up and that orphans are reaped. (Shutdown is not run here: it remounts the root
//! read-only, which would reach the host's root filesystem. The lab covers it.)

mod common;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use kiln_agent::client;
use kiln_agent::protocol::{ExecSpec, ExitStatus};

struct Pid1 {
    child: Child,
    dir: PathBuf,
}

impl Drop for Pid1 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn pid1_sets_up_the_guest_and_reaps_orphans() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("unshare").arg("--help").output().is_err() {
        eprintln!("skipped: needs root and unshare");
        return;
    }
    // Not under /tmp, /run or /dev: the agent mounts fresh filesystems there.
    let dir = PathBuf::from(format!("/var/tmp/kiln-agent-pid1-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("agent.sock");
    let child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
        ])
        .arg(common::agent_bin())
        .arg(format!("--listen=unix:{}", sock.display()))
        // Not the host's zram, swappiness or huge pages: this is PID 1 of a namespace only.
        .env("KILN_AGENT_NO_MEMORY_SETUP", "1")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Pid1 {
        child,
        dir: dir.clone(),
    };
    let end = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&sock).is_err() {
        if Instant::now() > end {
            eprintln!("skipped: the agent did not come up in new namespaces (restricted host?)");
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let c = client::connect_unix(&sock).unwrap();
    let script = r#"
        echo "pid1=$(cat /proc/1/comm)"
        echo "host=$(hostname)"
        echo "lo=$(cat /sys/class/net/lo/flags)"
        for m in /proc /sys /dev /dev/pts /dev/shm /tmp /run; do
            grep -q " $m " /proc/mounts && echo "mounted $m"
        done
        test -w /tmp && test -c /dev/null && test -e /dev/ptmx && echo devices
        test -L /dev/fd && echo fd-link
    "#;
    let out = c.run(ExecSpec::new(["sh", "-c", script])).unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status, ExitStatus::Exited(0), "{text}");
    let expected = "pid1=kiln-agent\nhost=kiln\nlo=0x9\nmounted /proc\nmounted /sys\nmounted /dev\n\
         mounted /dev/pts\nmounted /dev/shm\nmounted /tmp\nmounted /run\ndevices\nfd-link\n";
    assert_eq!(text, expected);

    // A tty works on the fresh devpts.
    let out = c
        .run(ExecSpec {
            tty: Some(kiln_agent::protocol::TtySize { rows: 5, cols: 7 }),
            ..ExecSpec::new(["stty", "size"])
        })
        .unwrap();
    assert_eq!(out.stdout, b"5 7\r\n");

    // Orphans become PID 1's children and must not stay zombies.
    let out = c
        .run(ExecSpec::new([
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do sleep 0.1 & done; exit 0",
        ]))
        .unwrap();
    assert_eq!(out.status, ExitStatus::Exited(0));
    thread::sleep(Duration::from_millis(500));
    let zombies = "for s in /proc/[0-9]*/stat; do read -r l < $s && case ${l##*) } in Z*) echo $l;; esac; done";
    let out = c.run(ExecSpec::new(["sh", "-c", zombies])).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "", "zombies left");
}
