//! The Python SDK's suite (`sdk/python`): mypy in strict mode over the package, then pytest
//! against a real kilnd on the host whose `--vmm` is the stand-in VMM of kilnd's Rust tests
//! (`pool/examples/fake_vmm.rs`), so it runs in seconds with no lab. pytest and mypy are pinned
//! releases from PyPI in a venv this module makes under the cache, keyed by the pins and the
//! SDK's pyproject.toml; the SDK itself is tested from the source tree, not installed.

use std::path::PathBuf;
use std::process::Command;

use crate::util::{self, Result};

/// The pytest release that runs the suite.
pub const PYTEST_VERSION: &str = "8.4.2";
/// The mypy release that checks the package's types.
pub const MYPY_VERSION: &str = "2.4.1";

/// The SDK's folder in the workspace.
fn sdk_dir() -> PathBuf {
    util::workspace_root().join("sdk/python")
}

/// The venv with the pinned pytest and mypy: `<cache>/sdk-venv/<key>/`, made on first use, its
/// `versions.txt` recording what pip installed.
pub fn venv() -> Result<PathBuf> {
    let pyproject = sdk_dir().join("pyproject.toml");
    let project = std::fs::read(&pyproject)
        .map_err(|e| format!("cannot read {}: {e}", pyproject.display()))?;
    let key = util::hash_parts([
        PYTEST_VERSION.as_bytes(),
        MYPY_VERSION.as_bytes(),
        project.as_slice(),
    ]);
    let dir = util::cache_dir().join("sdk-venv").join(&key[..16]);
    util::python_venv(
        &dir,
        "sdk",
        &[
            format!("pytest=={PYTEST_VERSION}"),
            format!("mypy=={MYPY_VERSION}"),
        ],
    )?;
    Ok(dir)
}

/// The executables cargo reports for `names` in its JSON messages (bins and examples).
pub(crate) fn executables(json_lines: &str, names: &[&str]) -> Result<Vec<PathBuf>> {
    let found: Vec<(String, PathBuf)> = json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact")
        .filter_map(|v| {
            let name = v["target"]["name"].as_str()?.to_string();
            let exe = v["executable"].as_str()?;
            Some((name, PathBuf::from(exe)))
        })
        .collect();
    names
        .iter()
        .map(|n| {
            found
                .iter()
                .find(|(name, _)| name == n)
                .map(|(_, p)| p.clone())
                .ok_or_else(|| format!("cargo built no executable named {n}"))
        })
        .collect()
}

/// Runs `cargo build` with `args` in the workspace and returns the executables it reports for
/// `names`, in that order.
pub(crate) fn build_executables(args: &[&str], names: &[&str]) -> Result<Vec<PathBuf>> {
    let out = util::output(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(util::workspace_root())
            .arg("build")
            .args(args)
            .arg("--message-format=json-render-diagnostics"),
    )?;
    executables(&out, names)
}

/// Builds kilnd and the stand-in VMM (debug, as `cargo test` does): their paths.
fn build_programs() -> Result<(PathBuf, PathBuf)> {
    let built = build_executables(
        &[
            "--package",
            "kiln-pool",
            "--bin",
            "kilnd",
            "--example",
            "fake_vmm",
        ],
        &["kilnd", "fake_vmm"],
    )?;
    let mut exes = built.into_iter();
    match (exes.next(), exes.next()) {
        (Some(kilnd), Some(vmm)) => Ok((kilnd, vmm)),
        _ => Err("cargo reported fewer programs than asked for".into()),
    }
}

/// `cargo xtask test --sdk [FILTER]`: the suite, FILTER passed to pytest's `-k`.
pub fn run_suite(filter: Option<&str>) -> Result<()> {
    let venv = venv()?;
    let (kilnd, vmm) = build_programs()?;
    let dir = sdk_dir();
    util::run(Command::new(venv.join("bin/mypy")).current_dir(&dir).args([
        "--strict",
        // The oldest Python the package declares.
        "--python-version=3.10",
        "--no-incremental",
        "--cache-dir=/dev/null",
        "src/kiln",
    ]))?;
    let mut pytest = Command::new(venv.join("bin/python"));
    pytest
        .current_dir(&dir)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .env("KILN_SDK_KILND", &kilnd)
        .env("KILN_SDK_FAKE_VMM", &vmm)
        // Nothing written into the clone.
        .env("PYTHONDONTWRITEBYTECODE", "1");
    if let Some(f) = filter {
        pytest.args(["-k", f]);
    }
    util::run(&mut pytest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_by_target_name() {
        let json = r#"{"reason":"compiler-artifact","target":{"name":"kiln_pool","kind":["lib"]},"executable":null}
{"reason":"compiler-artifact","target":{"name":"fake_vmm","kind":["example"]},"executable":"/t/debug/examples/fake_vmm"}
{"reason":"compiler-artifact","target":{"name":"kilnd","kind":["bin"]},"executable":"/t/debug/kilnd"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executables(json, &["kilnd", "fake_vmm"]).unwrap(),
            [
                PathBuf::from("/t/debug/kilnd"),
                PathBuf::from("/t/debug/examples/fake_vmm")
            ]
        );
        let e = executables(json, &["kiln-vmm"]).unwrap_err();
        assert!(e.contains("kiln-vmm"), "{e}");
    }
}
