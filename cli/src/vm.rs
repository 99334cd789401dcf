//! One microVM for one `kiln run`: a private temp dir (vsock socket, console log, the VMM's
//! stderr, the API socket of a restored VM), the `kiln-vmm` process, and their removal on every
//! way out. A VM is booted from images ([`Vm::boot`]) or restored from a snapshot
//! ([`Vm::restore`]).

use std::fs::File;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::api::Api;
use crate::args::{Images, RunArgs};
use crate::cleanup;
use crate::net::Network;
use crate::snapshot::SnapshotFiles;

/// The guest kernel command line: the agent is init; a reset ends the VMM cleanly.
///
/// The rootfs is attached read-only and the agent runs on a tmpfs overlay over it
/// (`KILN_OVERLAY=tmpfs`): every run starts from the image as built, writes vanish with the VM, and
/// any number of VMs can use one image at once.
pub const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet init=/usr/sbin/kiln-agent KILN_OVERLAY=tmpfs";

/// The guest command line for `args`: [`CMDLINE`] and the agent's memory settings (`kiln.zram=`,
/// which the agent reads before any command runs).
pub fn cmdline(args: &RunArgs) -> String {
    match &args.zram {
        Some(zram) => format!("{CMDLINE} kiln.zram={zram}"),
        None => CMDLINE.to_string(),
    }
}

/// kiln-vmm's `--balloon` for `args`: free page reporting and the starting target, with
/// deflate_on_oom so a guest short of memory takes the balloon back; `None` when neither is
/// asked for.
pub fn balloon_spec(args: &RunArgs) -> Option<String> {
    if !args.free_page_reporting && args.balloon_mib == 0 {
        return None;
    }
    let mut spec = format!("amount_mib={},deflate_on_oom", args.balloon_mib);
    if args.free_page_reporting {
        spec.push_str(",free_page_reporting");
    }
    Some(spec)
}

/// The guest's vsock context id.
pub const GUEST_CID: u32 = 3;

/// The vsock socket's name in the VM's temp dir.
const VSOCK: &str = "vsock.sock";

/// Finds `kiln-vmm`: `$KILN_VMM`, else next to this program, else on `PATH`.
pub fn find_vmm(var: Option<String>) -> Result<PathBuf, String> {
    if let Some(p) = var.filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("$KILN_VMM {} is not a file", p.display()))
        };
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("kiln-vmm")));
    if let Some(p) = beside.as_ref().filter(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("kiln-vmm"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            let dir = beside
                .as_ref()
                .and_then(|p| p.parent())
                .map_or_else(|| "?".to_string(), |d| d.display().to_string());
            format!("kiln-vmm not found next to kiln (in {dir}) nor on PATH; set $KILN_VMM")
        })
}

/// A booting or running VM.
pub struct Vm {
    child: Child,
    exited: Option<ExitStatus>,
    dir: PathBuf,
    /// The VMM's vsock Unix socket.
    pub uds: PathBuf,
    console: PathBuf,
    vmm_stderr: PathBuf,
}

fn temp_dir() -> Result<PathBuf, String> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("kiln-{}-{nanos:x}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("creating temp dir {}: {e}", dir.display()))?;
    Ok(dir)
}

impl Vm {
    /// Spawns `vmm` for `images` with `args`' machine size and memory settings, inside `net`'s
    /// namespace with its network interface when it has one.
    pub fn boot(vmm: &Path, images: &Images, args: &RunArgs, net: &Network) -> Result<Vm, String> {
        let boot_net = net.boot_args();
        let cmdline = match &boot_net {
            Some((_, word)) => format!("{} {word}", cmdline(args)),
            None => cmdline(args),
        };
        Vm::spawn(vmm, net.netns_fd(), |cmd, dir| {
            if let Some((iface, _)) = &boot_net {
                cmd.arg("--net").arg(iface);
            }
            cmd.arg("--kernel")
                .arg(&images.kernel)
                .args(["--mem-mib", &args.mem_mib.to_string()])
                .args(["--vcpus", &args.vcpus.to_string()])
                .args(["--cmdline", &cmdline]);
            if let Some(spec) = balloon_spec(args) {
                cmd.args(["--balloon", &spec]);
            }
            cmd.arg("--drive")
                .arg(format!(
                    "id=rootfs,path={},root,ro",
                    images.rootfs.display()
                ))
                .arg("--vsock")
                .arg(format!("cid={GUEST_CID},uds={}", dir.join(VSOCK).display()));
        })
    }

    /// Spawns `vmm` with only an API socket, loads the snapshot `files` into it and resumes it,
    /// its vsock moved to this VM's own socket and its network interface (if `net` has one) to
    /// `net`'s TAP. Gives up at `deadline`.
    pub fn restore(
        vmm: &Path,
        files: &SnapshotFiles,
        deadline: Instant,
        net: &Network,
    ) -> Result<Vm, String> {
        let mut api_sock = PathBuf::new();
        let mut vm = Vm::spawn(vmm, net.netns_fd(), |cmd, dir| {
            api_sock = dir.join("api.sock");
            cmd.arg("--api-sock").arg(&api_sock);
        })?;
        let api = Api::wait(&api_sock, deadline, || {
            vm.try_exit()
                .map(|_| "kiln-vmm stopped before its API socket answered".to_string())
        });
        let loaded = api.and_then(|mut api| {
            let left = deadline.saturating_duration_since(Instant::now());
            api.set_timeout(left.max(Duration::from_secs(1)));
            let mut body = files.load_body(true, Some(vm.uds.clone()), false);
            body.network_overrides = net.overrides();
            api.load_snapshot(&body).map_err(|e| e.to_string())
        });
        match loaded {
            Ok(()) => Ok(vm),
            Err(e) => {
                let hint = if net.netns_fd().is_none() && e.contains("network interface") {
                    " (the snapshot has a network interface: run it with --net, --allow-domain or --allow-net)"
                } else if e.contains("has no network interface") {
                    " (--net and the --allow flags need a snapshot taken with a network interface)"
                } else {
                    ""
                };
                Err(vm.failure(&format!(
                    "restoring the snapshot in {}: {e}{hint}",
                    files.dir.display()
                )))
            }
        }
    }

    /// Spawns `vmm` in a new temp dir (and in the network namespace `netns`, if given);
    /// `configure` adds the arguments that say what to run, given that dir.
    fn spawn(
        vmm: &Path,
        netns: Option<std::os::fd::RawFd>,
        configure: impl FnOnce(&mut Command, &Path),
    ) -> Result<Vm, String> {
        let dir = temp_dir()?;
        cleanup::set_dir(Some(dir.clone()));
        let uds = dir.join(VSOCK);
        let console = dir.join("console.log");
        let vmm_stderr = dir.join("kiln-vmm.stderr");
        let stderr = File::create(&vmm_stderr)
            .map_err(|e| format!("creating {}: {e}", vmm_stderr.display()))?;
        let mut cmd = Command::new(vmm);
        configure(&mut cmd, &dir);
        cmd.arg("--serial-out")
            .arg(&console)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Its own process group: a Ctrl-C at the terminal is ours to handle, not the VMM's.
            .process_group(0);
        // SAFETY: the closure only makes async-signal-safe calls (sigemptyset, pthread_sigmask,
        // prctl, setns) on a local and a descriptor the parent keeps open, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // The VMM lives in the sandbox's namespace, where its TAP is.
                if let Some(fd) = netns {
                    kiln_net::netns::enter_raw(fd)?;
                }
                // kiln blocks the signals its signal thread takes, and a signal mask survives
                // exec: the VMM must start with none blocked.
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                // If kiln dies without cleaning up (SIGKILL), the VM must not outlive it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", vmm.display()))?;
        cleanup::set_vmm(Some(child.id() as libc::pid_t));
        Ok(Vm {
            child,
            exited: None,
            dir,
            uds,
            console,
            vmm_stderr,
        })
    }

    /// The VMM's exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
            if self.exited.is_some() {
                cleanup::set_vmm(None);
            }
        }
        self.exited
    }

    /// Waits up to `limit` for the VMM to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.try_exit() {
                return Some(st);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the VMM and reaps it.
    pub fn kill(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
            cleanup::set_vmm(None);
        }
    }

    /// Copies the console log out of the temp dir (which is about to go) and returns where;
    /// `None` when the VMM wrote none.
    pub fn keep_console(&self) -> Option<PathBuf> {
        let kept = std::env::temp_dir().join(format!("kiln-console-{}.log", std::process::id()));
        std::fs::copy(&self.console, &kept).ok().map(|_| kept)
    }

    /// A failure report: `what`, how the VMM ended, its last stderr lines, and the kept
    /// console log. Stops the VMM.
    pub fn failure(&mut self, what: &str) -> String {
        let status = match self.try_exit() {
            Some(st) => format!("; kiln-vmm exited with {st}"),
            None => {
                self.kill();
                "; kiln-vmm was stopped".to_string()
            }
        };
        let stderr = std::fs::read_to_string(&self.vmm_stderr).unwrap_or_default();
        let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
        let said = if tail.is_empty() {
            String::new()
        } else {
            format!(" (it said: {tail})")
        };
        match self.keep_console() {
            Some(log) => format!("{what}{status}{said}; console log: {}", log.display()),
            None => format!("{what}{status}{said}; the VMM wrote no console log"),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        cleanup::set_dir(None);
    }
}
