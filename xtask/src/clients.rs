//! `cargo xtask clients [PYTEST-ARGS]`: Firecracker's own clients against kiln-vmm on the host's
//! /dev/kvm, no lab needed. The pinned `firecracker-python` package from PyPI drives kiln-vmm
//! (under the name `firecracker`) through its process manager and API classes with a tiny
//! hand-built guest, and schemathesis fuzzes a jailed kiln-vmm over Firecracker's published
//! swagger (`api/firecracker-swagger.yaml`) with several workers. The tests are Python
//! (`tests/firecracker-clients/`), run by pytest from a virtualenv that this command builds from
//! `requirements.txt` (every package pinned) and keeps in Kiln's cache, keyed by the file's
//! content and the Python it was made with.

#[path = "../../vmm/tests/common/tiny_kernel.rs"]
mod tiny_kernel;

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{self, Result};

/// The folder of the Python tests, from the workspace root.
const TESTS: &str = "tests/firecracker-clients";

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(util::workspace_root());
    cmd
}

/// The virtualenv for `requirements`, made on first use: `<cache>/python/<key>`, where the key
/// hashes the requirements and the interpreter (its path and version). A venv is marked complete
/// only once every package installed and `pip check` passed, so a run killed half way is redone.
fn venv(requirements: &Path) -> Result<PathBuf> {
    let python = std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".into());
    let about = util::output(Command::new(&python).args([
        "-c",
        "import sys; print(sys.executable); print(sys.version)",
    ]))
    .map_err(|e| format!("Firecracker's client tests need Python 3 ({python}): {e}"))?;
    let reqs = std::fs::read(requirements)
        .map_err(|e| format!("cannot read {}: {e}", requirements.display()))?;
    let key = util::hash_parts([reqs.as_slice(), about.as_bytes()]);
    let dir = util::cache_dir().join("python").join(&key[..16]);
    let done = dir.join("kiln-complete");
    if done.exists() {
        return Ok(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    util::mkdir(dir.parent().unwrap_or(&dir))?;
    eprintln!("xtask: making the Python environment {}", dir.display());
    util::run(Command::new(&python).arg("-m").arg("venv").arg(&dir))?;
    let pip = dir.join("bin/pip");
    // --no-deps: requirements.txt pins the whole closure, so nothing unpinned sneaks in; wheels
    // only, so nothing is compiled here.
    util::run(
        Command::new(&pip)
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--only-binary=:all:",
                "-r",
            ])
            .arg(requirements),
    )?;
    util::run(Command::new(&pip).args(["check", "--disable-pip-version-check"]))?;
    std::fs::write(&done, b"").map_err(|e| format!("cannot write {}: {e}", done.display()))?;
    Ok(dir)
}

/// `cargo xtask clients [PYTEST-ARGS]`.
pub fn main(args: &[String]) -> Result<u8> {
    let root = util::workspace_root();
    let tests = root.join(TESTS);
    let venv = venv(&tests.join("requirements.txt"))?;
    // The same debug build `cargo test` makes, so the two share their artifacts.
    util::run(cargo().args(["build", "--package", "kiln-vmm", "--package", "kiln-jailer"]))?;
    let bin = root.join("target/debug");
    let work = root.join("target/firecracker-clients");
    util::mkdir(&work)?;
    let counter = work.join("counter.elf");
    std::fs::write(
        &counter,
        tiny_kernel::tiny_kernel(tiny_kernel::Program::Counter, true),
    )
    .map_err(|e| format!("cannot write {}: {e}", counter.display()))?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![venv.join("bin")];
    paths.extend(std::env::split_paths(&path));
    let path = std::env::join_paths(paths).map_err(|e| format!("PATH: {e}"))?;
    util::run(
        Command::new(venv.join("bin/python"))
            // Run from the work folder: Hypothesis and schemathesis keep their databases in the
            // current folder, which must not be the source tree.
            .current_dir(&work)
            .args(["-m", "pytest", "-p", "no:cacheprovider", "-v"])
            .arg(&tests)
            .args(args)
            .env("PATH", path)
            // No __pycache__ folders in the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("KILN_VMM", bin.join("kiln-vmm"))
            .env("KILN_JAILER", bin.join("kiln-jailer"))
            .env("KILN_TINY_COUNTER", &counter)
            .env("KILN_COUNTER_ADDR", tiny_kernel::COUNTER_ADDR.to_string())
            .env(
                "KILN_FIRECRACKER_SWAGGER",
                root.join("api/firecracker-swagger.yaml"),
            )
            .env("KILN_OPENAPI", root.join("api/openapi.json"))
            .env("KILN_WORK", &work),
    )?;
    Ok(0)
}
