//! One `kiln-vmm` process, driven through its API socket only (the pool never reaches into the
//! VMM): spawned in a folder of its own (API socket, vsock socket, console log, stderr), then
//! booted from a kernel and root filesystem or restored from a snapshot, paused, snapshotted and
//! killed. Everything here blocks; the daemon calls it from blocking tasks.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::jail::{Jail, JailConfig, JailError};
use crate::net::{NetError, VmNet};
use crate::types::{PortRequest, PublishedPort};

mod control;
mod spawn;

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
    /// Removes the jail (once the VMM is gone) and frees its uid.
    fn end_jail(&mut self) {
        if let Some((mut jail, cfg)) = self.jail.take() {
            cfg.cleanup(&jail.id);
            jail.release();
        }
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
