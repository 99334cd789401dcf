//! Turning an exec's `user` string into ids, reading `/etc/passwd` and `/etc/group` directly: the
//! agent is a static binary, and glibc's NSS lookups do not work there.

use std::path::Path;

/// The identity a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups, the primary one included.
    pub groups: Vec<u32>,
    /// Login name, when the passwd file has one.
    pub name: Option<String>,
    /// Home directory, when the passwd file has one.
    pub home: Option<String>,
}

/// Why a user string could not be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    /// A name that is not in the passwd file.
    #[error("no user {0:?} in /etc/passwd")]
    NoSuchUser(String),
    /// A group name that is not in the group file.
    #[error("no group {0:?} in /etc/group")]
    NoSuchGroup(String),
    /// An empty part.
    #[error("user {0:?} is not name, uid, name:group or uid:gid")]
    Malformed(String),
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn read(path: &str, root: &Path) -> String {
    std::fs::read_to_string(root.join(path.trim_start_matches('/'))).unwrap_or_default()
}

fn passwd(text: &str) -> impl Iterator<Item = PasswdEntry> + '_ {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        Some(PasswdEntry {
            name: f[0].to_string(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5].to_string(),
        })
    })
}

/// `(name, gid, members)` for each line of a group file.
fn groups(text: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> + '_ {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 {
            return None;
        }
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolves `spec` against the files under `root` (`/` in the guest). A numeric uid without a
/// passwd entry gets the gid of the same number; a user with a passwd entry also gets every group
/// that lists it as a member.
pub fn resolve(spec: &str, root: &Path) -> Result<Identity, UserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group == Some("") {
        return Err(UserError::Malformed(spec.to_string()));
    }
    let passwd_text = read("/etc/passwd", root);
    let group_text = read("/etc/group", root);
    let (uid, entry) = match user.parse::<u32>() {
        Ok(uid) => (uid, passwd(&passwd_text).find(|e| e.uid == uid)),
        Err(_) => {
            let e = passwd(&passwd_text)
                .find(|e| e.name == user)
                .ok_or_else(|| UserError::NoSuchUser(user.to_string()))?;
            (e.uid, Some(e))
        }
    };
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups(&group_text)
                .find(|(name, _, _)| *name == g)
                .map(|(_, gid, _)| gid)
                .ok_or_else(|| UserError::NoSuchGroup(g.to_string()))?,
        },
        None => entry.as_ref().map_or(uid, |e| e.gid),
    };
    let mut ids = vec![gid];
    if let Some(e) = &entry {
        for (_, g, members) in groups(&group_text) {
            if members.contains(&e.name.as_str()) && !ids.contains(&g) {
                ids.push(g);
            }
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups: ids,
        name: entry.as_ref().map(|e| e.name.clone()),
        home: entry.map(|e| e.home),
    })
}

/// The guest's user and group names by id, read once (for describing many files).
#[derive(Debug, Default)]
pub struct Names {
    users: std::collections::HashMap<u32, String>,
    groups: std::collections::HashMap<u32, String>,
}

impl Names {
    /// Reads `/etc/passwd` and `/etc/group` under `root`; missing files give no names.
    pub fn load(root: &Path) -> Names {
        let mut names = Names::default();
        for e in passwd(&read("/etc/passwd", root)) {
            names.users.entry(e.uid).or_insert(e.name);
        }
        for (name, gid, _) in groups(&read("/etc/group", root)) {
            names.groups.entry(gid).or_insert_with(|| name.to_string());
        }
        names
    }

    /// The name of user `uid`.
    pub fn user(&self, uid: u32) -> Option<String> {
        self.users.get(&uid).cloned()
    }

    /// The name of group `gid`.
    pub fn group(&self, gid: u32) -> Option<String> {
        self.groups.get(&gid).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-agent-user-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(
            dir.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\nbroken\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("etc/group"),
            "root:x:0:\nalice:x:1000:\nwheel:x:10:root,alice\naudio:x:29:bob\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn names_ids_and_groups() {
        let r = root();
        let a = resolve("alice", &r).unwrap();
        assert_eq!(
            (a.uid, a.gid, a.groups.clone()),
            (1000, 1000, vec![1000, 10])
        );
        assert_eq!(a.home.as_deref(), Some("/home/alice"));
        let n = resolve("4242", &r).unwrap();
        assert_eq!(
            (n.uid, n.gid, n.groups, n.name),
            (4242, 4242, vec![4242], None)
        );
        let g = resolve("1000:audio", &r).unwrap();
        assert_eq!((g.uid, g.gid, g.groups), (1000, 29, vec![29, 10]));
        let ng = resolve("alice:7", &r).unwrap();
        assert_eq!(ng.gid, 7);
        assert_eq!(resolve("bob", &r), Err(UserError::NoSuchUser("bob".into())));
        assert_eq!(
            resolve("alice:nogroup", &r),
            Err(UserError::NoSuchGroup("nogroup".into()))
        );
        assert_eq!(resolve(":1", &r), Err(UserError::Malformed(":1".into())));
        assert_eq!(resolve("1:", &r), Err(UserError::Malformed("1:".into())));
        let names = Names::load(&r);
        assert_eq!(names.user(1000).as_deref(), Some("alice"));
        assert_eq!(names.group(10).as_deref(), Some("wheel"));
        assert_eq!(names.user(4242), None);
        let _ = std::fs::remove_dir_all(r);
    }
}
