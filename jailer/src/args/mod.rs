//! `kiln-jailer`'s command line, in Firecracker's jailer shape. [`parse`] turns text into typed
//! values and refuses unknown or repeated flags; `validate` then checks the rules that need more
//! than one flag's text or the filesystem (the id's characters, absolute paths, files that exist).
//! Every error names the flag and the value at fault.

use std::path::PathBuf;

use validate::exec_name_of;

/// Where jails are built when `--chroot-base-dir` is not given (Firecracker's default).
pub const DEFAULT_CHROOT_BASE: &str = "/srv/jailer";
/// Longest id accepted (Firecracker's limit).
pub const MAX_ID_LEN: usize = 64;
/// The exec-file name `--cleanup` assumes when given neither `--exec-file` nor `--exec-name`.
pub const DEFAULT_EXEC_NAME: &str = "kiln-vmm";

/// The usage text for `--help`.
pub const USAGE: &str = "usage: kiln-jailer --id ID --exec-file PATH --uid N --gid N
                   [--chroot-base-dir DIR] [--netns PATH] [--cgroup-version 1|2]
                   [--cgroup FILE=VALUE]... [--parent-cgroup NAME]
                   [--resource-limit no-file=N|fsize=N]... [--new-pid-ns] [--daemonize]
                   [--share-exec-file] [-- KILN-VMM-ARGS...]
       kiln-jailer --cleanup --id ID [--exec-file PATH | --exec-name NAME]
                   [--chroot-base-dir DIR] [--cgroup-version 1|2] [--parent-cgroup NAME]

Builds <chroot-base-dir>/<exec-name>/<id>/root (default base /srv/jailer), copies the exec file
(and, for a dynamically linked one, its loader and libraries) into it, joins the network
namespace, sets resource limits (no-file defaults to 2048), creates the cgroup
<parent-cgroup or exec-name>/<id> under each controller a --cgroup names and joins it, enters a
new mount namespace rooted at the jail with /dev/kvm, /dev/net/tun and /dev/urandom owned by
uid:gid, optionally a new PID namespace, drops to uid:gid with no capabilities and execs
/<exec-name> as Firecracker's jailer does: with --id ID, --start-time-us, --start-time-cpu-us and
--parent-cpu-time-us (when the jailer started, so the VMM's start-up metrics count the jail),
then the arguments after --, which must not repeat those four. --cleanup removes a finished jail
and its cgroups.

  --id ID               letters, digits and '-', at most 64
  --exec-file PATH      absolute path of the binary to jail (kiln-vmm)
  --uid N, --gid N      who the jailed process runs as (not 0)
  --cgroup-version V    1 or 2; by default 1 where the host mounts v1 controllers, else 2
  --cgroup FILE=VALUE   write VALUE to FILE in the cgroup; the controller is FILE's prefix
                        (memory.limit_in_bytes=N on v1, memory.max=N on v2)
  --parent-cgroup NAME  relative cgroup path the jail's cgroup goes under (default: exec name)
  --resource-limit R=N  no-file (open files) or fsize (bytes a file may grow to; kiln-vmm's
                        guest memory is a file too, so fsize must be at least its size)
  --netns PATH          join this network namespace (e.g. /var/run/netns/NAME)
  --new-pid-ns          run in a new PID namespace; the jailer waits and exits as it did, and
                        writes its host PID to <jail root>/<exec-name>.pid
  --daemonize           setsid() and stdio to /dev/null; with --new-pid-ns the jailer exits 0
                        once the VMM has been exec'd
  --share-exec-file     Kiln's own: hard-link the exec file, loader and libraries into the jail
                        from one root-owned copy per chroot base (<base>/<exec-name>/.shared)
                        instead of copying them into each jail, so every jailed VMM maps the
                        same pages (one copy in memory for all of them, not one each)

exit status: 2 on a bad command line, 1 when a step fails on the host (nothing it built is left
behind); otherwise what the jailed process exits with.";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Build a jail and run the exec file in it.
    Jail(JailArgs),
    /// Remove a finished jail and its cgroups.
    Cleanup(CleanupArgs),
    /// Print usage.
    Help,
    /// Print the version.
    Version,
}

/// The cgroup hierarchy kind to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One hierarchy per controller (or group of co-mounted controllers).
    V1,
    /// The unified hierarchy.
    V2,
}

/// One `--cgroup FILE=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSetting {
    /// The controller, FILE's prefix before the first `.` (`memory` for `memory.max`).
    pub controller: String,
    /// The interface file's name.
    pub file: String,
    /// What is written to it.
    pub value: String,
}

/// One `--resource-limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceLimit {
    /// `no-file=N`: RLIMIT_NOFILE.
    NoFile(u64),
    /// `fsize=N`: RLIMIT_FSIZE, in bytes.
    FileSize(u64),
}

/// Everything a jail is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailArgs {
    /// The jail's id: a path component and a cgroup name.
    pub id: String,
    /// The binary to copy into the jail and exec.
    pub exec_file: PathBuf,
    /// Who the jailed process runs as.
    pub uid: u32,
    /// The jailed process's group.
    pub gid: u32,
    /// Where jails are built.
    pub chroot_base: PathBuf,
    /// A network namespace to join.
    pub netns: Option<PathBuf>,
    /// The cgroup version asked for; detected from the host when absent.
    pub cgroup_version: Option<CgroupVersion>,
    /// Cgroup files to write, in the order given.
    pub cgroups: Vec<CgroupSetting>,
    /// The cgroup the jail's cgroup goes under; the exec file's name when absent.
    pub parent_cgroup: Option<String>,
    /// Resource limits, in the order given.
    pub limits: Vec<ResourceLimit>,
    /// Run in a new PID namespace.
    pub new_pid_ns: bool,
    /// Detach from the terminal before exec.
    pub daemonize: bool,
    /// Hard-link the exec file and its libraries from a shared copy instead of copying them.
    pub share_exec_file: bool,
    /// Arguments for the exec file (everything after `--`).
    pub vmm_args: Vec<String>,
}

/// What `--cleanup` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanupArgs {
    /// The jail's id.
    pub id: String,
    /// The exec file's name, the jail's middle path component.
    pub exec_name: String,
    /// Where jails are built.
    pub chroot_base: PathBuf,
    /// Only look in this cgroup version's hierarchies; in all when absent.
    pub cgroup_version: Option<CgroupVersion>,
    /// The cgroup the jail's cgroup is under; the exec name when absent.
    pub parent_cgroup: Option<String>,
}

/// A command line that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    /// A flag nobody knows.
    #[error("unknown option {0}")]
    UnknownFlag(String),
    /// A word that is not a flag, before `--`.
    #[error("unexpected argument {0:?}; arguments for the VMM go after --")]
    Unexpected(String),
    /// A flag without its value.
    #[error("{0} needs a value")]
    NoValue(String),
    /// A required flag is absent.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A flag that may appear once appeared twice.
    #[error("{0} is given twice")]
    Repeated(String),
    /// A VMM argument the jailer passes itself.
    #[error(
        "{0} after --: kiln-jailer passes --id and the start times to the VMM itself, as Firecracker's jailer does"
    )]
    JailerPasses(String),
    /// A value that should be a number is not.
    #[error("{flag} {value:?} is not a number")]
    NotANumber {
        /// The flag.
        flag: &'static str,
        /// What was given.
        value: String,
    },
    /// `--cgroup-version` other than 1 or 2.
    #[error("--cgroup-version {0:?} is not 1 or 2")]
    CgroupVersion(String),
    /// A malformed `--cgroup`.
    #[error("--cgroup {arg:?}: {why}")]
    Cgroup {
        /// What was given.
        arg: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A malformed `--resource-limit`.
    #[error("--resource-limit {arg:?}: {why}")]
    ResourceLimit {
        /// What was given.
        arg: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A flag that means nothing with (or without) `--cleanup`.
    #[error("{flag} {why}")]
    Misplaced {
        /// The flag.
        flag: &'static str,
        /// Why it does not fit.
        why: &'static str,
    },
    /// A bad `--id`.
    #[error("--id {id:?} {why}")]
    Id {
        /// What was given.
        id: String,
        /// What is wrong with it.
        why: String,
    },
    /// A path that must be absolute is not.
    #[error("{flag} {} is not an absolute path", path.display())]
    NotAbsolute {
        /// The flag.
        flag: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A file that must exist cannot be read.
    #[error("{flag} {}: {err}", path.display())]
    File {
        /// The flag.
        flag: &'static str,
        /// The path.
        path: PathBuf,
        /// What the OS said.
        err: String,
    },
    /// A path that names no regular file.
    #[error("{flag} {} is not a regular file", path.display())]
    NotAFile {
        /// The flag.
        flag: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A bad `--parent-cgroup` or `--exec-name`.
    #[error("{flag} {value:?} {why}")]
    Name {
        /// The flag.
        flag: &'static str,
        /// What was given.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An argument the OS gave that is not UTF-8.
    #[error("argument {0:?} is not valid UTF-8")]
    NotUtf8(String),
    /// uid or gid 0, which would leave the jailed process root.
    #[error("{flag} 0 would leave the jailed process root; pick an unprivileged id")]
    Root {
        /// The flag.
        flag: &'static str,
    },
}

/// Flags seen so far.
#[derive(Default)]
struct Flags {
    id: Option<String>,
    exec_file: Option<PathBuf>,
    exec_name: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
    chroot_base: Option<PathBuf>,
    netns: Option<PathBuf>,
    cgroup_version: Option<CgroupVersion>,
    cgroups: Vec<CgroupSetting>,
    parent_cgroup: Option<String>,
    limits: Vec<ResourceLimit>,
    new_pid_ns: bool,
    daemonize: bool,
    share_exec_file: bool,
    cleanup: bool,
    vmm_args: Option<Vec<String>>,
}

/// The process's arguments (without the program name) as UTF-8 text.
pub fn from_os(args: impl Iterator<Item = std::ffi::OsString>) -> Result<Vec<String>, ArgsError> {
    args.map(|a| {
        a.into_string()
            .map_err(|a| ArgsError::NotUtf8(a.to_string_lossy().into_owned()))
    })
    .collect()
}

/// Parses `args` (without the program name).
pub fn parse(args: &[String]) -> Result<Command, ArgsError> {
    let mut f = Flags::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--" {
            f.vmm_args = Some(it.by_ref().cloned().collect());
            break;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || -> Result<String, ArgsError> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| ArgsError::NoValue(name.to_string())),
            }
        };
        match name {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--id" => set(&mut f.id, name, value()?)?,
            "--exec-file" => set(&mut f.exec_file, name, value()?.into())?,
            "--exec-name" => set(&mut f.exec_name, name, value()?)?,
            "--uid" => set(&mut f.uid, name, number("--uid", &value()?)?)?,
            "--gid" => set(&mut f.gid, name, number("--gid", &value()?)?)?,
            "--chroot-base-dir" => set(&mut f.chroot_base, name, value()?.into())?,
            "--netns" => set(&mut f.netns, name, value()?.into())?,
            "--cgroup-version" => set(&mut f.cgroup_version, name, cgroup_version(&value()?)?)?,
            "--cgroup" => {
                let setting = cgroup_setting(&value()?)?;
                if f.cgroups.iter().any(|s| s.file == setting.file) {
                    return Err(ArgsError::Repeated(format!("--cgroup {}", setting.file)));
                }
                f.cgroups.push(setting);
            }
            "--parent-cgroup" => set(&mut f.parent_cgroup, name, value()?)?,
            "--resource-limit" => {
                let limit = resource_limit(&value()?)?;
                let same =
                    |l: &ResourceLimit| std::mem::discriminant(l) == std::mem::discriminant(&limit);
                if f.limits.iter().any(same) {
                    return Err(ArgsError::Repeated(format!(
                        "--resource-limit {}",
                        limit.name()
                    )));
                }
                f.limits.push(limit);
            }
            "--new-pid-ns" => switch(&mut f.new_pid_ns, name, inline.is_some())?,
            "--daemonize" => switch(&mut f.daemonize, name, inline.is_some())?,
            "--share-exec-file" => switch(&mut f.share_exec_file, name, inline.is_some())?,
            "--cleanup" => switch(&mut f.cleanup, name, inline.is_some())?,
            other if other.starts_with('-') => return Err(ArgsError::UnknownFlag(other.into())),
            other => return Err(ArgsError::Unexpected(other.into())),
        }
    }
    if f.cleanup {
        f.into_cleanup().map(Command::Cleanup)
    } else {
        f.into_jail().map(Command::Jail)
    }
}

impl Flags {
    fn into_jail(self) -> Result<JailArgs, ArgsError> {
        if self.exec_name.is_some() {
            return Err(ArgsError::Misplaced {
                flag: "--exec-name",
                why: "is for --cleanup; a jail takes --exec-file",
            });
        }
        Ok(JailArgs {
            id: self.id.ok_or(ArgsError::Missing("--id"))?,
            exec_file: self.exec_file.ok_or(ArgsError::Missing("--exec-file"))?,
            uid: self.uid.ok_or(ArgsError::Missing("--uid"))?,
            gid: self.gid.ok_or(ArgsError::Missing("--gid"))?,
            chroot_base: self
                .chroot_base
                .unwrap_or_else(|| DEFAULT_CHROOT_BASE.into()),
            netns: self.netns,
            cgroup_version: self.cgroup_version,
            cgroups: self.cgroups,
            parent_cgroup: self.parent_cgroup,
            limits: self.limits,
            new_pid_ns: self.new_pid_ns,
            daemonize: self.daemonize,
            share_exec_file: self.share_exec_file,
            vmm_args: self.vmm_args.unwrap_or_default(),
        })
    }

    fn into_cleanup(self) -> Result<CleanupArgs, ArgsError> {
        let not_for_cleanup = [
            (self.uid.is_some(), "--uid"),
            (self.gid.is_some(), "--gid"),
            (self.netns.is_some(), "--netns"),
            (!self.cgroups.is_empty(), "--cgroup"),
            (!self.limits.is_empty(), "--resource-limit"),
            (self.new_pid_ns, "--new-pid-ns"),
            (self.daemonize, "--daemonize"),
            (self.share_exec_file, "--share-exec-file"),
            (self.vmm_args.is_some(), "--"),
        ];
        if let Some((_, flag)) = not_for_cleanup.iter().find(|(given, _)| *given) {
            return Err(ArgsError::Misplaced {
                flag,
                why: "does not apply to --cleanup",
            });
        }
        let exec_name = match (self.exec_file, self.exec_name) {
            (Some(_), Some(_)) => {
                return Err(ArgsError::Misplaced {
                    flag: "--exec-name",
                    why: "and --exec-file both name the jail; give one",
                });
            }
            (Some(file), None) => exec_name_of(&file)?,
            (None, Some(name)) => name,
            (None, None) => DEFAULT_EXEC_NAME.to_string(),
        };
        Ok(CleanupArgs {
            id: self.id.ok_or(ArgsError::Missing("--id"))?,
            exec_name,
            chroot_base: self
                .chroot_base
                .unwrap_or_else(|| DEFAULT_CHROOT_BASE.into()),
            cgroup_version: self.cgroup_version,
            parent_cgroup: self.parent_cgroup,
        })
    }
}

impl ResourceLimit {
    /// The name used on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            ResourceLimit::NoFile(_) => "no-file",
            ResourceLimit::FileSize(_) => "fsize",
        }
    }
}

fn set<T>(slot: &mut Option<T>, flag: &str, value: T) -> Result<(), ArgsError> {
    if slot.replace(value).is_some() {
        return Err(ArgsError::Repeated(flag.to_string()));
    }
    Ok(())
}

fn switch(slot: &mut bool, flag: &str, has_value: bool) -> Result<(), ArgsError> {
    if has_value {
        return Err(ArgsError::UnknownFlag(format!("{flag}=...")));
    }
    if std::mem::replace(slot, true) {
        return Err(ArgsError::Repeated(flag.to_string()));
    }
    Ok(())
}

fn number<T: std::str::FromStr>(flag: &'static str, value: &str) -> Result<T, ArgsError> {
    value.parse().map_err(|_| ArgsError::NotANumber {
        flag,
        value: value.to_string(),
    })
}

fn cgroup_version(value: &str) -> Result<CgroupVersion, ArgsError> {
    match value {
        "1" => Ok(CgroupVersion::V1),
        "2" => Ok(CgroupVersion::V2),
        other => Err(ArgsError::CgroupVersion(other.to_string())),
    }
}

/// `FILE=VALUE`, where FILE is `<controller>.<name>` in lowercase letters, digits and `_`.
fn cgroup_setting(arg: &str) -> Result<CgroupSetting, ArgsError> {
    let bad = |why| ArgsError::Cgroup {
        arg: arg.to_string(),
        why,
    };
    let (file, value) = arg.split_once('=').ok_or(bad("is not FILE=VALUE"))?;
    let (controller, rest) = file
        .split_once('.')
        .ok_or(bad("FILE must be <controller>.<name>, e.g. memory.max"))?;
    let word = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
    };
    if !word(controller) || !word(rest) {
        return Err(bad(
            "FILE must be <controller>.<name> in lowercase letters, digits, '_' and '.'",
        ));
    }
    if value.is_empty() {
        return Err(bad("VALUE is empty"));
    }
    if value.contains(['\n', '\0']) {
        return Err(bad("VALUE holds a newline or NUL"));
    }
    Ok(CgroupSetting {
        controller: controller.to_string(),
        file: file.to_string(),
        value: value.to_string(),
    })
}

fn resource_limit(arg: &str) -> Result<ResourceLimit, ArgsError> {
    let bad = |why| ArgsError::ResourceLimit {
        arg: arg.to_string(),
        why,
    };
    let (name, value) = arg
        .split_once('=')
        .ok_or(bad("is not no-file=N or fsize=N"))?;
    let n: u64 = value
        .parse()
        .map_err(|_| bad("N is not a non-negative number"))?;
    match name {
        "no-file" => Ok(ResourceLimit::NoFile(n)),
        "fsize" => Ok(ResourceLimit::FileSize(n)),
        _ => Err(bad("the resource must be no-file or fsize")),
    }
}

mod validate;

#[cfg(test)]
mod tests;
