//! `cargo xtask bench e2b [--runs N]`: create -> first result through E2B's unmodified SDK, Kiln's
//! SDK and `kiln run --template`, against one kilnd in the lab (`tests/e2b/bench.py` prints the
//! figures and ratios).

use std::process::Command;

use super::lab::serve_in_lab;
use super::venv;
use crate::util::{self, Result};

/// Rounds when `--runs` is not given.
const DEFAULT_RUNS: u32 = 20;

/// Runs the benchmark; its status.
pub fn run_bench(args: &[String]) -> Result<u8> {
    let runs = match args {
        [] => DEFAULT_RUNS,
        [flag, n] if flag == "--runs" => n
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("--runs {n:?} is not a positive number"))?,
        other => return Err(format!("bench e2b: unexpected arguments {other:?}")),
    };
    let venv = venv()?;
    let root = util::workspace_root();
    // The CLI as a user installs it: a release build.
    let [kiln] = &crate::sdk::build_executables(
        &["--release", "--package", "kiln-cli", "--bin", "kiln"],
        &["kiln"],
    )?[..] else {
        return Err("cargo reported no kiln binary".into());
    };
    let verdict = serve_in_lab("bench e2b", None, |served| {
        eprintln!("\n==> xtask bench e2b: tests/e2b/bench.py against kilnd in the lab");
        let mut bench = Command::new(venv.join("bin/python"));
        bench
            .arg(root.join("tests/e2b/bench.py"))
            .arg(runs.to_string())
            .env("KILN_CLI", kiln)
            .env("PYTHONPATH", root.join("sdk/python/src"))
            .env("PYTHONDONTWRITEBYTECODE", "1");
        served.env(&mut bench);
        let status = bench
            .status()
            .map_err(|e| format!("cannot run tests/e2b/bench.py: {e}"))?;
        Ok(status.code().unwrap_or(1))
    })?;
    Ok(verdict.suite)
}
