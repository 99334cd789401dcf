//! Running each VMM under `kiln-jailer`: its own uid and gid (one per live VM, from
//! [`FIRST_UID`]), a chroot under the state folder, and a cgroup holding the VM's memory and CPU
//! limits. The files a VMM needs are hard-linked into its jail (the jail base is on the state
//! folder's file system, so a template's memory file is shared, never copied); the files it
//! writes (snapshots) are moved out and handed back to root.
//!
//! Shared files stay root's, readable by all: a jailed VMM can read what is linked into its jail
//! but never write it. A file a VM may write (a template's root filesystem during its build
//! steps) is given to the VM's uid while it runs and back to root when it ends.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// The first uid (and gid) given to a jailed VMM.
pub const FIRST_UID: u32 = 100_000;
/// How many uids kilnd hands out (one per live VM).
const UIDS: u32 = 65_536;
/// The cgroup every VM's own cgroup goes under.
pub const PARENT_CGROUP: &str = "kiln";
/// What the VMM is called in the jail (the jailer names the jail's folder after it).
const EXEC_NAME: &str = "kiln-vmm";
/// Memory a VMM needs beyond its guest's (its own heap, page tables, device buffers).
const VMM_OVERHEAD_MIB: u64 = 128;

/// How many times a refused jail cleanup is tried (250 ms apart).
const CLEANUP_TRIES: u32 = 20;
/// Where a cgroup v2 hierarchy is mounted on the hosts kilnd knows (the unified one alone, or
/// beside v1 controllers).
const CGROUP2_MOUNTS: &[&str] = &["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

/// The uids in use by live VMs.
static IN_USE: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// Why a jail operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Every uid kilnd may hand out is taken.
    #[error("no free uid for a jailed VM ({UIDS} VMs from uid {FIRST_UID} already run)")]
    NoUid,
    /// A file could not be put into, or taken out of, a jail.
    #[error("{what} {path}: {err}")]
    File {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
}

fn file_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailError {
    let path = path.to_path_buf();
    move |err| JailError::File { what, path, err }
}

/// How kilnd starts a `kiln-vmm`.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// `kiln-vmm`.
    pub vmm: PathBuf,
    /// `kiln-jailer` and where jails go; `None` runs the VMM as kilnd's own user (`--no-jail`).
    pub jail: Option<JailConfig>,
}

/// Where the jailer is and where it builds jails.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// `kiln-jailer`.
    pub jailer: PathBuf,
    /// The jails' base folder (`--chroot-base-dir`), on the state folder's file system.
    pub base: PathBuf,
}

/// What one VM may use: its cgroup's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// vCPUs (the cgroup's CPU quota is this many CPUs).
    pub vcpus: u32,
    /// Guest memory in MiB (the cgroup's memory limit adds the VMM's overhead).
    pub mem_mib: u32,
    /// A warm VM made in the background: its cgroup's `cpu.weight` is [`BACKGROUND_CPU_WEIGHT`]
    /// until it is handed out ([`JailConfig::set_cpu_weight`]), so that filling pools never
    /// slows the sandboxes running commands.
    pub background: bool,
}

/// The `cpu.weight` of a warm VM's cgroup while it waits (cgroup v2's default is 100).
pub const BACKGROUND_CPU_WEIGHT: u32 = 10;
/// The `cpu.weight` of a sandbox's cgroup: cgroup v2's default.
pub const SANDBOX_CPU_WEIGHT: u32 = 100;

/// A jail one VM runs in.
#[derive(Debug)]
pub struct Jail {
    /// The jailer's `--id`.
    pub id: String,
    /// The jail's root as the host sees it.
    pub root: PathBuf,
    /// The VM's uid (and gid).
    pub uid: u32,
    /// Host files given to the VM's uid while it runs.
    writable: Vec<PathBuf>,
}

/// Takes a free uid, or the given one (an adopted VM's).
fn take_uid(want: Option<u32>) -> Result<u32, JailError> {
    let mut used = IN_USE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(uid) = want {
        used.insert(uid);
        return Ok(uid);
    }
    let uid = (FIRST_UID..FIRST_UID + UIDS)
        .find(|u| !used.contains(u))
        .ok_or(JailError::NoUid)?;
    used.insert(uid);
    Ok(uid)
}

/// The jail id of the VM whose folder is `dir`: the same folder always gives the same id, so a
/// restarted kilnd finds the jail of a VM it adopts.
pub fn jail_id(dir: &Path) -> String {
    let digest = Sha256::digest(dir.as_os_str().as_encoded_bytes());
    let hex: String = digest[..10].iter().map(|b| format!("{b:02x}")).collect();
    format!("vm-{hex}")
}

impl JailConfig {
    /// The jail of the VM in `dir`, with a new uid, or `uid` for one already running.
    pub fn jail_for(&self, dir: &Path, uid: Option<u32>) -> Result<Jail, JailError> {
        let id = jail_id(dir);
        let root = self.base.join(EXEC_NAME).join(&id).join("root");
        Ok(Jail {
            id,
            root,
            uid: take_uid(uid)?,
            writable: Vec::new(),
        })
    }

    /// The jailer's command line for `jail` with `limits`, in the network namespace at `netns`
    /// (a path the jailer can open while kilnd holds the namespace); the VMM's arguments follow.
    pub fn command(&self, vmm: &Path, jail: &Jail, limits: Limits, netns: Option<&str>) -> Command {
        let mut cmd = Command::new(&self.jailer);
        let uid = jail.uid.to_string();
        let memory = (u64::from(limits.mem_mib) + VMM_OVERHEAD_MIB) << 20;
        cmd.arg("--id")
            .arg(&jail.id)
            .arg("--exec-file")
            .arg(vmm)
            .args(["--uid", &uid, "--gid", &uid])
            .arg("--chroot-base-dir")
            .arg(&self.base)
            // Every sandbox's VMM maps one copy of kiln-vmm and its libraries, not one each
            // (~3 MiB a sandbox otherwise).
            .arg("--share-exec-file")
            .args(["--parent-cgroup", PARENT_CGROUP])
            .arg("--cgroup")
            .arg(format!("memory.max={memory}"))
            .arg("--cgroup")
            .arg(format!(
                "cpu.max={} 100000",
                u64::from(limits.vcpus) * 100_000
            ));
        if limits.background {
            cmd.arg("--cgroup")
                .arg(format!("cpu.weight={BACKGROUND_CPU_WEIGHT}"));
        }
        if let Some(ns) = netns {
            cmd.args(["--netns", ns]);
        }
        cmd.arg("--");
        cmd
    }

    /// Sets the `cpu.weight` of jail `id`'s cgroup (a warm VM handed out as a sandbox).
    pub fn set_cpu_weight(&self, id: &str, weight: u32) -> Result<(), JailError> {
        let file = CGROUP2_MOUNTS
            .iter()
            .map(|m| cgroup_dir(m, id).join("cpu.weight"))
            .find(|f| f.exists())
            .ok_or_else(|| JailError::File {
                what: "finding the cgroup of jail",
                path: id.into(),
                err: std::io::ErrorKind::NotFound.into(),
            })?;
        std::fs::write(&file, weight.to_string()).map_err(file_err("writing", &file))
    }

    /// Removes a finished jail and its cgroup (`kiln-jailer --cleanup`); what is already gone
    /// is fine. A VMM just killed may still be leaving its cgroup (`kiln-jailer` itself waits for
    /// KVM's per-VM kernel threads; a VMM not yet reaped is still listed), so a refusal is tried
    /// again for a few seconds.
    pub fn cleanup(&self, id: &str) {
        let mut last = String::new();
        for _ in 0..CLEANUP_TRIES {
            let out = Command::new(&self.jailer)
                .args(["--cleanup", "--id", id, "--exec-name", EXEC_NAME])
                .arg("--chroot-base-dir")
                .arg(&self.base)
                .args(["--parent-cgroup", PARENT_CGROUP])
                .output();
            match out {
                Ok(o) if o.status.success() => return,
                Ok(o) => last = String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => {
                    last = e.to_string();
                    break;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        tracing::warn!(jail = id, "kiln-jailer --cleanup: {last}");
    }

    /// True when something of `jail` is already on the host: its folder, or its cgroup.
    pub fn left_over(&self, jail: &Jail) -> bool {
        let folder = jail.root.parent().is_some_and(Path::exists);
        folder
            || CGROUP2_MOUNTS
                .iter()
                .any(|m| cgroup_dir(m, &jail.id).exists())
    }

    /// Kills what still runs in the cgroup of jail `id` (a VM a killed kilnd started and never
    /// recorded: nobody can reach it).
    fn kill_orphans(&self, id: &str) {
        for mount in CGROUP2_MOUNTS {
            let procs = cgroup_dir(mount, id).join("cgroup.procs");
            let text = std::fs::read_to_string(&procs).unwrap_or_default();
            for pid in text
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                tracing::warn!(jail = id, pid, "killing a VM nobody owns");
                // SAFETY: kill(2) with a pid and a signal number touches no memory.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    /// Removes every jail whose id is not in `keep` (what a dead kilnd left).
    pub fn sweep(&self, keep: &BTreeSet<String>) -> usize {
        let mut removed = 0;
        for entry in std::fs::read_dir(self.base.join(EXEC_NAME))
            .into_iter()
            .flatten()
            .flatten()
        {
            let id = entry.file_name().to_string_lossy().into_owned();
            // `.shared` holds the code every jail links to (`--share-exec-file`); no jail id has
            // a dot.
            if !id.starts_with('.') && !keep.contains(&id) {
                self.kill_orphans(&id);
                self.cleanup(&id);
                removed += 1;
            }
        }
        removed
    }
}

impl Jail {
    /// Where the VMM sees the host path `host` (a path in its root); `None` outside the root.
    pub fn inside(&self, host: &Path) -> Option<PathBuf> {
        host.strip_prefix(&self.root)
            .ok()
            .map(|rel| Path::new("/").join(rel))
    }

    /// Hard-links `host` into the jail as `/name` and returns that path; with `writable` the
    /// file is the VM's uid's until [`Jail::release`].
    pub fn expose(
        &mut self,
        host: &Path,
        name: &str,
        writable: bool,
    ) -> Result<PathBuf, JailError> {
        let to = self.root.join(name);
        let _ = std::fs::remove_file(&to);
        if let Err(err) = std::fs::hard_link(host, &to) {
            if err.raw_os_error() != Some(libc::EXDEV) {
                return Err(file_err("linking into the jail", host)(err));
            }
            // Another file system (a kernel outside the state folder): a copy, made once per VM.
            std::fs::copy(host, &to).map_err(file_err("copying into the jail", host))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o444))
                .map_err(file_err("setting the mode of", &to))?;
        }
        if writable {
            std::os::unix::fs::chown(host, Some(self.uid), Some(self.uid))
                .map_err(file_err("giving the VM", host))?;
            self.writable.push(host.to_path_buf());
        }
        Ok(Path::new("/").join(name))
    }

    /// Moves `name`, written by the VMM in its root, to `to`, root's and readable by all.
    pub fn take_out(&self, name: &str, to: &Path) -> Result<(), JailError> {
        let from = self.root.join(name);
        std::fs::rename(&from, to).map_err(file_err("moving out of the jail", &from))?;
        own_by_root(to)
    }

    /// Gives every file the VM could write back to root; its uid is free again.
    pub fn release(&mut self) {
        for path in self.writable.drain(..) {
            if let Err(e) = own_by_root(&path) {
                tracing::warn!("{e}");
            }
        }
        IN_USE
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.uid);
    }
}

/// The cgroup of jail `id` in the cgroup v2 hierarchy mounted at `mount`.
fn cgroup_dir(mount: &str, id: &str) -> PathBuf {
    Path::new(mount).join(PARENT_CGROUP).join(id)
}

/// Makes `path` root's, mode 0644.
fn own_by_root(path: &Path) -> Result<(), JailError> {
    std::os::unix::fs::chown(path, Some(0), Some(0)).map_err(file_err("giving root", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .map_err(file_err("setting the mode of", path))
}

/// The uid `pid` runs as (an adopted VM's).
pub fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_folder_gives_the_same_jail_and_others_differ() {
        let a = jail_id(Path::new("/var/lib/kiln/sandboxes/abc"));
        assert_eq!(a, jail_id(Path::new("/var/lib/kiln/sandboxes/abc")));
        assert_ne!(a, jail_id(Path::new("/var/lib/kiln/sandboxes/abd")));
        // The jailer takes letters, digits and '-', at most 64.
        assert!(a.len() <= 64 && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }

    #[test]
    fn uids_are_handed_out_once_and_come_back() {
        let cfg = JailConfig {
            jailer: "/nonexistent".into(),
            base: "/nonexistent".into(),
        };
        let mut a = cfg.jail_for(Path::new("/a"), None).unwrap();
        let b = cfg.jail_for(Path::new("/b"), None).unwrap();
        assert_ne!(a.uid, b.uid);
        assert!(a.uid >= FIRST_UID && b.uid >= FIRST_UID);
        let freed = a.uid;
        a.release();
        let c = cfg.jail_for(Path::new("/c"), None).unwrap();
        assert_eq!(c.uid, freed, "a released uid is the lowest free one again");
        assert_eq!(
            a.inside(&a.root.join("api.sock")),
            Some(PathBuf::from("/api.sock"))
        );
        assert_eq!(a.inside(Path::new("/elsewhere")), None);
    }

    #[test]
    fn the_jailer_is_asked_for_the_limits() {
        let cfg = JailConfig {
            jailer: "/usr/bin/kiln-jailer".into(),
            base: "/var/lib/kiln/jail".into(),
        };
        let jail = cfg.jail_for(Path::new("/x"), Some(123_456)).unwrap();
        let cmd = cfg.command(
            Path::new("/usr/bin/kiln-vmm"),
            &jail,
            Limits {
                vcpus: 2,
                mem_mib: 256,
                background: false,
            },
            None,
        );
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("--uid 123456 --gid 123456"), "{joined}");
        assert!(joined.contains(&format!("memory.max={}", (256 + 128) << 20)));
        assert!(joined.contains("cpu.max=200000 100000"));
        assert!(!joined.contains("cpu.weight"), "{joined}");
        assert!(!joined.contains("--netns"), "{joined}");
        assert!(joined.contains("--share-exec-file"), "{joined}");
        assert_eq!(args.last().map(String::as_str), Some("--"));
        // A warm VM waits at a low CPU weight.
        let warm = cfg.command(
            Path::new("/usr/bin/kiln-vmm"),
            &jail,
            Limits {
                vcpus: 1,
                mem_mib: 256,
                background: true,
            },
            Some("/proc/1/fd/7"),
        );
        let joined = warm
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            joined.contains(&format!(
                "--cgroup cpu.weight={BACKGROUND_CPU_WEIGHT} --netns /proc/1/fd/7 --"
            )),
            "{joined}"
        );
    }

    #[test]
    fn a_sweep_passes_over_the_shared_code_folder() {
        let base = std::env::temp_dir().join(format!("kilnd-sweep-{}", std::process::id()));
        std::fs::create_dir_all(base.join(EXEC_NAME).join(".shared")).unwrap();
        std::fs::create_dir_all(base.join(EXEC_NAME).join("left-by-a-dead-kilnd")).unwrap();
        let cfg = JailConfig {
            // No jailer: the sweep's cleanup of the dead jail fails at once, which is logged.
            jailer: base.join("no-such-jailer"),
            base: base.clone(),
        };
        assert_eq!(cfg.sweep(&BTreeSet::new()), 1, "only the jail counts");
        assert!(base.join(EXEC_NAME).join(".shared").is_dir());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
