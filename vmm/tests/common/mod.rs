#![allow(dead_code)] // each test binary uses a different subset of these helpers
//! Shared pieces of kiln-vmm's integration tests: a tiny hand-built guest kernel (an ELF file with a
//! few dozen instructions, optionally with a PVH note; in `tiny_kernel.rs`), a runner for the
//! kiln-vmm binary and, in `api_vmm.rs`, a kiln-vmm driven over its API socket; `counter.rs`
//! drives the counting guest through snapshots, `flood.rs` reads what the block-flooding guest
//! read from a snapshot, and `uffd_handler.rs` is a page-fault handler for
//! loads with the `Uffd` memory backend.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod api_vmm;
mod counter;
mod flood;
mod tiny_kernel;
mod uffd_handler;
// Not every test binary uses both rooms (api_hostile needs no guest, tiny_guest no API).
#[allow(unused_imports)]
pub use api_vmm::*;
#[allow(unused_imports)]
pub use counter::*;
#[allow(unused_imports)]
pub use flood::*;
#[allow(unused_imports)]
pub use tiny_kernel::*;
#[allow(unused_imports)]
pub use uffd_handler::*;

/// A fresh directory for one test's files.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write test file");
    path
}

/// Runs kiln-vmm with `args`, killing it if it runs past `limit` (then the test fails).
pub fn kiln_vmm(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-vmm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln-vmm");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for kiln-vmm") {
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            child.stdout.take().map(|mut o| o.read_to_end(&mut stdout));
            child.stderr.take().map(|mut e| e.read_to_end(&mut stderr));
            return Output {
                status,
                stdout,
                stderr,
            };
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect kiln-vmm output");
            panic!(
                "kiln-vmm {args:?} still running after {limit:?}; stdout {:?} stderr {:?}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
