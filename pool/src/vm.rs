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

/// The guest's vsock context id (every sandbox has its own vsock socket, so they can share it).
pub const GUEST_CID: u32 = 3;
/// The kernel command line: the agent is init, over a tmpfs overlay of the read-only root.
pub const CMDLINE_OVERLAY: &str =
    "console=ttyS0 reboot=k panic=-1 quiet init=/usr/sbin/kiln-agent KILN_OVERLAY=tmpfs";
/// The same with the root writable: written in place (template build steps) or through a
/// copy-on-write overlay ([`Root::Cow`]).
pub const CMDLINE_WRITABLE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet init=/usr/sbin/kiln-agent";
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
    /// The VMM exited.
    #[error("kiln-vmm exited ({status}){said}")]
    Exited {
        /// How.
        status: String,
        /// The last lines of its stderr, if any.
        said: String,
    },
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
    /// Its folder.
    pub dir: PathBuf,
    /// Its API socket.
    pub api_sock: PathBuf,
    /// Its vsock Unix socket (the agent is reached through it).
    pub vsock: PathBuf,
}

impl VmProcess {
    /// Starts `vmm --api-sock` in `dir` (created if needed) and waits until the socket answers.
    pub fn spawn(vmm: &Path, dir: &Path) -> Result<VmProcess, VmError> {
        std::fs::create_dir_all(dir).map_err(|err| VmError::File {
            path: dir.into(),
            err,
        })?;
        let api_sock = dir.join("api.sock");
        // A folder used before (a paused sandbox resuming) still has the last VM's sockets, and
        // the VMM refuses to bind over an existing path.
        let _ = std::fs::remove_file(&api_sock);
        let _ = std::fs::remove_file(dir.join("vsock.sock"));
        let stderr_path = dir.join("vmm.stderr");
        let stderr = File::create(&stderr_path).map_err(|err| VmError::File {
            path: stderr_path.clone(),
            err,
        })?;
        let mut cmd = Command::new(vmm);
        cmd.arg("--api-sock")
            .arg(&api_sock)
            .arg("--serial-out")
            .arg(dir.join("console.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Its own process group: signals to the daemon's group do not reach it, and a
            // restarted daemon finds it still running.
            .process_group(0);
        let child = cmd.spawn().map_err(|err| VmError::Spawn {
            vmm: vmm.into(),
            err,
        })?;
        let mut vm = VmProcess {
            proc: Proc::Child(child),
            exited: None,
            dir: dir.into(),
            api_sock,
            vsock: dir.join("vsock.sock"),
        };
        let deadline = Instant::now() + API_WAIT;
        while std::os::unix::net::UnixStream::connect(&vm.api_sock).is_err() {
            if let Some(status) = vm.try_exit() {
                return Err(vm.exited_error(status));
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

    /// A `kiln-vmm` a previous daemon started in `dir`, still running as `pid`.
    pub fn adopt(pid: u32, dir: &Path) -> VmProcess {
        VmProcess {
            proc: Proc::Adopted(pid),
            exited: None,
            dir: dir.into(),
            api_sock: dir.join("api.sock"),
            vsock: dir.join("vsock.sock"),
        }
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
        let args = match root {
            Root::Tmpfs => CMDLINE_OVERLAY,
            Root::Writable | Root::Cow(_) => CMDLINE_WRITABLE,
        };
        let mut drive = json!({"drive_id": "rootfs", "path_on_host": rootfs,
                               "is_root_device": true,
                               "is_read_only": matches!(root, Root::Tmpfs)});
        if let Root::Cow(overlay) = root {
            drive["cow_overlay_path"] = json!(overlay);
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
        let vsock = self.vsock.clone();
        self.api(
            "PUT",
            "/vsock",
            json!({"guest_cid": GUEST_CID, "uds_path": vsock}),
        )?;
        self.api("PUT", "/actions", json!({"action_type": "InstanceStart"}))
    }

    /// Restores the snapshot `state` + `memory` and resumes it, its vsock on this VM's socket
    /// and, with `overlay`, its root drive writing to that copy-on-write overlay (a VM restored
    /// from a snapshot with an overlay must have its own, or it would write the snapshot's).
    pub fn restore(
        &mut self,
        state: &Path,
        memory: &Path,
        overlay: Option<&Path>,
    ) -> Result<(), VmError> {
        let vsock = self.vsock.clone();
        let mut body = json!({"snapshot_path": state,
                              "mem_backend": {"backend_type": "File", "backend_path": memory},
                              "resume_vm": true, "vsock_override": {"uds_path": vsock}});
        if let Some(overlay) = overlay {
            body["drive_overrides"] = json!([{"drive_id": "rootfs", "cow_overlay_path": overlay}]);
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

    /// Writes a Full snapshot of the paused VM to `state` and `memory`.
    pub fn snapshot(&mut self, state: &Path, memory: &Path) -> Result<(), VmError> {
        self.api(
            "PUT",
            "/snapshot/create",
            json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": memory}),
        )
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

    /// Kills the VMM and reaps it (an adopted one is waited for until its /proc entry goes).
    pub fn kill(&mut self) {
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
                let end = Instant::now() + Duration::from_secs(10);
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
