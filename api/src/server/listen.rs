//! Creating the listening socket so that its file appears only once it accepts connections.
//!
//! `bind(2)` creates the socket file and `listen(2)` makes it accept connections; a client that
//! connects the moment the file appears (as Firecracker's clients and Kiln's tests do, waiting
//! for the path to exist) is refused in between, and on a loaded machine the VMM can be
//! preempted right there for a whole time slice. So the socket is bound and listening under a
//! temporary name in the same directory first, then hard-linked to its path, which never
//! replaces anything that is there, and the temporary name is removed.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::ApiError;

/// Longest path a Unix socket address holds (`sun_path`, with its terminating NUL).
const SUN_PATH_MAX: usize = 108;

/// A listening socket at `path`, which must not exist yet.
pub(super) fn listen_at(path: &Path) -> Result<UnixListener, ApiError> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let temporary = dir.join(format!(".kiln-api-{}-{n}", std::process::id()));
    if temporary.as_os_str().len() >= SUN_PATH_MAX {
        return bind_directly(path);
    }
    // A stale temporary name (a dead process's, with our pid) is left alone: bind directly.
    let Ok(listener) = UnixListener::bind(&temporary) else {
        return bind_directly(path);
    };
    let linked = std::fs::hard_link(&temporary, path);
    let _ = std::fs::remove_file(&temporary);
    match linked {
        Ok(()) => Ok(listener),
        // Something appeared since the caller looked.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Err(ApiError::SocketExists(path.to_path_buf()))
        }
        // A file system without hard links, say: the plain way, with its short window.
        Err(_) => bind_directly(path),
    }
}

/// Binds and listens at `path` itself.
fn bind_directly(path: &Path) -> Result<UnixListener, ApiError> {
    UnixListener::bind(path).map_err(|source| match source.kind() {
        io::ErrorKind::AddrInUse => ApiError::SocketExists(path.to_path_buf()),
        _ => ApiError::Bind {
            path: path.to_path_buf(),
            source,
        },
    })
}
