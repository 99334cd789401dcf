//! Serving file requests. Reads and writes stream in chunks against flow-control credit, so a
//! file of any size passes through a few hundred KiB of memory. Paths must be absolute.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::session::{Ctx, Input, InputMsg};
use crate::protocol::{
    DirEntry, ErrorInfo, ErrorKind, Event, FileKind, FileStat, MAX_CHUNK, Request, Stream,
};

/// Entries per [`Event::Entries`] batch, keeping each event far below the frame limit.
const ENTRIES_PER_EVENT: usize = 256;

/// Runs one file request (anything but exec) to its final event.
pub fn run(ctx: Ctx, input: Input, request: Request) {
    let result = match request {
        Request::WriteFile {
            path,
            mode,
            parents,
            append,
        } => absolute(&path).and_then(|p| write_file(&input, p, mode, parents, append)),
        Request::ReadFile { path } => absolute(&path).and_then(|p| read_file(&ctx, p)),
        Request::ListDir { path } => absolute(&path).and_then(|p| list_dir(&ctx, p)),
        Request::Stat { path } => absolute(&path).and_then(|p| {
            let meta = fs::metadata(p).map_err(fs_error("stat", p))?;
            Ok(Event::Stat { stat: stat(&meta) })
        }),
        Request::Remove { path, recursive } => absolute(&path).and_then(|p| remove(p, recursive)),
        other => Err(ErrorInfo::new(
            ErrorKind::BadRequest,
            format!("{other:?} is not a file request"),
        )),
    };
    ctx.finish(result.unwrap_or_else(Event::Error));
}

fn absolute(path: &str) -> Result<&Path, ErrorInfo> {
    if path.starts_with('/') {
        Ok(Path::new(path))
    } else {
        Err(ErrorInfo::new(
            ErrorKind::BadRequest,
            format!("path {path:?} is not absolute"),
        ))
    }
}

/// The protocol's error kind for an I/O error.
pub fn kind_of(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorKind::NotFound,
        Some(libc::EACCES) | Some(libc::EPERM) => ErrorKind::PermissionDenied,
        Some(libc::EEXIST) => ErrorKind::AlreadyExists,
        Some(libc::EISDIR) => ErrorKind::IsADirectory,
        Some(libc::ENOTDIR) => ErrorKind::NotADirectory,
        Some(libc::ENOTEMPTY) => ErrorKind::DirectoryNotEmpty,
        _ => ErrorKind::Io,
    }
}

fn fs_error<'a>(what: &'a str, path: &'a Path) -> impl Fn(io::Error) -> ErrorInfo + 'a {
    move |e| ErrorInfo {
        kind: kind_of(&e),
        message: format!("{what} {}: {e}", path.display()),
        errno: e.raw_os_error(),
    }
}

fn cancelled(path: &Path) -> ErrorInfo {
    ErrorInfo::new(
        ErrorKind::Cancelled,
        format!("transfer of {} cancelled", path.display()),
    )
}

fn write_file(
    input: &Input,
    path: &Path,
    mode: Option<u32>,
    parents: bool,
    append: bool,
) -> Result<Event, ErrorInfo> {
    if parents && let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            // mkdir's EEXIST here means some component is a file: say that.
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => io::Error::from_raw_os_error(libc::ENOTDIR),
                _ => e,
            })
            .map_err(fs_error("creating directory", parent))?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .append(append)
        .truncate(!append)
        .mode(mode.unwrap_or(0o644))
        .open(path)
        .map_err(fs_error("opening", path))?;
    if let Some(mode) = mode {
        // The umask applied at creation; the caller asked for exactly these bits.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(fs_error("setting the mode of", path))?;
    }
    let mut bytes = 0u64;
    loop {
        match input.recv() {
            Some(InputMsg::Data(chunk)) => {
                file.write_all(&chunk).map_err(fs_error("writing", path))?;
                bytes += chunk.len() as u64;
                input.consumed(chunk.len());
            }
            Some(InputMsg::Eof) => break,
            None => return Err(cancelled(path)),
        }
    }
    Ok(Event::Done { bytes: Some(bytes) })
}

fn read_file(ctx: &Ctx, path: &Path) -> Result<Event, ErrorInfo> {
    let mut file = File::open(path).map_err(fs_error("opening", path))?;
    let meta = file.metadata().map_err(fs_error("stat", path))?;
    if meta.is_dir() {
        return Err(fs_error("reading", path)(io::Error::from_raw_os_error(
            libc::EISDIR,
        )));
    }
    ctx.event(Event::Opened { size: meta.len() });
    let window = ctx.window(Stream::File);
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut bytes = 0u64;
    loop {
        let Some(credit) = window.wait(MAX_CHUNK) else {
            return Err(cancelled(path));
        };
        let n = match file.read(&mut buf[..credit]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(fs_error("reading", path)(e)),
        };
        window.consume(n);
        ctx.data(Stream::File, &buf[..n]);
        bytes += n as u64;
    }
    if ctx.cancelled() {
        return Err(cancelled(path));
    }
    Ok(Event::Done { bytes: Some(bytes) })
}

fn stat(meta: &Metadata) -> FileStat {
    let ft = meta.file_type();
    FileStat {
        kind: if ft.is_file() {
            FileKind::File
        } else if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_symlink() {
            FileKind::Symlink
        } else {
            FileKind::Other
        },
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: meta.mtime(),
    }
}

fn list_dir(ctx: &Ctx, path: &Path) -> Result<Event, ErrorInfo> {
    let mut batch = Vec::new();
    for entry in fs::read_dir(path).map_err(fs_error("listing", path))? {
        let entry = entry.map_err(fs_error("listing", path))?;
        // An entry removed while we list is simply skipped.
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        batch.push(DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            stat: stat(&meta),
        });
        if batch.len() == ENTRIES_PER_EVENT {
            ctx.event(Event::Entries {
                entries: std::mem::take(&mut batch),
            });
        }
        if ctx.cancelled() {
            return Err(cancelled(path));
        }
    }
    if !batch.is_empty() {
        ctx.event(Event::Entries { entries: batch });
    }
    Ok(Event::Done { bytes: None })
}

fn remove(path: &Path, recursive: bool) -> Result<Event, ErrorInfo> {
    let meta = path
        .symlink_metadata()
        .map_err(fs_error("removing", path))?;
    let result = if !meta.is_dir() {
        fs::remove_file(path)
    } else if recursive {
        fs::remove_dir_all(path)
    } else {
        fs::remove_dir(path)
    };
    result.map_err(fs_error("removing", path))?;
    Ok(Event::Done { bytes: None })
}
