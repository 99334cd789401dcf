//! Sandboxes' writable root disks with `disk = "cow"`: the template's image is the read-only base
//! of every sandbox's root drive, and each VM writes to a sparse copy-on-write overlay file of its
//! own (kiln-vmm's `cow_overlay_path`), [`OVERLAY`] in its folder.
//!
//! A snapshot's folder (template, paused sandbox, fork) holds the overlay as it was when the
//! snapshot was taken, next to the memory file, since the two must agree: the guest's page cache
//! and the blocks on disk. A VM restored from a snapshot gets a sparse copy of that overlay
//! ([`copy_sparse`]), so a sandbox costs the clusters its template wrote (usually a few MiB)
//! rather than a copy of the image; `copy_file_range` shares extents instead where the
//! filesystem can reflink.

use std::fs::File;
use std::path::{Path, PathBuf};

/// The overlay's file name, in a VM's folder and in a snapshot's.
pub const OVERLAY: &str = "rootfs.overlay";

/// Why an overlay could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A file could not be opened, sized or created.
    #[error("overlay {path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The data could not be copied.
    #[error("copying overlay {from} to {to}: {err}")]
    Copy {
        /// The source.
        from: PathBuf,
        /// The copy.
        to: PathBuf,
        /// Why.
        err: kiln_snapshot::MemFileError,
    },
}

/// The overlay a VM in `dir` writes to.
pub fn live_overlay(dir: &Path) -> PathBuf {
    dir.join(OVERLAY)
}

/// Copies the overlay `from` to `to` (replacing it), holes and all: only its data ranges are
/// copied, so the copy costs what the source's VM wrote. Returns the bytes copied.
pub fn copy_sparse(from: &Path, to: &Path) -> Result<u64, DiskError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |err| DiskError::Io { path, err }
    };
    let src = File::open(from).map_err(io(from))?;
    let len = src.metadata().map_err(io(from))?.len();
    let dst = File::create(to).map_err(io(to))?;
    dst.set_len(len).map_err(io(to))?;
    let copy_err = |err| DiskError::Copy {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        err,
    };
    let ranges = kiln_snapshot::data_ranges(&src, from).map_err(copy_err)?;
    kiln_snapshot::memfile::copy_ranges((&src, from), (&dst, to), &ranges).map_err(copy_err)
}

/// Makes an empty overlay at `path` for a VM that boots over a fresh image (kiln-vmm extends it
/// to the image's length).
pub fn create_empty(path: &Path) -> Result<(), DiskError> {
    File::create(path).map(drop).map_err(|err| DiskError::Io {
        path: path.to_path_buf(),
        err,
    })
}

/// Gives a VM about to be restored in `dir` from the snapshot whose overlay would be
/// `snapshot_overlay` its own copy of it; `None` when the snapshot has no overlay (a
/// `disk = "tmpfs"` template), so the VM restores with the drive as saved.
pub fn overlay_for_restore(
    snapshot_overlay: &Path,
    dir: &Path,
) -> Result<Option<PathBuf>, DiskError> {
    if !snapshot_overlay.exists() {
        return Ok(None);
    }
    let live = live_overlay(dir);
    copy_sparse(snapshot_overlay, &live)?;
    Ok(Some(live))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_sparse_copy_keeps_data_and_holes() {
        let dir = std::env::temp_dir().join(format!("kiln-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let from = dir.join("a.overlay");
        let f = File::create(&from).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 8192], 1 << 20).unwrap();
        f.write_all_at(&[0u8; 4096], 40 << 20).unwrap(); // written zeros are data too
        drop(f);
        let to = dir.join("b").join(OVERLAY);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(&to, b"stale").unwrap();
        let copied = copy_sparse(&from, &to).unwrap();
        assert_eq!(copied, 8192 + 4096);
        assert_eq!(std::fs::read(&to).unwrap(), std::fs::read(&from).unwrap());
        let t = File::open(&to).unwrap();
        assert_eq!(
            kiln_snapshot::data_ranges(&t, &to).unwrap(),
            vec![(1 << 20)..(1 << 20) + 8192, (40 << 20)..(40 << 20) + 4096]
        );

        assert_eq!(overlay_for_restore(&dir.join("none"), &dir).unwrap(), None);
        let live = overlay_for_restore(&from, &dir.join("b")).unwrap().unwrap();
        assert_eq!(live, to);
        let e = copy_sparse(&dir.join("missing"), &to).unwrap_err();
        assert!(
            e.to_string().starts_with("overlay ") && e.to_string().contains("missing"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
