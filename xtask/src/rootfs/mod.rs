//! `cargo xtask rootfs`: the guest root filesystem, an ext4 image of Debian bookworm (minbase and
//! python3) whose PID 1 is Kiln's static guest agent (`init=/usr/sbin/kiln-agent`, and
//! `/sbin/init` points there too).
//!
//! Two cache levels under `<cache>/rootfs/`, both by content:
//! - `base-<key>.ext4`: the debootstrapped, configured and trimmed tree without the agent
//!   ([`base`], [`image::make_base`]), keyed by the [`Recipe`];
//! - `img-<key>/rootfs.ext4`: a sparse copy of the base with the agent written in
//!   ([`image::inject_agent`]), keyed by the base key and the agent's bytes, so a new agent
//!   costs a copy and a debugfs run, not a debootstrap. Only the newest few are kept.
//!
//! Work happens in `tmp-<pid>-<n>` folders; an entry is renamed into place only after its checks
//! pass, so a killed build leaves no half entry, and the next run removes the leftovers.

mod agent;
mod base;
mod image;

use crate::util;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Instant, SystemTime};

/// Bump when the way the tree or the images are made changes in a way the [`Recipe`] does not see.
const RECIPE_VERSION: &str = "1";

/// The Debian mirror debootstrap fetches from, unless `KILN_DEBIAN_MIRROR` names another.
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// Final images kept besides the one just returned; base images kept besides the current one
/// (two package sets, the default and kilnd's python template's, live side by side).
const KEEP_OLD_IMAGES: usize = 3;
const KEEP_OLD_BASES: usize = 2;

/// The packages of kilnd's bundled `python` template (pool/examples/python.toml).
pub const PYTHON_PACKAGES: &[&str] = &["python3", "python3-numpy", "python3-pandas"];

/// The name kilnd looks for a Debian image made ahead under: `debian-<key>.ext4`, where the key
/// is the one `kiln_pool::template::debian::key` computes (both tests check the same vector).
pub fn debian_image_name(packages: &[&str]) -> String {
    let mut sorted: Vec<&str> = packages.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let text = format!("kiln-debian-v1\n{}\n{}", base::SUITE, sorted.join(" "));
    let key = format!(
        "{:x}",
        <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes())
    );
    format!("debian-{}.ext4", &key[..16])
}

const USAGE: &str = "usage: cargo xtask rootfs [--agent PATH]

Builds (or finds in the cache) the guest root filesystem, Debian bookworm with python3 and
kiln-agent at /usr/sbin/kiln-agent, and prints the image's path. --agent PATH puts that static
executable there instead of building kiln-agent. KILN_DEBIAN_MIRROR overrides the mirror.
";

/// Entry point for `cargo xtask rootfs`: prints the image path on stdout.
pub fn main(rest: &[String]) -> util::Result<u8> {
    let image = match rest {
        [] => build()?,
        [flag, path] if flag == "--agent" => build_with_agent(Path::new(path), base::INCLUDE)?,
        [help] if help == "-h" || help == "--help" => {
            print!("{USAGE}");
            return Ok(0);
        }
        _ => return Err(format!("rootfs: unexpected arguments {rest:?}\n{USAGE}")),
    };
    println!("{}", image.display());
    Ok(0)
}

/// Returns the path of a ready `rootfs.ext4` in the cache holding the freshly built agent. The
/// file is the cache entry itself: copy it (or attach it read-only) before a guest writes to it.
pub fn build() -> util::Result<PathBuf> {
    let agent = agent::build()?;
    build_with_agent(&agent, base::INCLUDE)
}

/// [`build`] with `packages` (python3 among them) instead of the default set.
pub fn build_with_packages(packages: &[&str]) -> util::Result<PathBuf> {
    let agent = agent::build()?;
    build_with_agent(&agent, packages)
}

/// The static agent (built if needed), for images made elsewhere (kilnd writes it into its
/// templates).
pub fn static_agent() -> util::Result<PathBuf> {
    agent::build()
}

/// What decides the base image's bytes (up to mirror drift: a hit is never re-fetched).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Recipe {
    /// [`RECIPE_VERSION`].
    version: String,
    /// The Debian release.
    suite: String,
    /// The mirror debootstrap fetches from.
    mirror: String,
    /// Packages on top of minbase.
    include: Vec<String>,
    /// Everything else the tree is made from: written files, trimming, users, sizing.
    settings: String,
}

impl Recipe {
    fn current(packages: &[&str]) -> Recipe {
        let mirror = std::env::var("KILN_DEBIAN_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.into());
        Recipe {
            version: RECIPE_VERSION.into(),
            suite: base::SUITE.into(),
            mirror,
            include: packages.iter().map(|p| p.to_string()).collect(),
            settings: format!(
                "{:?} {:?} {} {} {} {} {} {:?}",
                base::FILES,
                base::TRIM,
                base::SANDBOX_USER,
                base::SANDBOX_UID,
                base::AGENT_PATH,
                image::HEADROOM,
                image::AGENT_ROOM,
                image::MKE2FS_OPTIONS
            ),
        }
    }

    /// 16 hex digits naming the base image.
    fn key(&self) -> String {
        short(&util::hash_parts([
            self.version.as_bytes(),
            self.suite.as_bytes(),
            self.mirror.as_bytes(),
            self.include.join(",").as_bytes(),
            self.settings.as_bytes(),
        ]))
    }
}

/// 16 hex digits naming a final image: its base and its agent's SHA-256.
fn final_key(base_key: &str, agent_hash: &str) -> String {
    short(&util::hash_parts([
        base_key.as_bytes(),
        agent_hash.as_bytes(),
    ]))
}

fn short(hash: &str) -> String {
    hash.chars().take(16).collect()
}

/// Builds (or finds) the final image of `packages` with `agent` at `/usr/sbin/kiln-agent`.
fn build_with_agent(agent: &Path, packages: &[&str]) -> util::Result<PathBuf> {
    if !packages.contains(&"python3") {
        return Err(format!(
            "the rootfs packages {packages:?} must include python3 (its check runs it)"
        ));
    }
    agent::check_static(agent)?;
    let recipe = Recipe::current(packages);
    let base_key = recipe.key();
    let key = final_key(&base_key, &util::hash_file(agent)?);
    let root = util::cache_dir().join("rootfs");
    let entry = root.join(format!("img-{key}"));
    let image = entry.join("rootfs.ext4");
    if image.is_file() {
        touch(&entry);
        return Ok(image);
    }

    util::ensure_packages(&["debootstrap", "e2fsprogs"])?;
    util::mkdir(&root)?;
    WorkDir::remove_stale(&root);
    let base = base_image(&root, &recipe, &base_key)?;
    let work = WorkDir::create(&root)?;
    let started = Instant::now();
    let staged = work.0.join("entry");
    util::mkdir(&staged)?;
    image::inject_agent(&base, agent, &staged.join("rootfs.ext4"), &work.0)?;
    if let Err(e) = std::fs::rename(&staged, &entry) {
        // Another run finished the same image first; theirs is as good.
        if !image.is_file() {
            return Err(format!(
                "cannot rename {} to {}: {e}",
                staged.display(),
                entry.display()
            ));
        }
    }
    eprintln!(
        "xtask: rootfs {key}: agent written in and checked in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    prune(&root, "img-", &format!("img-{key}"), KEEP_OLD_IMAGES);
    Ok(image)
}

/// The base image for `recipe`, debootstrapping it first on a miss.
fn base_image(root: &Path, recipe: &Recipe, key: &str) -> util::Result<PathBuf> {
    let name = format!("base-{key}.ext4");
    let base = root.join(&name);
    if base.is_file() {
        touch(&base);
        return Ok(base);
    }
    let started = Instant::now();
    let work = WorkDir::create(root)?;
    let tree = work.0.join("tree");
    base::build_tree(&tree, &recipe.mirror, &recipe.include)?;
    let img = work.0.join(&name);
    image::make_base(&tree, &img)?;
    std::fs::rename(&img, &base)
        .map_err(|e| format!("cannot rename {} to {}: {e}", img.display(), base.display()))?;
    eprintln!(
        "xtask: rootfs base {key} built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    prune(root, "base-", &name, KEEP_OLD_BASES);
    Ok(base)
}

/// Marks a cache entry as just used, so pruning keeps it; failure only affects pruning order.
fn touch(path: &Path) {
    let _ = std::fs::File::open(path).and_then(|f| f.set_modified(SystemTime::now()));
}

/// Removes the entries named `prefix*` in `root` that [`prune_choice`] picks.
fn prune(root: &Path, prefix: &str, current: &str, keep_old: usize) {
    let entries = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let modified = e.metadata().and_then(|m| m.modified()).ok()?;
            name.starts_with(prefix).then_some((name, modified))
        })
        .collect();
    for name in prune_choice(entries, current, keep_old) {
        eprintln!("xtask: pruning old rootfs cache entry {name}");
        let path = root.join(name);
        let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
    }
}

/// Which entries to remove: all but `current` and the `keep_old` most recently used others.
fn prune_choice(
    mut entries: Vec<(String, SystemTime)>,
    current: &str,
    keep_old: usize,
) -> Vec<String> {
    entries.retain(|(name, _)| name != current);
    entries.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    entries
        .into_iter()
        .skip(keep_old)
        .map(|(name, _)| name)
        .collect()
}

/// A scratch folder `<root>/tmp-<pid>-<n>`, removed when dropped. debootstrap mounts /proc and
/// /sys (and, in containers, binds /dev) inside its target, so anything still mounted below the
/// folder is unmounted first, and the folder is left alone if that fails: removing it would
/// reach into the host's /dev.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(root: &Path) -> util::Result<WorkDir> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = root.join(format!("tmp-{}-{n}", std::process::id()));
        util::mkdir(&dir)?;
        // Absolute, to compare with /proc/self/mounts.
        let dir = std::fs::canonicalize(&dir)
            .map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
        Ok(WorkDir(dir))
    }

    /// Removes the scratch folders of runs whose process is gone.
    fn remove_stale(root: &Path) {
        for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix("tmp-").and_then(|r| r.split('-').next()) else {
                continue;
            };
            if !Path::new("/proc").join(pid).exists() {
                eprintln!(
                    "xtask: removing {} left by a killed build",
                    entry.path().display()
                );
                let dir = std::fs::canonicalize(entry.path()).unwrap_or_else(|_| entry.path());
                // Only disk space is at stake; this build does not need the folder gone.
                if let Err(e) = release(&dir) {
                    eprintln!("xtask: {e}");
                }
            }
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = release(&self.0) {
            eprintln!("xtask: {e}");
        }
    }
}

/// Unmounts whatever is mounted below `dir`, then removes it.
fn release(dir: &Path) -> util::Result<()> {
    let mounted = || std::fs::read_to_string("/proc/self/mounts").map(|m| mounts_below(&m, dir));
    for point in mounted().unwrap_or_default() {
        let _ = util::run(Command::new("umount").arg("--lazy").arg(&point));
    }
    match mounted() {
        Ok(left) if left.is_empty() => std::fs::remove_dir_all(dir)
            .map_err(|e| format!("cannot remove {}: {e}", dir.display())),
        Ok(left) => Err(format!(
            "not removing {}: still mounted below it: {}",
            dir.display(),
            left.join(", ")
        )),
        Err(e) => Err(format!(
            "not removing {}: cannot read /proc/self/mounts: {e}",
            dir.display()
        )),
    }
}

/// Mount points at or below `dir` in /proc/self/mounts text, deepest first.
fn mounts_below(mounts: &str, dir: &Path) -> Vec<String> {
    let mut points: Vec<String> = mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .map(unescape_mount_path)
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points
}

/// The kernel writes space, tab, newline and backslash in mount paths as `\ooo` octal escapes.
fn unescape_mount_path(field: &str) -> String {
    let mut out = Vec::new();
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn debian_image_names_match_kilnd() {
        // The vector kiln_pool::template::debian's test checks.
        assert_eq!(
            debian_image_name(&["python3"]),
            "debian-6f88b832bcb639ae.ext4"
        );
        assert_eq!(
            debian_image_name(&["python3", "python3"]),
            debian_image_name(&["python3"])
        );
    }

    #[test]
    fn base_key_follows_every_part_of_the_recipe() {
        let recipe = Recipe::current(base::INCLUDE);
        let key = recipe.key();
        assert_eq!(key.len(), 16);
        assert_eq!(key, recipe.clone().key());
        let changes: [fn(&mut Recipe); 5] = [
            |r| r.version.push('x'),
            |r| r.suite = "trixie".into(),
            |r| r.mirror = "http://other.example/debian".into(),
            |r| r.include.push("curl".into()),
            |r| r.settings.push(' '),
        ];
        for change in changes {
            let mut other = recipe.clone();
            change(&mut other);
            assert_ne!(other.key(), key, "{other:?}");
        }
    }

    #[test]
    fn final_key_follows_base_and_agent() {
        let k = final_key("base1", "agent1");
        assert_eq!(k, final_key("base1", "agent1"));
        assert_ne!(k, final_key("base2", "agent1"));
        assert_ne!(k, final_key("base1", "agent2"));
        // Length prefixes keep the boundary: "ab"+"c" is not "a"+"bc".
        assert_ne!(final_key("ab", "c"), final_key("a", "bc"));
    }

    #[test]
    fn pruning_keeps_current_and_newest_others() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let entries = vec![
            ("img-a".to_string(), t(10)),
            ("img-b".to_string(), t(40)),
            ("img-cur".to_string(), t(5)),
            ("img-c".to_string(), t(30)),
            ("img-d".to_string(), t(20)),
        ];
        assert_eq!(
            prune_choice(entries.clone(), "img-cur", 2),
            ["img-d", "img-a"]
        );
        assert!(prune_choice(entries.clone(), "img-cur", 4).is_empty());
        assert_eq!(prune_choice(entries, "img-cur", 0).len(), 4);
    }

    #[test]
    fn mounts_below_a_folder_deepest_first() {
        let mounts = "/dev/vda / ext4 rw 0 0\n\
                      proc /c/tmp-1-0/tree/proc proc rw 0 0\n\
                      sysfs /c/tmp-1-0/tree/sys sysfs rw 0 0\n\
                      devpts /c/tmp-1-0/tree/dev/pts devpts rw 0 0\n\
                      proc /c/tmp-1-01/proc proc rw 0 0\n\
                      tmpfs /c/my\\040dir/x tmpfs rw 0 0\n";
        assert_eq!(
            mounts_below(mounts, Path::new("/c/tmp-1-0")),
            [
                "/c/tmp-1-0/tree/dev/pts",
                "/c/tmp-1-0/tree/proc",
                "/c/tmp-1-0/tree/sys"
            ]
        );
        assert_eq!(
            mounts_below(mounts, Path::new("/c/my dir")),
            ["/c/my dir/x"]
        );
        assert!(mounts_below(mounts, Path::new("/elsewhere")).is_empty());
    }
}
