//! Memory files: guest memory saved as a (usually sparse) file whose offsets are the offsets of
//! the VMM's guest-memory file (its RAM regions laid end to end), so a restore can map it in place.
//!
//! Two kinds share the layout:
//! - A **full** memory file holds every page. A writer MAY leave all-zero pages as holes (copying
//!   only the guest memory file's [`data_ranges`] does exactly that): a hole reads as zeros.
//! - A **diff** memory file holds only the pages dirtied since the previous snapshot, as data,
//!   with holes everywhere else; its size is at most the full file's. Here a hole means "not
//!   dirty, keep the older content", so the writer MUST write every dirty page, all-zero ones
//!   included: skipping a zero page would make [`merge`] keep the page's stale older content.
//!   [`write_pages`] and [`copy_dirty_ranges`] always leave their pages as data.
//!
//! [`merge`] folds diffs into a full file, atomically. A function given an open file also takes
//! the path that names it in errors (for a memfd, any description). All I/O is positioned
//! (`pread`/`pwrite`, `copy_file_range` with explicit offsets); only the searches for data and
//! holes ([`data_ranges`], [`copy_dirty_ranges`]) move a file's offset.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::atomic::{AtomicFile, AtomicFileError};
use crate::bitmap::PAGE_SIZE;

/// The most bytes asked of one `copy_file_range` call.
const COPY_CHUNK: u64 = 1 << 30;
/// The buffer for copies `copy_file_range` cannot do and for writing zeros.
const BUF_LEN: usize = 1 << 20;

/// Why a memory file could not be read, written or merged. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum MemFileError {
    /// The file does not exist.
    #[error("memory file {0} does not exist")]
    Missing(PathBuf),
    /// The file could not be opened.
    #[error("cannot open memory file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The path is a directory, a FIFO or a device, not a regular file.
    #[error("memory file {0} is not a regular file")]
    NotAFile(PathBuf),
    /// The file's size could not be read.
    #[error("cannot stat memory file {path}: {source}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Looking for data or holes failed.
    #[error("cannot find data or holes in memory file {path} at offset {offset:#x}: {source}")]
    Seek {
        /// The file.
        path: PathBuf,
        /// Where the search started.
        offset: u64,
        /// The OS error.
        source: io::Error,
    },
    /// Copying a range between files failed.
    #[error("cannot copy {from} to {to} at offset {offset:#x}: {source}")]
    Copy {
        /// The source file.
        from: PathBuf,
        /// The destination file.
        to: PathBuf,
        /// Where the failed copy started.
        offset: u64,
        /// The OS error.
        source: io::Error,
    },
    /// The source ended inside a range that was to be copied (it shrank while being copied).
    #[error("memory file {from} ends at {offset:#x}, inside the range being copied to {to}")]
    ShortCopy {
        /// The source file.
        from: PathBuf,
        /// The destination file.
        to: PathBuf,
        /// Where the source ended.
        offset: u64,
    },
    /// Writing pages failed.
    #[error("cannot write memory file {path} at offset {offset:#x}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Where the failed write started.
        offset: u64,
        /// The OS error.
        source: io::Error,
    },
    /// A page write that does not start and end on a page boundary.
    #[error(
        "write of {len:#x} bytes at {offset:#x} to memory file {path} is not page-aligned ({PAGE_SIZE} bytes)"
    )]
    Unaligned {
        /// The file.
        path: PathBuf,
        /// The offset asked for.
        offset: u64,
        /// The length asked for.
        len: u64,
    },
    /// The merge's temporary file could not be sized or given the base's permissions.
    #[error("cannot prepare {path} as a copy of {base}: {source}")]
    Prepare {
        /// The temporary file.
        path: PathBuf,
        /// The base it copies.
        base: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A diff covers more memory than the base it is merged into.
    #[error(
        "diff memory file {diff} is {diff_len} bytes, larger than base memory file {base} ({base_len} bytes)"
    )]
    DiffLargerThanBase {
        /// The diff.
        diff: PathBuf,
        /// Its size.
        diff_len: u64,
        /// The base.
        base: PathBuf,
        /// Its size.
        base_len: u64,
    },
    /// The merged file could not be created or committed.
    #[error(transparent)]
    Atomic(#[from] AtomicFileError),
}

/// What [`merge`] copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeStats {
    /// Bytes of the base's data copied into the new base (its holes are not copied).
    pub base_bytes: u64,
    /// Bytes of data copied from each diff, in the order the diffs were given.
    pub diff_bytes: Vec<u64>,
}

/// The ranges of `file` that hold data, in order, from `lseek(SEEK_DATA / SEEK_HOLE)`; holes are
/// left out. A file system without sparse-file support reports the whole file as data. `path` only
/// names the file in errors. Moves the file's offset.
pub fn data_ranges(file: &File, path: &Path) -> Result<Vec<Range<u64>>, MemFileError> {
    let len = file_len(file, path)?;
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < len {
        let Some(start) = seek(file, path, pos, libc::SEEK_DATA)? else {
            break;
        };
        if start >= len {
            break;
        }
        // Every file has a hole at its end, so SEEK_HOLE from data finds one.
        let end = seek(file, path, start, libc::SEEK_HOLE)?.map_or(len, |e| e.min(len));
        ranges.push(start..end);
        pos = end;
    }
    Ok(ranges)
}

/// Writes whole pages at `offset`, every byte including all-zero pages, so each page written is
/// data in the file, as a diff memory file needs. `offset` and the length must be multiples of
/// [`PAGE_SIZE`].
pub fn write_pages(
    file: &File,
    path: &Path,
    offset: u64,
    bytes: &[u8],
) -> Result<(), MemFileError> {
    let len = bytes.len() as u64;
    if !offset.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(MemFileError::Unaligned {
            path: path.to_path_buf(),
            offset,
            len,
        });
    }
    file.write_all_at(bytes, offset)
        .map_err(|source| MemFileError::Write {
            path: path.to_path_buf(),
            offset,
            source,
        })
}

/// Copies each of `ranges` from `from` to the same offsets in `to`, with `copy_file_range` (so
/// file systems that can share extents do) or by hand where it cannot (across file systems).
/// Holes in the source may stay holes in `to`: right for full memory files, not for diffs (see
/// [`copy_dirty_ranges`]). Returns the bytes copied.
pub fn copy_ranges(
    from: (&File, &Path),
    to: (&File, &Path),
    ranges: &[Range<u64>],
) -> Result<u64, MemFileError> {
    let mut copied = 0;
    for range in ranges {
        copy_range(from, to, range.clone())?;
        copied += range.end - range.start;
    }
    Ok(copied)
}

/// Copies the dirty `ranges` (for instance a [`crate::PageBitmap`]'s, shifted by the region's
/// file offset) from the guest memory file into a diff memory file, then writes zeros over any
/// hole left in them, so that every dirty page is data in `to`. Returns the bytes copied.
pub fn copy_dirty_ranges(
    from: (&File, &Path),
    to: (&File, &Path),
    ranges: &[Range<u64>],
) -> Result<u64, MemFileError> {
    let copied = copy_ranges(from, to, ranges)?;
    for range in ranges {
        fill_holes(to.0, to.1, range.clone())?;
    }
    Ok(copied)
}

/// Folds the diff memory files `diffs` into the full memory file `base`, in order (a page dirty
/// in several diffs takes the last one's content), and replaces `base` atomically: the merge is
/// built in a temporary beside `base` (a sparse copy of its data, then each diff's data), fsynced,
/// and renamed over it. On any error `base` is unchanged. The new base keeps the old one's
/// permissions, and its holes where neither the base nor a diff had data.
///
/// Every file is checked before anything is written: a missing file or a diff larger than the
/// base is refused.
pub fn merge(base: &Path, diffs: &[PathBuf]) -> Result<MergeStats, MemFileError> {
    let base_file = open_existing(base)?;
    let base_len = file_len(&base_file, base)?;
    let mut diff_files = Vec::with_capacity(diffs.len());
    for diff in diffs {
        let file = open_existing(diff)?;
        let diff_len = file_len(&file, diff)?;
        if diff_len > base_len {
            return Err(MemFileError::DiffLargerThanBase {
                diff: diff.clone(),
                diff_len,
                base: base.to_path_buf(),
                base_len,
            });
        }
        diff_files.push(file);
    }

    let merged = AtomicFile::create(base)?;
    let prepare_err = |source| MemFileError::Prepare {
        path: merged.tmp_path().to_path_buf(),
        base: base.to_path_buf(),
        source,
    };
    let permissions = base_file.metadata().map_err(prepare_err)?.permissions();
    merged
        .file()
        .set_permissions(permissions)
        .map_err(prepare_err)?;
    // Sized first, so whatever is not copied below stays a hole.
    merged.file().set_len(base_len).map_err(prepare_err)?;

    let to = (merged.file(), merged.tmp_path());
    let base_bytes = copy_ranges((&base_file, base), to, &data_ranges(&base_file, base)?)?;
    let mut diff_bytes = Vec::with_capacity(diffs.len());
    for (file, path) in diff_files.iter().zip(diffs) {
        let ranges = data_ranges(file, path)?;
        diff_bytes.push(copy_ranges((file, path), to, &ranges)?);
    }
    merged.commit()?;
    Ok(MergeStats {
        base_bytes,
        diff_bytes,
    })
}

/// Opens `path` for reading, telling a missing file apart from other failures.
fn open_existing(path: &Path) -> Result<File, MemFileError> {
    let file = File::open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            MemFileError::Missing(path.to_path_buf())
        } else {
            MemFileError::Open {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let meta = file.metadata().map_err(|source| MemFileError::Metadata {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(MemFileError::NotAFile(path.to_path_buf()));
    }
    Ok(file)
}

/// The file's size.
fn file_len(file: &File, path: &Path) -> Result<u64, MemFileError> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|source| MemFileError::Metadata {
            path: path.to_path_buf(),
            source,
        })
}

/// `lseek(fd, offset, whence)` for SEEK_DATA / SEEK_HOLE; `None` when there is no more data
/// (ENXIO: `offset` is at or past the end, or only a hole follows).
fn seek(file: &File, path: &Path, offset: u64, whence: i32) -> Result<Option<u64>, MemFileError> {
    // SAFETY: lseek on a file descriptor borrowed from a live File touches no memory; it only
    // moves the descriptor's offset, which nothing in this module relies on.
    let ret = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if ret >= 0 {
        return Ok(Some(ret as u64));
    }
    let source = io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::ENXIO) {
        return Ok(None);
    }
    Err(MemFileError::Seek {
        path: path.to_path_buf(),
        offset,
        source,
    })
}

/// Copies one range to the same offsets, by `copy_file_range` while the kernel can.
fn copy_range(
    (from, from_path): (&File, &Path),
    (to, to_path): (&File, &Path),
    range: Range<u64>,
) -> Result<(), MemFileError> {
    let copy_err = |offset, source| MemFileError::Copy {
        from: from_path.to_path_buf(),
        to: to_path.to_path_buf(),
        offset,
        source,
    };
    let short = |offset| MemFileError::ShortCopy {
        from: from_path.to_path_buf(),
        to: to_path.to_path_buf(),
        offset,
    };
    let mut pos = range.start;
    while pos < range.end {
        let chunk = (range.end - pos).min(COPY_CHUNK) as usize;
        let mut off_in = pos as libc::loff_t;
        let mut off_out = pos as libc::loff_t;
        // SAFETY: both descriptors come from live Files borrowed for the call, and the offset
        // pointers point at locals, so the kernel updates those and not the files' offsets.
        let ret = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut off_in,
                to.as_raw_fd(),
                &mut off_out,
                chunk,
                0,
            )
        };
        match ret {
            0 => return Err(short(pos)),
            n if n > 0 => pos += n as u64,
            _ => {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // Across file systems (EXDEV), or where the kernel or file system has no
                    // copy_file_range: copy by hand.
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                        return copy_by_hand(from, to, pos..range.end)
                            .map_err(|e| e.map_or_else(|| short(pos), |(o, s)| copy_err(o, s)));
                    }
                    _ => return Err(copy_err(pos, err)),
                }
            }
        }
    }
    Ok(())
}

/// `pread`/`pwrite` through a buffer. Errors are `None` when the source ended early, else the
/// offset and OS error.
fn copy_by_hand(from: &File, to: &File, range: Range<u64>) -> Result<(), Option<(u64, io::Error)>> {
    let mut buf = vec![0u8; BUF_LEN];
    let mut pos = range.start;
    while pos < range.end {
        let want = (range.end - pos).min(BUF_LEN as u64) as usize;
        let n = match from.read_at(&mut buf[..want], pos) {
            Ok(0) => return Err(None),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Some((pos, e))),
        };
        to.write_all_at(&buf[..n], pos)
            .map_err(|e| Some((pos, e)))?;
        pos += n as u64;
    }
    Ok(())
}

/// Writes zeros over every hole inside `range`, making the whole range data.
fn fill_holes(file: &File, path: &Path, range: Range<u64>) -> Result<(), MemFileError> {
    let zeros = vec![0u8; BUF_LEN];
    let mut pos = range.start;
    while pos < range.end {
        let Some(hole) = seek(file, path, pos, libc::SEEK_HOLE)? else {
            // Past the end of the file: writing below extends it.
            return write_zeros(file, path, &zeros, pos..range.end);
        };
        if hole >= range.end {
            break;
        }
        let data = seek(file, path, hole, libc::SEEK_DATA)?.unwrap_or(range.end);
        let end = data.min(range.end);
        write_zeros(file, path, &zeros, hole..end)?;
        pos = end;
    }
    Ok(())
}

/// Writes explicit zeros over `range`.
fn write_zeros(
    file: &File,
    path: &Path,
    zeros: &[u8],
    range: Range<u64>,
) -> Result<(), MemFileError> {
    let mut pos = range.start;
    while pos < range.end {
        let n = (range.end - pos).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], pos)
            .map_err(|source| MemFileError::Write {
                path: path.to_path_buf(),
                offset: pos,
                source,
            })?;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
#[path = "memfile_tests.rs"]
mod tests;
