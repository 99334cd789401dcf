//! Kiln's guest agent, built as a static executable: it runs as PID 1 in a root filesystem whose
//! libc it must not depend on.

use crate::{static_exe, util};
use std::path::{Path, PathBuf};

/// Builds `kiln-agent` in release mode with a static C runtime and returns the executable's path.
pub fn build() -> util::Result<PathBuf> {
    static_exe::build("kiln-agent", "kiln-agent")
}

/// Fails unless `path` is a static x86-64 executable.
pub fn check_static(path: &Path) -> util::Result<()> {
    static_exe::check_static(path)
}
