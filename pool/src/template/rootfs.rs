//! A template's root filesystem image: an ext4 file made from a directory tree with `mke2fs -d`
//! (owners and modes kept; run as root) or copied sparse from an existing image, with the static
//! guest agent written in at [`AGENT_PATH`] (the kernel starts it as init).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// Where the agent lives in every template's root filesystem.
pub const AGENT_PATH: &str = "/usr/sbin/kiln-agent";
/// Folders the agent mounts over or relies on; made when a tree lacks them.
const SKELETON: &[&str] = &[
    "proc", "sys", "dev", "tmp", "run", "usr/sbin", "etc", "root",
];
const MIB: u64 = 1 << 20;

/// Why an image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A file operation failed.
    #[error("{what} {path}: {err}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: String,
        /// Why.
        err: std::io::Error,
    },
    /// A tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The command.
        tool: String,
        /// Its exit status.
        status: String,
        /// The last of what it printed.
        stderr: String,
    },
    /// Copying an image failed.
    #[error("copying the image {from} to {image}: {err}")]
    Copy {
        /// The image copied.
        from: String,
        /// The copy being made.
        image: String,
        /// Why.
        err: kiln_snapshot::MemFileError,
    },
    /// A tool is missing.
    #[error(
        "{tool} is not installed (Debian package {package}); kilnd needs it to build templates"
    )]
    Missing {
        /// The program.
        tool: &'static str,
        /// Its Debian package.
        package: &'static str,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError {
    let path = path.display().to_string();
    move |err| RootfsError::Io { what, path, err }
}

/// Copies `source` to a new `image` of the same length, data ranges only (its holes stay holes,
/// and file systems that share extents share them), without relying on GNU cp's `--sparse`.
fn sparse_copy(source: &Path, image: &Path) -> Result<(), RootfsError> {
    let copy_err = |err| RootfsError::Copy {
        from: source.display().to_string(),
        image: image.display().to_string(),
        err,
    };
    let from = std::fs::File::open(source).map_err(io("opening", source))?;
    let len = from.metadata().map_err(io("reading", source))?.len();
    let to = std::fs::File::create(image).map_err(io("creating", image))?;
    to.set_len(len).map_err(io("sizing", image))?;
    let ranges = kiln_snapshot::data_ranges(&from, source).map_err(copy_err)?;
    kiln_snapshot::memfile::copy_ranges((&from, source), (&to, image), &ranges)
        .map_err(copy_err)?;
    to.sync_all().map_err(io("syncing", image))
}

/// Runs `cmd`, failing with its stderr's tail unless it exits 0.
pub fn run(
    cmd: &mut Command,
    tool: &'static str,
    package: &'static str,
) -> Result<String, RootfsError> {
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            RootfsError::Missing { tool, package }
        } else {
            RootfsError::Io {
                what: "starting",
                path: tool.into(),
                err: e,
            }
        }
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(RootfsError::Tool {
            tool: format!("{cmd:?}"),
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Bytes a tree's files hold (their apparent sizes, links not followed), to size its image.
fn tree_bytes(tree: &Path) -> Result<u64, RootfsError> {
    let mut total = 0;
    let mut dirs = vec![tree.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io("reading", &dir))? {
            let entry = entry.map_err(io("reading", &dir))?;
            let meta = entry.metadata().map_err(io("reading", &entry.path()))?;
            total += meta.len();
            if meta.is_dir() {
                dirs.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// The size of an image for a tree of `used` bytes: an eighth more for metadata, 64 MiB of ext4
/// overhead and slack, at least `want_mib`, in whole MiB.
pub fn image_size(used: u64, want_mib: Option<u64>) -> u64 {
    let auto = (used + used / 8 + 64 * MIB).div_ceil(MIB) * MIB;
    auto.max(want_mib.unwrap_or(0) * MIB)
}

/// Puts the agent and the skeleton folders into `tree`.
pub fn prepare_tree(tree: &Path, agent: &Path) -> Result<(), RootfsError> {
    for d in SKELETON {
        let p = tree.join(d);
        std::fs::create_dir_all(&p).map_err(io("creating", &p))?;
    }
    let dest = tree.join(AGENT_PATH.trim_start_matches('/'));
    let _ = std::fs::remove_file(&dest);
    std::fs::copy(agent, &dest).map_err(io("copying the agent to", &dest))?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))
        .map_err(io("setting the mode of", &dest))?;
    Ok(())
}

/// Makes `image` from `tree` (which [`prepare_tree`] prepared), `want_mib` MiB or more.
pub fn image_from_tree(
    tree: &Path,
    image: &Path,
    want_mib: Option<u64>,
) -> Result<u64, RootfsError> {
    let size = image_size(tree_bytes(tree)?, want_mib);
    let f = std::fs::File::create(image).map_err(io("creating", image))?;
    f.set_len(size).map_err(io("sizing", image))?;
    drop(f);
    run(
        Command::new("mke2fs")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-L",
                "kiln-root",
                "-b",
                "4096",
                "-m",
                "0",
                "-d",
            ])
            .arg(tree)
            .arg(image),
        "mke2fs",
        "e2fsprogs",
    )?;
    Ok(size)
}

/// Copies the ext4 image `source` to `image` (sparse), grows it to `want_mib` MiB when asked,
/// and writes the agent in with `debugfs`.
pub fn image_from_image(
    source: &Path,
    image: &Path,
    want_mib: Option<u64>,
    agent: &Path,
) -> Result<u64, RootfsError> {
    sparse_copy(source, image)?;
    let len = std::fs::metadata(image)
        .map_err(io("reading", image))?
        .len();
    let want = want_mib.unwrap_or(0) * MIB;
    if want > len {
        std::fs::OpenOptions::new()
            .write(true)
            .open(image)
            .and_then(|f| f.set_len(want))
            .map_err(io("growing", image))?;
        run(
            Command::new("e2fsck").args(["-fy"]).arg(image),
            "e2fsck",
            "e2fsprogs",
        )
        .or_else(
            // e2fsck exits 1 when it fixed something, which is fine before a resize.
            |e| match e {
                RootfsError::Tool { ref status, .. } if status.contains("exit status: 1") => {
                    Ok(String::new())
                }
                e => Err(e),
            },
        )?;
        run(
            Command::new("resize2fs").arg(image),
            "resize2fs",
            "e2fsprogs",
        )?;
    }
    let script = format!(
        "rm {AGENT_PATH}\nwrite {} {AGENT_PATH}\nsif {AGENT_PATH} mode 0100755\nsif {AGENT_PATH} uid 0\nsif {AGENT_PATH} gid 0\n",
        agent.display()
    );
    let script_file = image.with_extension("debugfs");
    std::fs::write(&script_file, script).map_err(io("writing", &script_file))?;
    let result = run(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&script_file)
            .arg(image),
        "debugfs",
        "e2fsprogs",
    );
    let _ = std::fs::remove_file(&script_file);
    result?;
    // debugfs reports most failures on stdout and exits 0: read the file back instead.
    let check = run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat {AGENT_PATH}"))
            .arg(image),
        "debugfs",
        "e2fsprogs",
    )?;
    let agent_len = std::fs::metadata(agent)
        .map_err(io("reading", agent))?
        .len();
    if !check.contains(&format!("Size: {agent_len}")) {
        return Err(RootfsError::Tool {
            tool: "debugfs".into(),
            status: "exit status: 0".into(),
            stderr: format!(
                "the agent in {} is not {agent_len} bytes long",
                image.display()
            ),
        });
    }
    Ok(std::fs::metadata(image)
        .map_err(io("reading", image))?
        .len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_sizes_leave_room_and_honour_the_ask() {
        assert_eq!(image_size(0, None), 64 * MIB);
        assert_eq!(image_size(100 * MIB, None), (100 + 13 + 64) * MIB);
        assert_eq!(image_size(100 * MIB, Some(1024)), 1024 * MIB);
    }

    fn tools() -> bool {
        Command::new("mke2fs").arg("-V").output().is_ok()
            && Command::new("debugfs").arg("-V").output().is_ok()
    }

    #[test]
    fn a_tree_and_an_image_both_get_the_agent() {
        if !tools() {
            eprintln!("e2fsprogs missing: skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!("kiln-rootfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hello"), "hi\n").unwrap();
        let agent = dir.join("agent");
        std::fs::write(&agent, vec![7u8; 12345]).unwrap();
        prepare_tree(&tree, &agent).unwrap();
        let img = dir.join("a.ext4");
        image_from_tree(&tree, &img, Some(80)).unwrap();
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 80 * MIB);
        let cat = |img: &Path, p: &str| {
            run(
                Command::new("debugfs")
                    .arg("-R")
                    .arg(format!("cat {p}"))
                    .arg(img),
                "debugfs",
                "e2fsprogs",
            )
            .unwrap()
        };
        assert_eq!(cat(&img, "/etc/hello"), "hi\n");
        // Copy it, grow it, put another agent in.
        let agent2 = dir.join("agent2");
        std::fs::write(&agent2, vec![9u8; 999]).unwrap();
        let img2 = dir.join("b.ext4");
        image_from_image(&img, &img2, Some(96), &agent2).unwrap();
        assert_eq!(std::fs::metadata(&img2).unwrap().len(), 96 * MIB);
        assert_eq!(cat(&img2, AGENT_PATH).as_bytes(), &vec![9u8; 999][..]);
        assert_eq!(cat(&img2, "/etc/hello"), "hi\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
