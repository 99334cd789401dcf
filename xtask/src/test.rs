//! `cargo xtask test`: everything that checks Kiln, in order of cost. Lints (fmt, clippy with
//! warnings denied), the host's unit and integration tests (tiny guests on the host's /dev/kvm,
//! the fuzz targets as property tests), the Python SDK's suite against kilnd with the stand-in VMM,
//! Firecracker's own clients against kiln-vmm on the host (`cargo xtask clients`), a short
//! libFuzzer run of each fuzz target, then the end-to-end tests, built on the host and run inside
//! one lab boot.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::guest_images;
use crate::lab::{self, LabRun, LabStatus};
use crate::util::{self, Result};

/// The package whose test binaries run in the lab.
const LAB_TEST_PACKAGE: &str = "kiln-tests";

/// Runs in L1: every lab test binary with its ignored (lab-only) tests, one test at a time, so L2
/// guests do not compete for L1's two CPUs, except those `/share/passed` lists (they passed in
/// an earlier L1 of this run, which then went down); a binary that passes is announced with
/// `@@KILN-PASSED NAME` (which the lab notes, see `lab::passed`). Exits non-zero if any binary
/// failed.
const RUNNER: &str = r#"#!/bin/sh
status=0
for t in /share/tests/*; do
  n=$(basename "$t")
  if [ -f /share/passed ] && grep -qx "$n" /share/passed; then
    echo "== $n: passed in an earlier L1"
    continue
  fi
  echo "== $n"
  if "$t" --ignored --test-threads=1 "$@"; then
    echo "@@KILN-PASSED $n"
  else
    status=1
  fi
done
exit $status
"#;

/// How many L1s one lab stage may use: a new one each time L1 itself goes down, which then runs
/// only the test binaries that have not passed yet.
const LAB_ATTEMPTS: usize = 3;

/// Lists the lab test binaries that have passed so far in `share/passed`, for the next L1.
fn note_passed(share: &Path) -> Result<()> {
    let passed = crate::lab::passed_so_far();
    util::write_atomic(&share.join("passed"), (passed.join("\n") + "\n").as_bytes())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(util::workspace_root());
    cmd
}

fn step(name: &str) {
    eprintln!("\n==> xtask test: {name}");
}

/// Builds the lab test binaries and returns their paths.
fn build_lab_tests() -> Result<Vec<PathBuf>> {
    let out = util::output(cargo().args([
        "test",
        "--release",
        "--package",
        LAB_TEST_PACKAGE,
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]))?;
    Ok(test_executables(&out))
}

/// Integration-test executables (`tests/*.rs`) named in cargo's JSON messages; unit tests of the
/// same package already ran on the host.
fn test_executables(json_lines: &str) -> Vec<PathBuf> {
    json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["profile"]["test"] == true)
        .filter(|v| {
            v["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .filter_map(|v| v["executable"].as_str().map(PathBuf::from))
        .collect()
}

fn stage_lab_tests(bins: &[PathBuf], dir: &Path) -> Result<()> {
    let tests = dir.join("tests");
    util::mkdir(&tests)?;
    for bin in bins {
        let name = bin
            .file_name()
            .ok_or_else(|| format!("{} has no file name", bin.display()))?;
        std::fs::copy(bin, tests.join(name))
            .map_err(|e| format!("cannot copy {}: {e}", bin.display()))?;
    }
    util::write_atomic(&dir.join("run-lab-tests.sh"), RUNNER.as_bytes())
}

/// `cargo xtask test [--host | --lab [FILTER] | --e2b [FILTER] | --e2b-host [FILTER] | --sdk
/// [FILTER]]`: FILTER picks lab tests by name, or the E2B or SDK suite's tests by pytest's `-k`.
pub fn main(args: &[String]) -> Result<u8> {
    let (host, lab, e2b, filter) = match args {
        [] => (true, true, true, None),
        [a] if a == "--host" => (true, false, false, None),
        [a] if a == "--lab" => (false, true, false, None),
        [a, f] if a == "--lab" => (false, true, false, Some(f.clone())),
        [a] if a == "--e2b" => (false, false, true, None),
        [a, f] if a == "--e2b" => (false, false, true, Some(f.clone())),
        [a, rest @ ..] if a == "--e2b-host" && rest.len() <= 1 => {
            step("E2B's Python SDK against kilnd on the host (the stand-in VMM)");
            crate::e2b::run_host_suite(rest.first().map(String::as_str))?;
            eprintln!("\nxtask test: all passed");
            return Ok(0);
        }
        [a, rest @ ..] if a == "--sdk" && rest.len() <= 1 => {
            step("the Python SDK's suite (mypy, pytest against kilnd with the stand-in VMM)");
            crate::sdk::run_suite(rest.first().map(String::as_str))?;
            eprintln!("\nxtask test: all passed");
            return Ok(0);
        }
        _ => {
            return Err(
                "usage: cargo xtask test [--host | --lab [FILTER] | --e2b [FILTER] | --e2b-host [FILTER] \
                 | --sdk [FILTER]]"
                    .into(),
            );
        }
    };
    if host {
        step("cargo fmt --check");
        util::run(cargo().args(["fmt", "--all", "--check"]))?;
        step("cargo clippy (warnings are errors)");
        util::run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        step("unit and host-KVM integration tests");
        // kiln-net's tests build sandboxes, which need nft and ip on the host.
        util::ensure_packages(&["nftables", "iproute2"])?;
        util::run(cargo().args(["test", "--workspace"]))?;
        step("the Python SDK's suite (mypy, pytest against kilnd with the stand-in VMM)");
        crate::sdk::run_suite(None)?;
        step("Firecracker's clients against kiln-vmm (firecracker-python, schemathesis)");
        crate::clients::main(&[])?;
        step("E2B's Python SDK against kilnd on the host (the stand-in VMM)");
        crate::e2b::run_host_suite(None)?;
        // The fuzz targets already ran as property tests above; a short libFuzzer run of each
        // checks the driver builds and finds nothing quick.
        step("fuzz targets under libFuzzer, 10 s each");
        crate::fuzz::main(&["--seconds".to_string(), "10".to_string()])?;
    }
    // The lab tests and the E2B suite share one L1 boot when both run.
    let lab_run = if lab {
        let bins = build_lab_tests()?;
        if bins.is_empty() {
            return Err(format!(
                "cargo built no test binaries for {LAB_TEST_PACKAGE}"
            ));
        }
        let share = util::cache_dir().join("lab-tests-share");
        let _ = std::fs::remove_dir_all(&share);
        stage_lab_tests(&bins, &share)?;
        Some(LabRun {
            share: Some(share),
            files: vec![
                (
                    guest_images::test_initramfs()?,
                    "test-initramfs.cpio".into(),
                ),
                (lab::debian_bzimage()?, "bzImage".into()),
            ],
            cmd: ["sh", "/share/run-lab-tests.sh"]
                .into_iter()
                .map(String::from)
                .chain(if e2b { None } else { filter.clone() })
                .collect(),
            with_python: true,
            ..LabRun::default()
        })
    } else {
        None
    };
    if e2b {
        if lab {
            step("end-to-end tests in the nested lab, then E2B's Python SDK against kilnd there");
        } else {
            step("E2B's Python SDK against kilnd in the nested lab");
        }
        let filter = if lab { None } else { filter };
        let attempt = || {
            let before = lab_run.clone().map(|run| crate::e2b::Before { run });
            crate::e2b::run_suite(filter.clone(), before)
        };
        let mut tries = 1;
        let verdict = loop {
            match attempt() {
                Err(e) if l1_crashed(&e) && tries < LAB_ATTEMPTS => {
                    if let Some(share) = lab_run.as_ref().and_then(|r| r.share.as_deref()) {
                        note_passed(share)?;
                    }
                    again(&e);
                    tries += 1;
                }
                other => break other?,
            }
        };
        if !verdict.before_passed {
            return Err("lab tests failed (their output is above)".into());
        }
        if verdict.suite != 0 {
            return Err(format!(
                "the E2B SDK suite failed (pytest status {})",
                verdict.suite
            ));
        }
    } else if let Some(run) = lab_run {
        step("end-to-end tests in the nested lab");
        let mut outcome = lab::run(&run)?;
        let mut tries = 1;
        while let LabStatus::Failed(why) = &outcome.status
            && l1_crashed(&format!("the lab failed, not the tests: {why}"))
            && tries < LAB_ATTEMPTS
        {
            outcome.print_diagnosis();
            if let Some(share) = &run.share {
                note_passed(share)?;
            }
            again(&why.to_string());
            outcome = lab::run(&run)?;
            tries += 1;
        }
        match &outcome.status {
            LabStatus::Exited(0) => {}
            LabStatus::Exited(code) => {
                outcome.print_diagnosis();
                return Err(format!("lab tests failed (status {code})"));
            }
            LabStatus::Failed(why) => {
                outcome.print_diagnosis();
                return Err(format!("the lab failed, not the tests: {why}"));
            }
        }
    }
    eprintln!("\nxtask test: all passed");
    Ok(0)
}

/// Whether a lab error is L1's own kernel dying or hanging under it (QEMU's TCG emulating the
/// nested SVM that L1's KVM runs on: seen as a stack guard page hit with a bad GS base in
/// `kvm_arch_vcpu_ioctl_run`, about one lab run in ten), not a test failing or timing out.
fn l1_crashed(err: &str) -> bool {
    err.starts_with("the lab failed, not ")
        && (err.contains("L1 stopped before the command finished")
            || err.contains("L1 hung: its heartbeat stopped"))
}

/// Says, loudly, that the lab stage goes on in a new L1.
fn again(why: &str) {
    eprintln!(
        "\nxtask test: L1 itself went down ({why}); its kernel log is above. This is the lab, not \
         Kiln: the lab stage goes on in a new L1, with the test binaries that have not passed yet \
         ({}).\n",
        match crate::lab::passed_so_far().len() {
            0 => "none has".to_string(),
            n => format!("{n} already passed"),
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runner_announces_passes_as_the_lab_reads_them() {
        assert!(RUNNER.contains(&format!("echo \"{}$n\"", crate::lab::PASSED_MARK)));
    }

    #[test]
    fn only_test_artifacts_with_executables_are_kept() {
        let json = r#"{"reason":"compiler-artifact","target":{"kind":["test"]},"profile":{"test":true},"executable":"/t/lab_boot-1"}
{"reason":"compiler-artifact","target":{"kind":["bin"]},"profile":{"test":false},"executable":"/t/kiln-lab-bench"}
{"reason":"compiler-artifact","target":{"kind":["lib"]},"profile":{"test":true},"executable":"/t/kiln_tests-2"}
{"reason":"compiler-artifact","target":{"kind":["test"]},"profile":{"test":true},"executable":null}
{"reason":"build-finished","success":true}
not json"#;
        assert_eq!(test_executables(json), vec![PathBuf::from("/t/lab_boot-1")]);
    }

    #[test]
    fn only_l1_going_down_earns_a_second_lab_run() {
        assert!(l1_crashed(
            "the lab failed, not the tests: L1 stopped before the command finished: QEMU exited"
        ));
        assert!(l1_crashed(
            "the lab failed, not the E2B suite: L1 hung: its heartbeat stopped 60 s ago"
        ));
        assert!(!l1_crashed("lab tests failed (status 1)"));
        assert!(!l1_crashed(
            "the lab failed, not the tests: the command was still running after 1800 s"
        ));
        assert!(!l1_crashed(
            "the lab failed, not the tests: L1's init failed: no /dev/kvm"
        ));
    }
}
