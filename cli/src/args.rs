//! `kiln`'s command line, hand-parsed so every mistake is one line naming the flag or value.
//! Parsing only turns text into [`RunArgs`]; finding the kernel and rootfs is [`Images::resolve`].

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The usage text.
pub const USAGE: &str = "usage: kiln run [OPTIONS] [--] CMD [ARG...]

Boots a Kiln microVM, runs CMD in it through the guest agent, streams its output, and exits
with its status.

  --kernel PATH        guest kernel (default: $KILN_KERNEL, else /kiln/vmlinux)
  --rootfs PATH        root filesystem image holding /usr/sbin/kiln-agent
                       (default: $KILN_ROOTFS, else /kiln/rootfs.ext4)
  --timeout SECS       kill CMD's process group after SECS seconds (exit 124)
  --env K=V            set an environment variable (repeatable)
  --cwd DIR            working directory in the guest (default /)
  --user USER          run as name, uid, name:group or uid:gid (default root)
  --mem-mib N          guest memory in MiB (default 256)
  --vcpus N            vCPUs (default 1)
  --tty                run CMD on a terminal when stdin is one
  --json               print one JSON object {stdout, stderr, exit_code, signal, timed_out,
                       timings: {boot_ms, exec_ms}} instead of streaming
  --boot-timeout SECS  give up when the agent has not answered after SECS (default 30)

kiln-vmm is taken from $KILN_VMM, else next to kiln, else from PATH.

exit status: CMD's own; 128+N if signal N ended it; 124 if it timed out; 127 if it could not
be started; 125 if kiln, the VM or the boot failed.";

/// Default guest memory.
pub const DEFAULT_MEM_MIB: u32 = 256;
/// Default boot timeout.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// What `kiln run` was asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct RunArgs {
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--rootfs`.
    pub rootfs: Option<PathBuf>,
    /// `--timeout`.
    pub timeout: Option<Duration>,
    /// `--env`, in order.
    pub env: Vec<(String, String)>,
    /// `--cwd`.
    pub cwd: Option<String>,
    /// `--user`.
    pub user: Option<String>,
    /// `--mem-mib`.
    pub mem_mib: u32,
    /// `--vcpus`.
    pub vcpus: u32,
    /// `--tty`.
    pub tty: bool,
    /// `--json`.
    pub json: bool,
    /// `--boot-timeout`.
    pub boot_timeout: Duration,
    /// The command.
    pub command: Vec<String>,
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Command {
    /// `kiln run ...`.
    Run(Box<RunArgs>),
    /// `--help`.
    Help,
    /// `--version`.
    Version,
}

fn seconds(flag: &str, value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{flag} {value:?} is not a positive number of seconds"))
}

fn count(flag: &str, value: &str) -> Result<u32, String> {
    value
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{flag} {value:?} is not a positive whole number"))
}

fn env_pair(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!("--env {value:?} is not NAME=VALUE")),
    }
}

/// Parses `args` (without the program name).
pub fn parse(args: &[String]) -> Result<Command, String> {
    let mut it = args.iter();
    match it.next().map(String::as_str) {
        None => return Err("no command given; try `kiln run -- CMD` or `kiln --help`".into()),
        Some("-h" | "--help" | "help") => return Ok(Command::Help),
        Some("-V" | "--version") => return Ok(Command::Version),
        Some("run") => {}
        Some(other) => return Err(format!("unknown command {other:?} (only `run` exists)")),
    }
    let mut a = RunArgs {
        kernel: None,
        rootfs: None,
        timeout: None,
        env: Vec::new(),
        cwd: None,
        user: None,
        mem_mib: DEFAULT_MEM_MIB,
        vcpus: 1,
        tty: false,
        json: false,
        boot_timeout: DEFAULT_BOOT_TIMEOUT,
        command: Vec::new(),
    };
    while let Some(arg) = it.next() {
        if arg == "--" {
            a.command.extend(it.by_ref().cloned());
            break;
        }
        if !arg.starts_with('-') {
            // The first word that is not an option starts the command.
            a.command.push(arg.clone());
            a.command.extend(it.by_ref().cloned());
            break;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name {
            "-h" | "--help" => return Ok(Command::Help),
            "--kernel" => a.kernel = Some(value()?.into()),
            "--rootfs" => a.rootfs = Some(value()?.into()),
            "--timeout" => a.timeout = Some(seconds(name, &value()?)?),
            "--boot-timeout" => a.boot_timeout = seconds(name, &value()?)?,
            "--env" | "-e" => a.env.push(env_pair(&value()?)?),
            "--cwd" | "-w" => a.cwd = Some(value()?),
            "--user" | "-u" => a.user = Some(value()?),
            "--mem-mib" => a.mem_mib = count(name, &value()?)?,
            "--vcpus" => a.vcpus = count(name, &value()?)?,
            "--tty" | "-t" if inline.is_none() => a.tty = true,
            "--json" if inline.is_none() => a.json = true,
            "--tty" | "-t" | "--json" => return Err(format!("{name} takes no value")),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if a.command.is_empty() {
        return Err("no command to run: kiln run [OPTIONS] -- CMD [ARG...]".into());
    }
    Ok(Command::Run(Box::new(a)))
}

/// The kernel and root filesystem to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Root filesystem image.
    pub rootfs: PathBuf,
}

/// The lab's kernel.
pub const LAB_KERNEL: &str = "/kiln/vmlinux";
/// The lab's root filesystem.
pub const LAB_ROOTFS: &str = "/kiln/rootfs.ext4";

impl Images {
    /// Picks each image from its flag, else its variable, else the lab's path, and checks that
    /// it is a readable file. `env` looks a variable up (the process environment in `main`).
    pub fn resolve(args: &RunArgs, env: impl Fn(&str) -> Option<String>) -> Result<Images, String> {
        let pick = |flag: &Option<PathBuf>, var: &str, lab: &str, what: &str| {
            let (path, source) = match (flag, env(var).filter(|v| !v.is_empty())) {
                (Some(p), _) => (p.clone(), format!("--{what}")),
                (None, Some(v)) => (PathBuf::from(v), format!("${var}")),
                (None, None) => (
                    PathBuf::from(lab),
                    format!("the default (set --{what} or ${var})"),
                ),
            };
            check_file(&path, what, &source).map(|()| path)
        };
        let kernel = pick(&args.kernel, "KILN_KERNEL", LAB_KERNEL, "kernel")?;
        let rootfs = pick(&args.rootfs, "KILN_ROOTFS", LAB_ROOTFS, "rootfs")?;
        if rootfs.to_string_lossy().contains(',') {
            return Err(format!(
                "rootfs path {} contains a comma, which kiln-vmm's --drive cannot take",
                rootfs.display()
            ));
        }
        Ok(Images { kernel, rootfs })
    }
}

fn check_file(path: &Path, what: &str, source: &str) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!(
            "{what} {} (from {source}) is not a file",
            path.display()
        )),
        Err(e) => Err(format!("{what} {} (from {source}): {e}", path.display())),
    }
}

#[cfg(test)]
#[path = "args_tests.rs"]
mod tests;
