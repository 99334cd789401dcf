//! The rules checked after parsing: the id's characters and length, absolute paths, files that
//! exist, names usable as path components and cgroup paths, and no root ids.

use std::path::{Component, Path};

use super::{ArgsError, CleanupArgs, JailArgs, MAX_ID_LEN};

impl JailArgs {
    /// The exec file's name: the jail's middle path component and the binary's name inside it.
    pub fn exec_name(&self) -> String {
        exec_name_of(&self.exec_file).unwrap_or_default()
    }

    /// The cgroup the jail's cgroup goes under.
    pub fn parent_cgroup(&self) -> String {
        self.parent_cgroup
            .clone()
            .unwrap_or_else(|| self.exec_name())
    }

    /// Checks the rules that need the filesystem or more than one flag.
    pub fn validate(&self) -> Result<(), ArgsError> {
        check_id(&self.id)?;
        absolute("--exec-file", &self.exec_file)?;
        exec_name_of(&self.exec_file)?;
        regular_file("--exec-file", &self.exec_file)?;
        absolute("--chroot-base-dir", &self.chroot_base)?;
        if let Some(netns) = &self.netns {
            absolute("--netns", netns)?;
            std::fs::metadata(netns).map_err(|e| ArgsError::File {
                flag: "--netns",
                path: netns.clone(),
                err: e.to_string(),
            })?;
        }
        if self.uid == 0 {
            return Err(ArgsError::Root { flag: "--uid" });
        }
        if self.gid == 0 {
            return Err(ArgsError::Root { flag: "--gid" });
        }
        if let Some(parent) = &self.parent_cgroup {
            check_parent_cgroup(parent)?;
        }
        if let Some(flag) = self.vmm_args.iter().find(|a| {
            let name = a.split('=').next().unwrap_or(a);
            crate::launch::PASSED_FLAGS.contains(&name)
        }) {
            return Err(ArgsError::JailerPasses(flag.clone()));
        }
        Ok(())
    }
}

impl CleanupArgs {
    /// The cgroup the jail's cgroup is under.
    pub fn parent_cgroup(&self) -> String {
        self.parent_cgroup
            .clone()
            .unwrap_or_else(|| self.exec_name.clone())
    }

    /// Checks the id, the names and the base path.
    pub fn validate(&self) -> Result<(), ArgsError> {
        check_id(&self.id)?;
        check_name("--exec-name", &self.exec_name)?;
        absolute("--chroot-base-dir", &self.chroot_base)?;
        if let Some(parent) = &self.parent_cgroup {
            check_parent_cgroup(parent)?;
        }
        Ok(())
    }
}

fn check_id(id: &str) -> Result<(), ArgsError> {
    let bad = |why: String| ArgsError::Id {
        id: id.to_string(),
        why,
    };
    if id.is_empty() {
        return Err(bad("is empty".into()));
    }
    if id.len() > MAX_ID_LEN {
        return Err(bad(format!(
            "is {} characters long; at most {MAX_ID_LEN}",
            id.len()
        )));
    }
    if let Some(c) = id.chars().find(|c| !c.is_ascii_alphanumeric() && *c != '-') {
        return Err(bad(format!(
            "holds {c:?}; an id is letters, digits and '-'"
        )));
    }
    Ok(())
}

fn absolute(flag: &'static str, path: &Path) -> Result<(), ArgsError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(ArgsError::NotAbsolute {
            flag,
            path: path.to_path_buf(),
        })
    }
}

fn regular_file(flag: &'static str, path: &Path) -> Result<(), ArgsError> {
    let meta = std::fs::metadata(path).map_err(|e| ArgsError::File {
        flag,
        path: path.to_path_buf(),
        err: e.to_string(),
    })?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(ArgsError::NotAFile {
            flag,
            path: path.to_path_buf(),
        })
    }
}

pub(super) fn exec_name_of(file: &Path) -> Result<String, ArgsError> {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    check_name("--exec-file", name).map(|()| name.to_string())
}

/// A name used as one path component: the exec name, or a part of `--parent-cgroup`.
fn check_name(flag: &'static str, name: &str) -> Result<(), ArgsError> {
    let bad = |why| ArgsError::Name {
        flag,
        value: name.to_string(),
        why,
    };
    if name.is_empty() || name == "." || name == ".." {
        return Err(bad("does not name a file"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(bad("may hold only letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

fn check_parent_cgroup(parent: &str) -> Result<(), ArgsError> {
    let flag = "--parent-cgroup";
    let path = Path::new(parent);
    if path.is_absolute() {
        return Err(ArgsError::Name {
            flag,
            value: parent.to_string(),
            why: "must be relative to the cgroup root",
        });
    }
    if !path.components().all(|c| matches!(c, Component::Normal(_))) || parent.ends_with('/') {
        return Err(ArgsError::Name {
            flag,
            value: parent.to_string(),
            why: "must be names separated by '/', without '.' or '..'",
        });
    }
    parent
        .split('/')
        .try_for_each(|part| check_name(flag, part))
        .map_err(|_| ArgsError::Name {
            flag,
            value: parent.to_string(),
            why: "may hold only letters, digits, '-', '_', '.' and '/'",
        })
}
