//! `cargo xtask`: Kiln's developer commands. It owns building the guest kernel, the nested lab (an L1
//! VM under QEMU TCG with real KVM inside), the full test run and the benchmarks. Nothing here is part of
//! the shipped VMM; it calls cargo, apt-get, make and QEMU, and is called by people and by `.ci/run`.

mod bench;
mod clients;
mod e2b;
mod fuzz;
mod guest_images;
mod guest_kernel;
mod initramfs;
mod lab;
mod rootfs;
mod run;
mod sdk;
mod static_exe;
mod test;
mod util;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  run [KILN-RUN-OPTIONS] -- CMD...
                               set up the lab and run `kiln run -- CMD` in it (a Kiln VM from
                               the Debian rootfs; CMD runs through the guest agent)
  test [--host | --lab [FILTER]]
                               lints, unit and host-KVM tests, the Python SDK's suite,
                               Firecracker's clients, the E2B suite against kilnd with the stand-in
                               VMM, then end-to-end tests in the lab and E2B's Python SDK (pinned,
                               in a venv) against kilnd in the same lab boot
  test --e2b [FILTER]          only the E2B SDK suite against kilnd in the lab
  test --e2b-host [FILTER]     only the E2B SDK suite against kilnd on the host (stand-in VMM)
  test --sdk [FILTER]          only the Python SDK's suite (mypy, pytest against kilnd on the host)
  clients [PYTEST-ARGS]        Firecracker's clients against kiln-vmm on the host's /dev/kvm: the
                               pinned firecracker-python package, and schemathesis over
                               Firecracker's swagger (tests/firecracker-clients)
  bench boot [--runs N]        boot time under kiln-vmm vs QEMU microvm, inside the lab
                               (also block, exec, vsock, snapshot, restore, cycles, pool, memory,
                               e2b: see the README)
  fuzz [TARGET] [--seconds N]  run the fuzz targets (fuzz/) under libFuzzer, N s each (60)
  guest-kernel                 build (or find in the cache) Kiln's guest vmlinux and print its path
  rootfs [--agent PATH]        build (or find in the cache) the guest root filesystem (Debian bookworm,
                               python3, kiln-agent as PID 1) and print its path
  lab [--share DIR] [--with-qemu] -- CMD...
                               run CMD inside the nested lab VM, exit with its status
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match cmd.as_str() {
        "guest-kernel" => guest_kernel::main(rest),
        "lab" => lab::main(rest),
        "rootfs" => rootfs::main(rest),
        "run" => run::main(rest),
        "test" => test::main(rest),
        "bench" => bench::main(rest),
        "fuzz" => fuzz::main(rest),
        "clients" => clients::main(rest),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(0)
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(msg) => {
            eprintln!("xtask: {msg}");
            ExitCode::from(1)
        }
    }
}
