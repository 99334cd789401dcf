//! Serving file requests. Reads and writes stream in chunks against flow-control credit, so a
//! file of any size passes through a few hundred KiB of memory. Paths must be absolute.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::session::{Ctx, Input, InputMsg};
use super::user::{self, Identity, Names};
use crate::protocol::{
    DirEntry, ErrorInfo, ErrorKind, Event, FileKind, FileStat, MAX_CHUNK, MkdirSpec, Request,
    Stream,
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
            owner,
        } => absolute(&path).and_then(|p| {
            let owner = owner.as_deref().map(identity).transpose()?;
            write_file(&input, p, mode, parents, append, owner.as_ref())
        }),
        Request::ReadFile { path } => absolute(&path).and_then(|p| read_file(&ctx, p)),
        Request::ListDir { path } => absolute(&path).and_then(|p| list_dir(&ctx, p)),
        Request::Stat { path } => absolute(&path).and_then(|p| {
            let meta = fs::metadata(p).map_err(fs_error("stat", p))?;
            let names = Names::load(Path::new("/"));
            Ok(Event::Stat {
                stat: describe(p, &meta, &names),
            })
        }),
        Request::Remove { path, recursive } => absolute(&path).and_then(|p| remove(p, recursive)),
        Request::Mkdir(spec) => absolute(&spec.path).and_then(|p| mkdir(p, &spec)),
        Request::Rename { from, to } => {
            absolute(&from).and_then(|f| absolute(&to).and_then(|t| rename(f, t)))
        }
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

/// The ids `owner` (a user string) names, or `not_found` naming it.
fn identity(owner: &str) -> Result<Identity, ErrorInfo> {
    user::resolve(owner, Path::new("/"))
        .map_err(|e| ErrorInfo::new(ErrorKind::NotFound, format!("owner: {e}")))
}

fn chown(path: &Path, owner: Option<&Identity>) -> Result<(), ErrorInfo> {
    if let Some(id) = owner {
        std::os::unix::fs::chown(path, Some(id.uid), Some(id.gid))
            .map_err(fs_error("changing the owner of", path))?;
    }
    Ok(())
}

/// Makes `dir` and its missing parents (each given to `owner`); returns whether `dir` itself was
/// made.
fn make_dirs(dir: &Path, mode: u32, owner: Option<&Identity>) -> Result<bool, ErrorInfo> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(p) = at {
        match p.symlink_metadata() {
            Ok(m) if m.is_dir() => break,
            // A symlink to a directory is a directory to walk through.
            Ok(_) if p.is_dir() => break,
            // mkdir's EEXIST here means some component is a file: say that.
            Ok(_) => {
                return Err(fs_error("creating directory", p)(
                    io::Error::from_raw_os_error(libc::ENOTDIR),
                ));
            }
            Err(_) => missing.push(p),
        }
        at = p.parent();
    }
    for p in missing.iter().rev() {
        match fs::DirBuilder::new().mode(mode).create(p) {
            Ok(()) => chown(p, owner)?,
            // Made by someone else meanwhile: fine, it is there.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && p.is_dir() => {}
            Err(e) => return Err(fs_error("creating directory", p)(e)),
        }
    }
    Ok(!missing.is_empty())
}

fn mkdir(path: &Path, spec: &MkdirSpec) -> Result<Event, ErrorInfo> {
    let owner = spec.owner.as_deref().map(identity).transpose()?;
    let mode = spec.mode.unwrap_or(0o755);
    if path.symlink_metadata().is_ok() {
        return Err(fs_error("creating directory", path)(
            io::Error::from_raw_os_error(libc::EEXIST),
        ));
    }
    if spec.parents {
        make_dirs(path, mode, owner.as_ref())?;
    } else {
        fs::DirBuilder::new()
            .mode(mode)
            .create(path)
            .map_err(fs_error("creating directory", path))?;
        chown(path, owner.as_ref())?;
    }
    Ok(Event::Done { bytes: None })
}

fn rename(from: &Path, to: &Path) -> Result<Event, ErrorInfo> {
    from.symlink_metadata()
        .map_err(fs_error("renaming", from))?;
    if let Some(parent) = to.parent() {
        make_dirs(parent, 0o755, None)?;
    }
    fs::rename(from, to).map_err(|e| ErrorInfo {
        kind: kind_of(&e),
        message: format!("renaming {} to {}: {e}", from.display(), to.display()),
        errno: e.raw_os_error(),
    })?;
    Ok(Event::Done { bytes: None })
}

fn write_file(
    input: &Input,
    path: &Path,
    mode: Option<u32>,
    parents: bool,
    append: bool,
    owner: Option<&Identity>,
) -> Result<Event, ErrorInfo> {
    if parents && let Some(parent) = path.parent() {
        make_dirs(parent, 0o755, owner)?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .append(append)
        .truncate(!append)
        .mode(mode.unwrap_or(0o644))
        .open(path)
        .map_err(fs_error("opening", path))?;
    chown(path, owner)?;
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

/// `meta` (of `path`, followed or not) with the owner's names and, when `path` itself is a
/// symbolic link, where it points.
fn describe(path: &Path, meta: &Metadata, names: &Names) -> FileStat {
    let mut st = stat(meta);
    st.owner = names.user(st.uid);
    st.group = names.group(st.gid);
    if path
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        st.symlink_target = fs::read_link(path)
            .ok()
            .map(|t| t.to_string_lossy().into_owned());
    }
    st
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
        owner: None,
        group: None,
        symlink_target: None,
    }
}

fn list_dir(ctx: &Ctx, path: &Path) -> Result<Event, ErrorInfo> {
    let mut batch = Vec::new();
    let names = Names::load(Path::new("/"));
    for entry in fs::read_dir(path).map_err(fs_error("listing", path))? {
        let entry = entry.map_err(fs_error("listing", path))?;
        // An entry removed while we list is simply skipped.
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        batch.push(DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            stat: describe(&entry.path(), &meta, &names),
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
