//! Starting a VMM (jailed or not, in its network's namespace) and adopting one a previous kilnd
//! started.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{API_WAIT, Proc, VmError, VmProcess};
use crate::jail::{Launcher, Limits};
use crate::net::VmNet;

impl VmProcess {
    /// Starts `kiln-vmm --api-sock` for a VM whose folder is `dir` (created if needed), under the
    /// jailer with `limits` unless the launcher runs VMMs unjailed, in `net`'s namespace when it
    /// has one, and waits until the socket answers. `net` goes with the VM, failures included.
    pub fn spawn(
        launcher: &Launcher,
        dir: &Path,
        limits: Limits,
        net: VmNet,
    ) -> Result<VmProcess, VmError> {
        std::fs::create_dir_all(dir).map_err(|err| VmError::File {
            path: dir.into(),
            err,
        })?;
        let stderr_path = dir.join("vmm.stderr");
        let stderr = File::create(&stderr_path).map_err(|err| VmError::File {
            path: stderr_path.clone(),
            err,
        })?;
        let netns = net.netns();
        let (mut cmd, jail, home) = match &launcher.jail {
            Some(cfg) => {
                let mut jail = cfg.jail_for(dir, None)?;
                // A jail left by a VM that ended without its cleanup (a killed kilnd): the jailer
                // refuses to build over it. Only then is the jailer run for it (the common case,
                // nothing there, costs no process on the way to a sandbox).
                if cfg.left_over(&jail) {
                    cfg.cleanup(&jail.id);
                }
                if let Err(e) = net.give_tap(jail.uid) {
                    jail.release();
                    return Err(e.into());
                }
                let path = netns.as_ref().map(|(path, _)| path.as_str());
                let cmd = cfg.command(&launcher.vmm, &jail, limits, path);
                let home = jail.root.clone();
                (cmd, Some((jail, cfg.clone())), home)
            }
            None => {
                let mut cmd = Command::new(&launcher.vmm);
                if let Some((_, fd)) = netns {
                    // SAFETY: setns is one system call, safe between fork and exec, on a
                    // descriptor `net` keeps open past the spawn.
                    unsafe { cmd.pre_exec(move || kiln_net::netns::enter_raw(fd)) };
                }
                (cmd, None, dir.to_path_buf())
            }
        };
        let api_sock = home.join("api.sock");
        // A folder used before (a paused sandbox resuming) still has the last VM's sockets, and
        // the VMM refuses to bind over an existing path.
        let _ = std::fs::remove_file(&api_sock);
        let _ = std::fs::remove_file(home.join("vsock.sock"));
        let mut vm = VmProcess {
            proc: Proc::Adopted(0),
            exited: None,
            jail,
            rootfs: None,
            overlay: None,
            net,
            dir: dir.into(),
            api_sock: api_sock.clone(),
            vsock: home.join("vsock.sock"),
        };
        cmd.arg("--api-sock")
            .arg(vm.in_vm(&api_sock))
            .arg("--serial-out")
            .arg(vm.in_vm(&home.join("console.log")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Its own process group: signals to the daemon's group do not reach it, and a
            // restarted daemon finds it still running.
            .process_group(0);
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(err) => {
                vm.exited = Some("never started".into());
                vm.end_jail();
                let program = PathBuf::from(cmd.get_program());
                return Err(VmError::Spawn { vmm: program, err });
            }
        };
        vm.proc = Proc::Child(child);
        let deadline = Instant::now() + API_WAIT;
        while std::os::unix::net::UnixStream::connect(&vm.api_sock).is_err() {
            if let Some(status) = vm.try_exit() {
                let err = vm.exited_error(status);
                vm.end_jail();
                return Err(err);
            }
            if Instant::now() > deadline {
                vm.kill();
                return Err(VmError::Api {
                    request: "waiting for the API socket".into(),
                    message: format!(
                        "nothing answered on {} within {API_WAIT:?}",
                        vm.api_sock.display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(vm)
    }

    /// A `kiln-vmm` a previous daemon started in `dir`, still running as `pid`, with its
    /// network `net` (adopted in its namespace, see [`VmNet::adopt`]).
    pub fn adopt(
        launcher: &Launcher,
        pid: u32,
        dir: &Path,
        net: VmNet,
    ) -> Result<VmProcess, VmError> {
        let (jail, home) = match &launcher.jail {
            Some(cfg) => {
                let jail = cfg.jail_for(dir, crate::jail::uid_of(pid))?;
                let home = jail.root.clone();
                (Some((jail, cfg.clone())), home)
            }
            None => (None, dir.to_path_buf()),
        };
        Ok(VmProcess {
            proc: Proc::Adopted(pid),
            exited: None,
            jail,
            rootfs: None,
            // A sandbox restored from a snapshot with an overlay writes its own copy, in its folder.
            overlay: Some(crate::disk::live_overlay(dir)).filter(|o| o.exists()),
            net,
            dir: dir.into(),
            api_sock: home.join("api.sock"),
            vsock: home.join("vsock.sock"),
        })
    }
}
