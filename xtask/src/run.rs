//! `cargo xtask run [KILN-RUN-OPTIONS] -- CMD...`: Kiln's main job end to end on a machine without
//! hardware KVM. Sets up the lab (packages, guest kernel, Debian rootfs with the agent, the L1 VM)
//! and runs `kiln run [OPTIONS] -- CMD` inside it: a Kiln VM boots from the rootfs, the agent runs
//! CMD, its output streams back, and the exit status is CMD's.

use crate::lab::{self, LabRun};
use crate::util::Result;

const USAGE: &str = "usage: cargo xtask run [kiln run options: --timeout S, --env K=V, --mem-mib N, \
                     --vcpus N, --json, ...] -- CMD...";

/// The command run inside the lab: `kiln run` with the caller's options and command.
fn lab_command(args: &[String]) -> Result<Vec<String>> {
    let split = args.iter().position(|a| a == "--").ok_or(USAGE)?;
    if split + 1 == args.len() {
        return Err(format!(
            "give the command to run in the guest after --\n{USAGE}"
        ));
    }
    Ok(["kiln", "run"]
        .iter()
        .map(|s| s.to_string())
        .chain(args.iter().cloned())
        .collect())
}

/// `cargo xtask run [OPTIONS] -- CMD...`
pub fn main(args: &[String]) -> Result<u8> {
    let cmd = lab_command(args)?;
    let outcome = lab::run(&LabRun {
        cmd,
        ..LabRun::default()
    })?;
    outcome.exit_status("command")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_and_command_pass_through_to_kiln_run() {
        assert_eq!(
            lab_command(&strings(&[
                "--timeout",
                "5",
                "--",
                "python3",
                "-c",
                "print(6*7)"
            ]))
            .unwrap(),
            strings(&[
                "kiln",
                "run",
                "--timeout",
                "5",
                "--",
                "python3",
                "-c",
                "print(6*7)"
            ])
        );
    }

    #[test]
    fn a_missing_command_is_refused() {
        assert!(
            lab_command(&strings(&["uname"]))
                .unwrap_err()
                .starts_with("usage")
        );
        assert!(
            lab_command(&strings(&["--"]))
                .unwrap_err()
                .contains("after --")
        );
    }
}
