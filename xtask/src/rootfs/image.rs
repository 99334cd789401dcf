//! The ext4 images: the base image made from the base tree by `mke2fs -d`, the final image made
//! from a sparse copy of it with the agent written in by `debugfs`, and the boot-free checks both
//! pass before they are renamed into the cache.
//!
//! Copy-and-inject was measured against copying the tree and running `mke2fs -d` again: about
//! 0.2 s against 0.5 s, and only an image (not a tree) has to be cached.

use super::base::{AGENT_PATH, SANDBOX_UID};
use crate::util;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

/// Free space the sandbox gets on top of what the image holds. The file is sparse, so headroom
/// costs the host nothing until the guest writes.
pub const HEADROOM: u64 = 256 << 20;
/// Room kept for the agent, which is written in after the base image is sized.
pub const AGENT_ROOM: u64 = 32 << 20;
/// ext4's own fixed costs on a few-hundred-MiB file system: the journal (16 MiB) and slack.
const FS_OVERHEAD: u64 = 32 << 20;
const MIB: u64 = 1 << 20;

/// mke2fs's choices for the base image. Under 512 MiB mke2fs would pick its "small" profile
/// (1 KiB blocks), so block size and inode ratio are fixed here: 4 KiB blocks, an inode per 8 KiB
/// (tens of thousands free for a sandbox's pip installs), and `-m 0`: no blocks reserved for
/// root, since the headroom is all the sandbox's.
pub const MKE2FS_OPTIONS: &[&str] = &["-b", "4096", "-i", "8192", "-m", "0"];

/// Bytes for an image holding a tree of `used` bytes (in whole blocks), the agent and the
/// headroom: an eighth on top of `used` for inode tables and directories, rounded up to a MiB.
pub fn image_size(used: u64) -> u64 {
    (used + used / 8 + FS_OVERHEAD + AGENT_ROOM + HEADROOM).div_ceil(MIB) * MIB
}

/// Makes the base image `img` from `tree` and checks it.
pub fn make_base(tree: &Path, img: &Path) -> util::Result<()> {
    let size = image_size(tree_usage(tree)?);
    std::fs::File::create(img)
        .and_then(|f| f.set_len(size))
        .map_err(|e| format!("cannot create {}: {e}", img.display()))?;
    quiet(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", "kiln-root"])
            .args(MKE2FS_OPTIONS)
            .arg("-d")
            .arg(tree)
            .arg(img),
    )?;
    check(img, None)
}

/// Copies the base image to `img` (keeping it sparse) and writes `agent` in at [`AGENT_PATH`].
/// `scratch` is a folder for debugfs's command file.
pub fn inject_agent(base: &Path, agent: &Path, img: &Path, scratch: &Path) -> util::Result<()> {
    util::run(Command::new("cp").arg("--sparse=always").arg(base).arg(img))?;
    let (dir, name) = AGENT_PATH.rsplit_once('/').unwrap_or(("/", AGENT_PATH));
    // debugfs `write` takes a name in the current folder, not a path; `sif` fixes mode and owner
    // whatever the host file had.
    let commands = format!(
        "cd {dir}\nwrite \"{}\" {name}\nsif {name} mode 0100755\nsif {name} uid 0\nsif {name} gid 0\n",
        agent.display()
    );
    let file = scratch.join("inject.debugfs");
    util::write_atomic(&file, commands.as_bytes())?;
    // debugfs exits 0 even when a command fails; `check` finds out.
    quiet(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&file)
            .arg(img),
    )?;
    check(img, Some((agent, scratch)))
}

/// Boot-free checks: e2fsck finds nothing, python3 and /sbin/init are there, the headroom is
/// free and, for a final image, the agent reads back byte for byte as root's, mode 0755.
fn check(img: &Path, agent: Option<(&Path, &Path)>) -> util::Result<()> {
    let fail = |what: String| Err(format!("{}: {what}", img.display()));
    quiet(Command::new("e2fsck").arg("-fn").arg(img))?;
    let debugfs = |request: &str| quiet(Command::new("debugfs").arg("-R").arg(request).arg(img));
    if !debugfs("ls -p /usr/bin")?
        .lines()
        .any(|l| l.contains("/python3/"))
    {
        return fail("no /usr/bin/python3".into());
    }
    if !debugfs("stat /sbin/init")?.contains(&format!("Fast link dest: \"{AGENT_PATH}\"")) {
        return fail(format!("/sbin/init is not a symlink to {AGENT_PATH}"));
    }
    if !debugfs("ls -p /home")?.contains(&format!("/{SANDBOX_UID}/{SANDBOX_UID}/sandbox/")) {
        return fail(format!("no /home/sandbox owned by {SANDBOX_UID}"));
    }
    let free = free_bytes(&quiet(Command::new("dumpe2fs").arg("-h").arg(img))?)
        .ok_or_else(|| format!("dumpe2fs -h {} shows no free block count", img.display()))?;
    let wanted = if agent.is_some() {
        HEADROOM
    } else {
        HEADROOM + AGENT_ROOM
    };
    if free < wanted {
        return fail(format!(
            "only {} MiB free, wanted {}",
            free / MIB,
            wanted / MIB
        ));
    }
    let Some((agent, scratch)) = agent else {
        return Ok(());
    };
    let back = scratch.join("agent-read-back");
    let _ = std::fs::remove_file(&back);
    // -p: the dumped file takes the inode's owner and mode.
    debugfs(&format!("dump -p {AGENT_PATH} \"{}\"", back.display()))?;
    let meta = std::fs::metadata(&back)
        .map_err(|_| format!("{}: no {AGENT_PATH} after debugfs write", img.display()))?;
    if util::hash_file(&back)? != util::hash_file(agent)? {
        return fail(format!("{AGENT_PATH} differs from {}", agent.display()));
    }
    if meta.permissions().mode() & 0o7777 != 0o755 || meta.uid() != 0 || meta.gid() != 0 {
        return fail(format!("{AGENT_PATH} is not root's with mode 0755"));
    }
    Ok(())
}

/// Free bytes from `dumpe2fs -h` output ("Free blocks:" times "Block size:").
fn free_bytes(header: &str) -> Option<u64> {
    let field = |name: &str| {
        header
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some(field("Free blocks:")? * field("Block size:")?)
}

/// Bytes `dir` takes on disk (allocated blocks, folders included; hard links count each time).
fn tree_usage(dir: &Path) -> util::Result<u64> {
    let mut total = 0;
    for entry in
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?
    {
        let path = entry
            .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
            .path();
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
        total += meta.blocks() * 512;
        if meta.is_dir() {
            total += tree_usage(&path)?;
        }
    }
    Ok(total)
}

/// Runs `cmd` capturing its output, which is shown only if it fails (e2fsprogs tools print
/// banners and summaries nobody needs on success). Returns stdout.
fn quiet(cmd: &mut Command) -> util::Result<String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot start {}: {e}", util::describe(cmd)))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    Err(format!(
        "{} failed: {}\n{stdout}{}",
        util::describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_covers_tree_overhead_agent_and_headroom() {
        let empty = image_size(0);
        assert_eq!(empty, FS_OVERHEAD + AGENT_ROOM + HEADROOM);
        let used = 120 * MIB + 1;
        let size = image_size(used);
        assert_eq!(size % MIB, 0);
        assert!(size >= used + used / 8 + FS_OVERHEAD + AGENT_ROOM + HEADROOM);
        assert!(size < used + used / 8 + FS_OVERHEAD + AGENT_ROOM + HEADROOM + MIB);
    }

    #[test]
    fn free_space_from_dumpe2fs_header() {
        let header = "Filesystem volume name:   kiln-root\nBlock count:              153600\n\
                      Free blocks:              79785\nFree inodes:              30041\n\
                      Block size:               4096\n";
        assert_eq!(free_bytes(header), Some(79785 * 4096));
        assert_eq!(free_bytes("Block size: 4096\n"), None);
    }
}
