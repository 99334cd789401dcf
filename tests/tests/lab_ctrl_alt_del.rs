//! Ctrl-Alt-Del from the API, inside the nested lab: `PUT /actions SendCtrlAltDel` goes through
//! Kiln's i8042 to the guest kernel's keyboard driver, which sends SIGINT to the agent as PID 1;
//! the agent syncs, unmounts and reboots, and kiln-vmm exits 0. A file written just before, on a
//! filesystem whose journal would not commit it for minutes, is on the disk afterwards: the
//! kernel's own Ctrl-Alt-Del (an immediate restart) would have lost it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_agent::client::{Client, wait_ready};
use kiln_tests::{ApiVmm, kiln_vmm_rootfs, rootfs, sh};

/// The command line `kiln run` boots with: the agent as init over a tmpfs overlay.
const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet init=/usr/sbin/kiln-agent KILN_OVERLAY=tmpfs";
const AGENT_WAIT: Duration = Duration::from_secs(120);
/// From the key press to kiln-vmm's exit.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(60);
/// What the guest writes to the scratch disk before the key press.
const NOTE: &str = "written-before-ctrl-alt-del";

/// A kiln-vmm with the rootfs, the scratch disk as /dev/vdb, an API socket and vsock.
struct LabVm {
    vm: ApiVmm,
    uds: PathBuf,
    console: PathBuf,
}

impl LabVm {
    fn boot(dir: &Path, name: &str, scratch: &Path) -> Self {
        let path = |ext: &str| dir.join(format!("{name}.{ext}"));
        let (sock, uds, console) = (path("api"), path("vsock"), path("console"));
        let mut cmd = kiln_vmm_rootfs(&rootfs(), true, &uds, 256, CMDLINE);
        cmd.arg("--drive")
            .arg(format!("id=scratch,path={}", scratch.display()))
            .arg("--serial-out")
            .arg(&console);
        Self {
            vm: ApiVmm::start(cmd, &sock),
            uds,
            console,
        }
    }

    fn agent(&self) -> Client {
        wait_ready(&self.uds, Instant::now() + AGENT_WAIT).expect("the agent answers")
    }
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn ctrl_alt_del_shuts_the_guest_down_cleanly_and_kiln_vmm_exits_0() {
    let dir = std::env::temp_dir().join(format!("kiln-cad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let scratch = dir.join("scratch.img");
    std::fs::File::create(&scratch)
        .and_then(|f| f.set_len(32 << 20))
        .expect("create the scratch disk");

    let vm = LabVm::boot(&dir, "first", &scratch);
    let client = vm.agent();
    // commit=600: ext4 would keep the file in the journal's memory for ten minutes; only a sync
    // (or an unmount) puts it on the disk before the VM ends.
    sh(
        &client,
        &format!(
            "mkfs.ext4 -q /dev/vdb && mount -o commit=600 /dev/vdb /mnt && echo {NOTE} > /mnt/note"
        ),
    );
    let pressed = Instant::now();
    vm.vm
        .ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let end = vm.vm.finish(SHUTDOWN_LIMIT);
    let (status, timed_out) = (end.status, end.timed_out);
    let console = std::fs::read_to_string(&vm.console).unwrap_or_default();
    assert!(
        !timed_out,
        "kiln-vmm still ran {SHUTDOWN_LIMIT:?} after Ctrl-Alt-Del; console:\n{console}"
    );
    eprintln!("Ctrl-Alt-Del to kiln-vmm's exit: {:?}", pressed.elapsed());
    assert_eq!(status.code(), Some(0), "console:\n{console}");
    assert!(
        console.contains("kiln-agent: Ctrl-Alt-Del: shutting down"),
        "the agent shut down, not the kernel's immediate restart; console:\n{console}"
    );
    drop(client);

    // A new VM finds the file on the scratch disk.
    let vm = LabVm::boot(&dir, "second", &scratch);
    let client = vm.agent();
    assert_eq!(
        sh(&client, "mount /dev/vdb /mnt && cat /mnt/note"),
        format!("{NOTE}\n")
    );
}
