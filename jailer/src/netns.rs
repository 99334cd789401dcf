//! `--netns PATH`: joining an existing network namespace (one `ip netns add` made, or any
//! process's `/proc/PID/ns/net`), so the VMM's tap devices live there and nowhere else.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::sys::check;

/// The namespace could not be joined.
#[derive(Debug, thiserror::Error)]
#[error("cannot join network namespace {}: {err}", path.display())]
pub struct NetnsError {
    /// The namespace's path.
    pub path: PathBuf,
    /// What the OS said.
    pub err: io::Error,
}

/// Moves this process into the network namespace at `path`.
pub fn join(path: &Path) -> Result<(), NetnsError> {
    let fail = |err| NetnsError {
        path: path.to_path_buf(),
        err,
    };
    let ns = std::fs::File::open(path).map_err(fail)?;
    // SAFETY: setns only reads the descriptor, which stays open for the call.
    check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }).map_err(fail)?;
    Ok(())
}
