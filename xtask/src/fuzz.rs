//! `cargo xtask fuzz [TARGET] [--seconds N]`: runs Kiln's fuzz targets (`fuzz/`) under libFuzzer,
//! on the stable toolchain: the driver is built with LLVM's SanitizerCoverage through stable `-C`
//! flags (no sanitizer runtime, no nightly), overflow checks and debug assertions on. Each target
//! starts from its corpus in the repo (`fuzz/corpus/<target>`, read only) and keeps what it finds
//! under `target/fuzz/corpus/<target>`; a crash is saved under `target/fuzz/artifacts/<target>/`
//! and fails the command. Prints each target's executions.
//!
//! This is CPU-heavy: on a shared machine, run long campaigns one at a time under the lab lock
//! (`flock /tmp/kiln-lab.lock cargo xtask fuzz TARGET --seconds 1800`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{self, Result};

/// The coverage instrumentation libFuzzer reads, in flags stable rustc accepts.
const RUSTFLAGS: &str = "--cfg fuzzing -Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    -Cdebug-assertions -Coverflow-checks";

/// The target names, from the fuzz crate's list.
fn targets(root: &Path) -> Result<Vec<String>> {
    let lib = std::fs::read_to_string(root.join("fuzz/src/lib.rs"))
        .map_err(|e| format!("reading fuzz/src/lib.rs: {e}"))?;
    let names: Vec<String> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("(\""))
        .filter_map(|l| l.split('"').next())
        .map(String::from)
        .collect();
    if names.is_empty() {
        return Err("fuzz/src/lib.rs lists no targets".into());
    }
    Ok(names)
}

/// The host's target triple: named explicitly so the instrumentation flags reach only the
/// driver, not build scripts and proc-macros (which run on the host without libFuzzer).
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// Builds the instrumented driver and returns its path.
fn build(root: &Path) -> Result<PathBuf> {
    let target_dir = root.join("target/fuzz");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root)
        .env("RUSTFLAGS", RUSTFLAGS)
        .args([
            "build",
            "--release",
            "--package",
            "kiln-fuzz",
            "--features",
            "libfuzzer",
            "--bin",
            "kiln-fuzz",
            "--target",
            TRIPLE,
            "--target-dir",
        ])
        .arg(&target_dir);
    util::run(&mut cmd)?;
    Ok(target_dir.join(TRIPLE).join("release/kiln-fuzz"))
}

/// What one run reported.
struct Outcome {
    execs: u64,
    crashed: bool,
}

fn run_target(root: &Path, driver: &Path, name: &str, seconds: u64) -> Result<Outcome> {
    let seeds = root.join("fuzz/corpus").join(name);
    let work = root.join("target/fuzz/corpus").join(name);
    let artifacts = root.join("target/fuzz/artifacts").join(name);
    util::mkdir(&work)?;
    util::mkdir(&artifacts)?;
    let out = Command::new(driver)
        .current_dir(root)
        .env("KILN_FUZZ_TARGET", name)
        .arg(&work)
        .arg(&seeds)
        .arg(format!("-max_total_time={seconds}"))
        .arg("-max_len=65536")
        .arg("-rss_limit_mb=2048")
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .output()
        .map_err(|e| format!("starting {}: {e}", driver.display()))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let execs = log
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let crashed = !out.status.success();
    if crashed {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        eprintln!("{}", tail.join("\n"));
    }
    Ok(Outcome { execs, crashed })
}

/// `cargo xtask fuzz [TARGET] [--seconds N]`.
pub fn main(args: &[String]) -> Result<u8> {
    let root = util::workspace_root();
    let all = targets(&root)?;
    let mut seconds = 60u64;
    let mut chosen = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let v = it.next().ok_or("--seconds needs a number")?;
                seconds = v
                    .parse()
                    .map_err(|_| format!("--seconds {v:?} is not a number of seconds"))?;
            }
            t if all.iter().any(|n| n == t) => chosen.push(t.to_string()),
            other => {
                return Err(format!(
                    "unknown fuzz target or option {other:?}; targets: {}",
                    all.join(", ")
                ));
            }
        }
    }
    if chosen.is_empty() {
        chosen = all;
    }
    let driver = build(&root)?;
    let mut failed = Vec::new();
    for name in &chosen {
        eprintln!("==> fuzz {name} for {seconds} s");
        let o = run_target(&root, &driver, name, seconds)?;
        println!(
            "fuzz {name}: {} executions in {seconds} s{}",
            o.execs,
            if o.crashed { ", FAILED" } else { "" }
        );
        if o.crashed {
            failed.push(name.clone());
        }
    }
    if failed.is_empty() {
        Ok(0)
    } else {
        Err(format!(
            "fuzz targets failed: {} (inputs under target/fuzz/artifacts/)",
            failed.join(", ")
        ))
    }
}
