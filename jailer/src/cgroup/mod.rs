//! The jail's cgroups, after Firecracker's jailer: `<parent>/<id>` (the parent defaults to the exec
//! name) under each hierarchy a `--cgroup FILE=VALUE` needs, the values written, then the process
//! moved in.
//!
//! On cgroup v1 the controller is FILE's prefix and picks the hierarchy (co-mounted controllers
//! such as `cpu,cpuacct` share one); a new cpuset cgroup inherits `cpuset.cpus` and `cpuset.mems`
//! from its parent, or no process could join it. On v2 the cgroup is made in the unified
//! hierarchy and every controller named is enabled in `cgroup.subtree_control` from the root
//! down to the parent. Without any `--cgroup` nothing is created, as in Firecracker.
//!
//! Everything takes the hierarchies' paths as input ([`Hierarchy`]) and makes and removes
//! directories through a [`CgroupFs`], so tests run against a temporary tree.

mod mounts;
#[cfg(test)]
mod tests;

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

pub use mounts::{detect, parse};

use crate::args::{CgroupSetting, CgroupVersion};
use crate::sys::getpid;
use crate::undo::Undo;

/// How cgroup directories are made and removed. The kernel fills a new cgroup with its interface
/// files and removes them with it; a test's stand-in does the same on a plain tree.
pub trait CgroupFs: Sync {
    /// Makes the cgroup directory `path`.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Removes the cgroup `name` in the directory open as `parent`.
    fn remove_dir_at(&self, parent: BorrowedFd, name: &CStr) -> io::Result<()>;
}

/// The kernel's cgroupfs.
pub struct Kernel;

/// The one [`Kernel`].
pub static KERNEL: Kernel = Kernel;

impl CgroupFs for Kernel {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }

    fn remove_dir_at(&self, parent: BorrowedFd, name: &CStr) -> io::Result<()> {
        crate::dirfd::remove_dir_at(parent, name)
    }
}

/// Why the cgroups could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A host file describing cgroups cannot be read.
    #[error("cannot read {}: {err}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        err: io::Error,
    },
    /// No v1 hierarchy has the controller a setting names.
    #[error(
        "no cgroup v1 hierarchy on this host has the {controller} controller (for {file}); mounted: {mounted}"
    )]
    NoV1Controller {
        /// The controller.
        controller: String,
        /// The setting's file.
        file: String,
        /// The controllers that are mounted.
        mounted: String,
    },
    /// No cgroup2 filesystem is mounted.
    #[error("cgroup v2 is not mounted on this host (no cgroup2 in /proc/self/mountinfo)")]
    NoV2,
    /// The unified hierarchy lacks a controller a setting names.
    #[error("the cgroup v2 hierarchy at {} does not offer the {controller} controller (for {file}); it offers: {offered}", mount.display())]
    NoV2Controller {
        /// The hierarchy's mount point.
        mount: PathBuf,
        /// The controller.
        controller: String,
        /// The setting's file.
        file: String,
        /// What `cgroup.controllers` lists.
        offered: String,
    },
    /// The jail's cgroup is there already.
    #[error("cgroup {} already exists: another jail has this id, or a finished one was not cleaned up (kiln-jailer --cleanup)", .0.display())]
    Exists(PathBuf),
    /// A cgroup directory cannot be made.
    #[error("cannot create cgroup {}: {err}", path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        err: io::Error,
    },
    /// A cgroup file cannot be written.
    #[error("cannot write {value:?} to {}: {err}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What was being written.
        value: String,
        /// What the OS said.
        err: io::Error,
    },
}

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// v1 or the unified v2 hierarchy.
    pub version: CgroupVersion,
    /// v1: the controllers mounted here; v2: those `cgroup.controllers` offers at the root.
    pub controllers: Vec<String>,
    /// Where it is mounted.
    pub mount: PathBuf,
    /// This process's cgroup in it, relative to `mount` (empty for the root).
    pub current: PathBuf,
}

impl Hierarchy {
    fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// A cgroup made for the jail, to be joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The cgroup directory, `<mount>/<parent>/<id>`.
    pub dir: PathBuf,
    /// `cgroup.procs` of the cgroup the process is in now, to return to if a later step fails.
    origin_procs: PathBuf,
}

/// The version to use: the one asked for, else v1 where the host mounts v1 controllers (a v1 or
/// hybrid host), else v2.
pub fn pick_version(hierarchies: &[Hierarchy], asked: Option<CgroupVersion>) -> CgroupVersion {
    asked.unwrap_or_else(|| {
        let v1 = hierarchies
            .iter()
            .any(|h| h.version == CgroupVersion::V1 && !h.controllers.is_empty());
        if v1 {
            CgroupVersion::V1
        } else {
            CgroupVersion::V2
        }
    })
}

/// Creates `<parent>/<id>` in every hierarchy `settings` need and writes the settings; each
/// cgroup made is recorded in `undo`. Nothing is made for no settings.
pub fn create(
    hierarchies: &[Hierarchy],
    version: CgroupVersion,
    parent: &str,
    id: &str,
    settings: &[CgroupSetting],
    fs: &'static dyn CgroupFs,
    undo: &mut Undo,
) -> Result<Vec<Placed>, CgroupError> {
    if settings.is_empty() {
        return Ok(Vec::new());
    }
    match version {
        CgroupVersion::V1 => create_v1(hierarchies, parent, id, settings, fs, undo),
        CgroupVersion::V2 => create_v2(hierarchies, parent, id, settings, fs, undo),
    }
}

fn create_v1(
    hierarchies: &[Hierarchy],
    parent: &str,
    id: &str,
    settings: &[CgroupSetting],
    fs: &'static dyn CgroupFs,
    undo: &mut Undo,
) -> Result<Vec<Placed>, CgroupError> {
    let v1: Vec<&Hierarchy> = hierarchies
        .iter()
        .filter(|h| h.version == CgroupVersion::V1)
        .collect();
    // Settings grouped by hierarchy, in the order the hierarchies are first named.
    let mut groups: Vec<(&Hierarchy, Vec<&CgroupSetting>)> = Vec::new();
    for s in settings {
        let h = v1.iter().find(|h| h.has(&s.controller)).ok_or_else(|| {
            CgroupError::NoV1Controller {
                controller: s.controller.clone(),
                file: s.file.clone(),
                mounted: list(v1.iter().flat_map(|h| h.controllers.iter())),
            }
        })?;
        match groups.iter_mut().find(|(g, _)| std::ptr::eq(*g, *h)) {
            Some((_, group)) => group.push(s),
            None => groups.push((h, vec![s])),
        }
    }
    let mut placed = Vec::new();
    for (h, group) in groups {
        let cpuset = h.has("cpuset");
        let mut dir = h.mount.clone();
        for part in parent.split('/') {
            let above = dir.clone();
            dir.push(part);
            ensure_dir(&dir, fs)?;
            if cpuset {
                inherit_cpuset(&above, &dir)?;
            }
        }
        let leaf = dir.join(id);
        new_cgroup(&leaf, fs, undo)?;
        if cpuset {
            inherit_cpuset(&dir, &leaf)?;
        }
        for s in group {
            write(&leaf.join(&s.file), &s.value)?;
        }
        placed.push(Placed {
            dir: leaf,
            origin_procs: h.mount.join(&h.current).join("cgroup.procs"),
        });
    }
    Ok(placed)
}

fn create_v2(
    hierarchies: &[Hierarchy],
    parent: &str,
    id: &str,
    settings: &[CgroupSetting],
    fs: &'static dyn CgroupFs,
    undo: &mut Undo,
) -> Result<Vec<Placed>, CgroupError> {
    let h = hierarchies
        .iter()
        .find(|h| h.version == CgroupVersion::V2)
        .ok_or(CgroupError::NoV2)?;
    // `cgroup.*` files (cgroup.max.depth, ...) belong to no controller.
    let mut controllers: Vec<&CgroupSetting> = Vec::new();
    for s in settings.iter().filter(|s| s.controller != "cgroup") {
        if !h.has(&s.controller) {
            return Err(CgroupError::NoV2Controller {
                mount: h.mount.clone(),
                controller: s.controller.clone(),
                file: s.file.clone(),
                offered: list(h.controllers.iter()),
            });
        }
        if !controllers.iter().any(|c| c.controller == s.controller) {
            controllers.push(s);
        }
    }
    let enable = |dir: &Path| -> Result<(), CgroupError> {
        let path = dir.join("cgroup.subtree_control");
        let enabled = std::fs::read_to_string(&path).unwrap_or_default();
        for c in &controllers {
            if !enabled.split_whitespace().any(|e| e == c.controller) {
                write(&path, &format!("+{}", c.controller))?;
            }
        }
        Ok(())
    };
    let mut dir = h.mount.clone();
    enable(&dir)?;
    for part in parent.split('/') {
        dir.push(part);
        ensure_dir(&dir, fs)?;
        enable(&dir)?;
    }
    let leaf = dir.join(id);
    new_cgroup(&leaf, fs, undo)?;
    for s in settings {
        write(&leaf.join(&s.file), &s.value)?;
    }
    Ok(vec![Placed {
        dir: leaf,
        origin_procs: h.mount.join(&h.current).join("cgroup.procs"),
    }])
}

/// Moves this process into every cgroup in `placed`, recording in `undo` how to move back.
pub fn join(placed: &[Placed], undo: &mut Undo) -> Result<(), CgroupError> {
    let pid = getpid().to_string();
    for p in placed {
        let origin = OpenOptions::new()
            .write(true)
            .open(&p.origin_procs)
            .map_err(|err| CgroupError::Write {
                path: p.origin_procs.clone(),
                value: pid.clone(),
                err,
            })?;
        write(&p.dir.join("cgroup.procs"), &pid)?;
        undo.joined_cgroup(origin, p.origin_procs.clone());
    }
    Ok(())
}

/// A parent cgroup: made when missing, shared with other jails, so never removed by the undo.
fn ensure_dir(dir: &Path, fs: &dyn CgroupFs) -> Result<(), CgroupError> {
    if dir.is_dir() {
        return Ok(());
    }
    match fs.create_dir(dir) {
        Err(err) if err.kind() != io::ErrorKind::AlreadyExists => Err(CgroupError::Create {
            path: dir.to_path_buf(),
            err,
        }),
        _ => Ok(()),
    }
}

/// The jail's own cgroup: it must be new, and it is recorded for removal.
fn new_cgroup(dir: &Path, fs: &'static dyn CgroupFs, undo: &mut Undo) -> Result<(), CgroupError> {
    match undo.create_cgroup(dir, fs) {
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            Err(CgroupError::Exists(dir.to_path_buf()))
        }
        Err(err) => Err(CgroupError::Create {
            path: dir.to_path_buf(),
            err,
        }),
        Ok(()) => Ok(()),
    }
}

/// Copies `cpuset.cpus` and `cpuset.mems` from `parent` into `dir` where `dir`'s are empty.
fn inherit_cpuset(parent: &Path, dir: &Path) -> Result<(), CgroupError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|err| CgroupError::Read {
                path: p.to_path_buf(),
                err,
            })
        };
        if read(&dir.join(file))?.trim().is_empty() {
            let value = read(&parent.join(file))?;
            write(&dir.join(file), value.trim())?;
        }
    }
    Ok(())
}

/// Writes `value` to the existing cgroup file `path` (cgroupfs files are never created).
fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    let err = |err| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        err,
    };
    let mut file: File = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(err)?;
    file.write_all(value.as_bytes()).map_err(err)
}

fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
