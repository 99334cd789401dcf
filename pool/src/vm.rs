//! One `kiln-vmm` process, driven through its API socket only (the pool never reaches into the
//! VMM): spawned in a folder of its own (API socket, vsock socket, console log, stderr), then
//! booted from a kernel and root filesystem or restored from a snapshot, paused, snapshotted and
//! killed. Everything here blocks; the daemon calls it from blocking tasks.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::jail::{Jail, JailConfig, JailError, Launcher, Limits};
use crate::net::{NetError, VmNet};
use crate::template::TemplateFiles;
use crate::types::{PortRequest, PublishedPort};

/// The guest's vsock context id (every sandbox has its own vsock socket, so they can share it).
pub const GUEST_CID: u32 = 3;
/// The kernel command line: the agent is init, over a tmpfs overlay of the read-only root.
pub const CMDLINE_OVERLAY: &str =
    "console=ttyS0 reboot=k panic=-1 quiet init=/usr/sbin/kiln-agent KILN_OVERLAY=tmpfs";
/// The same with the root writable: written in place (template build steps) or through a
/// copy-on-write overlay ([`Root::Cow`]).
pub const CMDLINE_WRITABLE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet init=/usr/sbin/kiln-agent";
/// What a VM's root filesystem is called in its jail.
const ROOTFS_NAME: &str = "rootfs.ext4";
/// What a VM's copy-on-write overlay is called in its jail.
const OVERLAY_NAME: &str = crate::disk::OVERLAY;
/// How long the VMM may take to listen on its API socket.
const API_WAIT: Duration = Duration::from_secs(30);

/// How a VM's root drive is attached.
#[derive(Debug, Clone, Copy)]
pub enum Root<'a> {
    /// Read-only, under the agent's tmpfs overlay.
    Tmpfs,
    /// Written in place.
    Writable,
    /// Read-only base under this copy-on-write overlay file, which takes the writes.
    Cow(&'a Path),
}

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The VMM could not be started.
    #[error("starting {vmm}: {err}")]
    Spawn {
        /// The program.
        vmm: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// A file in the VM's folder could not be made.
    #[error("{path}: {err}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The VMM refused a request or failed on it (its fault message, and how it ended if it did).
    #[error("{request}: {message}")]
    Api {
        /// Method and path.
        request: String,
        /// The VMM's answer.
        message: String,
    },
    /// The VM's copy-on-write overlay could not be made or saved (boxed: it names two files).
    #[error("{0}")]
    Disk(Box<crate::disk::DiskError>),
    /// The VM's jail could not be set up.
    #[error("jail: {0}")]
    Jail(#[from] JailError),
    /// The VM's network could not be set up.
    #[error("{0}")]
    Net(#[from] NetError),
    /// The VMM exited.
    #[error("kiln-vmm exited ({status}){said}")]
    Exited {
        /// How.
        status: String,
        /// The last lines of its stderr, if any.
        said: String,
    },
}

impl From<crate::disk::DiskError> for VmError {
    fn from(e: crate::disk::DiskError) -> Self {
        VmError::Disk(Box::new(e))
    }
}

/// The process: one this daemon started, or one a previous daemon started and this one adopted.
enum Proc {
    Child(Child),
    Adopted(u32),
}

/// A running `kiln-vmm` and its folder.
pub struct VmProcess {
    proc: Proc,
    exited: Option<String>,
    /// Its jail and the jailer's settings, unless kilnd runs VMMs unjailed.
    jail: Option<(Jail, JailConfig)>,
    /// The root filesystem it was given (a jailed VM's snapshot names it by its path in the jail,
    /// so the snapshot's folder gets a link to it).
    rootfs: Option<PathBuf>,
    /// The copy-on-write overlay its root drive writes to (on the host), if it has one: a
    /// snapshot of the VM saves a copy of it with the memory.
    overlay: Option<PathBuf>,
    /// Its network (namespace, TAP, services, published ports), which goes with it.
    net: VmNet,
    /// Its folder.
    pub dir: PathBuf,
    /// Its API socket.
    pub api_sock: PathBuf,
    /// Its vsock Unix socket (the agent is reached through it).
    pub vsock: PathBuf,
}

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

    /// The path the VMM sees for the host path `host` (its own in a jail).
    fn in_vm(&self, host: &Path) -> PathBuf {
        match &self.jail {
            Some((jail, _)) => jail.inside(host).unwrap_or_else(|| host.to_path_buf()),
            None => host.to_path_buf(),
        }
    }

    /// Gives the VMM the host file `host`: its own path unjailed, else a link in the jail named
    /// `name` (the VM's to write with `writable`).
    fn give(&mut self, host: &Path, name: &str, writable: bool) -> Result<PathBuf, VmError> {
        match &mut self.jail {
            Some((jail, _)) => Ok(jail.expose(host, name, writable)?),
            None => Ok(host.to_path_buf()),
        }
    }

    /// Removes the jail (once the VMM is gone) and frees its uid.
    fn end_jail(&mut self) {
        if let Some((mut jail, cfg)) = self.jail.take() {
            cfg.cleanup(&jail.id);
            jail.release();
        }
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

    /// Its network.
    pub fn net(&self) -> &VmNet {
        &self.net
    }

    /// Publishes `ports` of the guest on the host's 127.0.0.1 (over the VMM's vsock socket), on
    /// the host ports of `prefer` where they are free.
    pub fn publish(
        &mut self,
        ports: &[PortRequest],
        prefer: &[PublishedPort],
    ) -> Result<(), VmError> {
        let vsock = self.vsock.clone();
        Ok(self.net.publish(ports, prefer, &vsock)?)
    }

    /// The id of its jail, if it has one.
    pub fn jail_id(&self) -> Option<&str> {
        self.jail.as_ref().map(|(j, _)| j.id.as_str())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        match &self.proc {
            Proc::Child(c) => c.id(),
            Proc::Adopted(pid) => *pid,
        }
    }

    /// How it exited, if it has.
    pub fn try_exit(&mut self) -> Option<String> {
        if self.exited.is_none() {
            match &mut self.proc {
                Proc::Child(c) => {
                    if let Ok(Some(status)) = c.try_wait() {
                        self.exited = Some(status.to_string());
                    }
                }
                // Not our child: it is gone once its /proc entry is (or is a zombie of another).
                Proc::Adopted(pid) => {
                    if !process_alive(*pid) {
                        self.exited = Some("exited".into());
                    }
                }
            }
        }
        self.exited.clone()
    }

    /// If the VMM has exited: how (its status, the end of its stderr) and the last lines of the
    /// guest's console, which say why a guest died (a panic, an OOM kill of its init).
    pub fn ended(&mut self) -> Option<String> {
        let status = self.try_exit()?;
        let console = self
            .api_sock
            .parent()
            .map(|home| home.join("console.log"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let lines: Vec<&str> = console.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
        Some(match tail.is_empty() {
            true => self.exited_error(status).to_string(),
            false => format!(
                "{}; the end of its console: {tail}",
                self.exited_error(status)
            ),
        })
    }

    fn exited_error(&self, status: String) -> VmError {
        let stderr = std::fs::read_to_string(self.dir.join("vmm.stderr")).unwrap_or_default();
        let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
        VmError::Exited {
            status,
            said: if tail.is_empty() {
                String::new()
            } else {
                format!(": {tail}")
            },
        }
    }

    /// One API request that must answer 204.
    pub fn api(
        &mut self,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> Result<(), VmError> {
        let request = format!("{method} {path}");
        let text = body.to_string();
        match kiln_api::client::request(&self.api_sock, method, path, Some(&text)) {
            Ok((204, _)) => Ok(()),
            Ok((_, answer)) => {
                let message = serde_json::from_str::<serde_json::Value>(&answer)
                    .ok()
                    .and_then(|v| v["fault_message"].as_str().map(str::to_string))
                    .unwrap_or(answer);
                Err(VmError::Api { request, message })
            }
            Err(e) => Err(match self.try_exit() {
                Some(status) => self.exited_error(status),
                None => VmError::Api {
                    request,
                    message: e.to_string(),
                },
            }),
        }
    }

    /// Boots `kernel` from the root filesystem `rootfs`, attached as `root` says.
    pub fn boot(
        &mut self,
        kernel: &Path,
        rootfs: &Path,
        root: Root<'_>,
        vcpus: u32,
        mem_mib: u32,
    ) -> Result<(), VmError> {
        let base = match root {
            Root::Tmpfs => CMDLINE_OVERLAY,
            Root::Writable | Root::Cow(_) => CMDLINE_WRITABLE,
        };
        let args = match self.net.cmdline_word() {
            Some(word) => format!("{base} {word}"),
            None => base.to_string(),
        };
        let kernel = self.give(kernel, "vmlinux", false)?;
        self.rootfs = Some(rootfs.to_path_buf());
        let rootfs = self.give(rootfs, ROOTFS_NAME, matches!(root, Root::Writable))?;
        let mut drive = json!({"drive_id": "rootfs", "path_on_host": rootfs,
                               "is_root_device": true,
                               "is_read_only": matches!(root, Root::Tmpfs)});
        if let Root::Cow(overlay) = root {
            self.overlay = Some(overlay.to_path_buf());
            drive["cow_overlay_path"] = json!(self.give(overlay, OVERLAY_NAME, true)?);
        }
        self.api(
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": kernel, "boot_args": args}),
        )?;
        self.api(
            "PUT",
            "/machine-config",
            json!({"vcpu_count": vcpus, "mem_size_mib": mem_mib}),
        )?;
        self.api("PUT", "/drives/rootfs", drive)?;
        if let Some(iface) = self.net.interface() {
            self.api(
                "PUT",
                &format!("/network-interfaces/{}", kiln_net::addr::IFACE_ID),
                iface,
            )?;
        }
        let vsock = self.in_vm(&self.vsock);
        self.api(
            "PUT",
            "/vsock",
            json!({"guest_cid": GUEST_CID, "uds_path": vsock}),
        )?;
        self.api("PUT", "/actions", json!({"action_type": "InstanceStart"}))
    }

    /// Restores the snapshot in `from` and resumes it, its vsock on this VM's socket and its
    /// network interface (a snapshot taken with one) on this VM's TAP. In a jail
    /// the snapshot's root filesystem is linked where the VM that took it had it. A snapshot with
    /// a copy-on-write overlay gives this VM a sparse copy of it in its folder, and the root
    /// drive writes there (never to the snapshot's).
    pub fn restore(&mut self, from: &TemplateFiles) -> Result<(), VmError> {
        if self.jail.is_some() {
            self.give(&from.rootfs, ROOTFS_NAME, false)?;
            self.rootfs = Some(from.rootfs.clone());
        }
        let state = self.give(&from.state, "vmstate", false)?;
        let memory = self.give(&from.memory, "memory", false)?;
        let vsock = self.in_vm(&self.vsock);
        let mut body = json!({"snapshot_path": state,
                              "mem_backend": {"backend_type": "File", "backend_path": memory},
                              "resume_vm": true, "vsock_override": {"uds_path": vsock}});
        if let Some(live) = crate::disk::overlay_for_restore(&from.overlay, &self.dir)? {
            self.overlay = Some(live.clone());
            let overlay = self.give(&live, OVERLAY_NAME, true)?;
            body["drive_overrides"] = json!([{"drive_id": "rootfs", "cow_overlay_path": overlay}]);
        }
        if let Some(overrides) = self.net.overrides() {
            body["network_overrides"] = overrides;
        }
        self.api("PUT", "/snapshot/load", body)
    }

    /// Pauses the vCPUs.
    pub fn pause(&mut self) -> Result<(), VmError> {
        self.api("PATCH", "/vm", json!({"state": "Paused"}))
    }

    /// Resumes the vCPUs.
    pub fn resume(&mut self) -> Result<(), VmError> {
        self.api("PATCH", "/vm", json!({"state": "Resumed"}))
    }

    /// Writes a Full snapshot of the paused VM into `into` (its state and memory files; in a jail
    /// they are written in the jail, moved out, and the root filesystem linked beside them), and
    /// a sparse copy of its copy-on-write overlay as it is now (the disk that goes with that
    /// memory) unless the overlay already is `into`'s (a template's).
    pub fn snapshot(&mut self, into: &TemplateFiles) -> Result<(), VmError> {
        self.snapshot_state(into)?;
        if let Some(live) = &self.overlay
            && *live != into.overlay
        {
            crate::disk::copy_sparse(live, &into.overlay)?;
        }
        Ok(())
    }

    fn snapshot_state(&mut self, into: &TemplateFiles) -> Result<(), VmError> {
        let Some((jail, _)) = &self.jail else {
            return self.api(
                "PUT",
                "/snapshot/create",
                json!({"snapshot_type": "Full", "snapshot_path": into.state,
                       "mem_file_path": into.memory}),
            );
        };
        let (state, memory) = (jail.root.join("snap.state"), jail.root.join("snap.memory"));
        let body = json!({"snapshot_type": "Full", "snapshot_path": self.in_vm(&state),
                          "mem_file_path": self.in_vm(&memory)});
        self.api("PUT", "/snapshot/create", body)?;
        if let Some((jail, _)) = &self.jail {
            jail.take_out("snap.state", &into.state)?;
            jail.take_out("snap.memory", &into.memory)?;
        }
        if let Some(rootfs) = &self.rootfs
            && *rootfs != into.rootfs
        {
            let _ = std::fs::remove_file(&into.rootfs);
            std::fs::hard_link(rootfs, &into.rootfs).map_err(|err| VmError::File {
                path: into.rootfs.clone(),
                err,
            })?;
        }
        Ok(())
    }

    /// Waits up to `limit` for the VMM to exit on its own (after the guest shut down).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<String> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// A warm VM becomes a sandbox: its cgroup gets the default CPU weight back (it waited at
    /// [`crate::jail::BACKGROUND_CPU_WEIGHT`]). Unjailed VMs have no cgroup of their own.
    pub fn foreground(&self) {
        if let Some((jail, cfg)) = &self.jail
            && let Err(e) = cfg.set_cpu_weight(&jail.id, crate::jail::SANDBOX_CPU_WEIGHT)
        {
            tracing::warn!(vm = %self.dir.display(), "cannot raise a warm VM's CPU weight: {e}");
        }
    }

    /// Kills the VMM and reaps it (an adopted one is waited for until its /proc entry goes),
    /// then removes its jail and its network.
    pub fn kill(&mut self) {
        self.kill_process();
        self.end_jail();
        self.net = VmNet::none();
    }

    fn kill_process(&mut self) {
        if self.try_exit().is_some() {
            return;
        }
        match &mut self.proc {
            Proc::Child(c) => {
                let _ = c.kill();
                self.exited = c.wait().ok().map(|s| s.to_string());
            }
            Proc::Adopted(pid) => {
                let pid = *pid;
                // SAFETY: kill(2) with a pid and a signal number touches no memory.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                // Not our child: wait until it is gone (a large guest takes a while to tear down).
                let end = Instant::now() + Duration::from_secs(30);
                while process_alive(pid) && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(5));
                }
                self.exited = Some("killed".into());
            }
        }
    }
}

/// True while `pid` runs (a zombie counts as gone).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// When `pid` started, in clock ticks after boot (field 22 of /proc/PID/stat): with the pid, it
/// names one process for its whole life, even after the pid is reused.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
