//! The stand-in for `kiln-vmm` that kilnd's own test binaries use (cli/tests/fake_vmm), as a
//! program of its own, for test suites that are not Rust (the Python SDK's pytest suite points
//! `kilnd --vmm` at it, with `--no-jail` and `KILN_FAKE_VMM=agent`). Everything kilnd does is
//! real; the "guest" is this host, served by the real agent code in-process.
//!
//! Built by `cargo build -p kiln-pool --example fake_vmm`; `cargo xtask test` does so.

#[path = "../../cli/tests/fake_vmm/vmm.rs"]
mod fake_vmm;

fn main() {
    if std::env::var_os("KILN_FAKE_VMM").is_none() {
        eprintln!(
            "fake_vmm: set KILN_FAKE_VMM=agent (or another mode of cli/tests/fake_vmm/vmm.rs); \
             this program stands in for kiln-vmm in tests only"
        );
        std::process::exit(2);
    }
    fake_vmm::main(&[]);
}
