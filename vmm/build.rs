//! Compiles kiln-vmm's seccomp filters at build time, as Firecracker does: the JSON in
//! `resources/seccomp/<arch>.json` (seccompiler's format, one filter per thread kind) becomes one
//! BPF program per thread kind in `$OUT_DIR/seccomp-<kind>.bpf`, which `src/seccomp/mod.rs` embeds
//! with `include_bytes!`. A program is its instructions back to back, 8 bytes each (`code` u16,
//! `jt` u8, `jf` u8, `k` u32, little-endian), so reading it back needs no parser beyond that.
//!
//! A JSON mistake (an unknown syscall name, a missing thread kind) fails the build, not the VMM.

use std::path::PathBuf;

/// The thread kinds the JSON must define, and nothing else.
const KINDS: [&str; 3] = ["vmm", "api", "vcpu"];

fn main() {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let json = manifest.join(format!("../resources/seccomp/{arch}.json"));
    println!("cargo::rerun-if-changed={}", json.display());
    let text = std::fs::read(&json).unwrap_or_else(|e| {
        panic!(
            "no seccomp filters for {arch}: cannot read {}: {e}",
            json.display()
        )
    });
    let target = arch
        .as_str()
        .try_into()
        .unwrap_or_else(|e| panic!("seccompiler cannot compile filters for {arch}: {e:?}"));
    let filters = seccompiler::compile_from_json(text.as_slice(), target)
        .unwrap_or_else(|e| panic!("{}: {e}", json.display()));
    let mut names: Vec<&str> = filters.keys().map(String::as_str).collect();
    names.sort_unstable();
    let mut want = KINDS.to_vec();
    want.sort_unstable();
    assert_eq!(
        names,
        want,
        "{} must define exactly the filters {KINDS:?}",
        json.display()
    );
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for (name, program) in &filters {
        let mut bytes = Vec::with_capacity(program.len() * 8);
        for insn in program {
            bytes.extend_from_slice(&insn.code.to_le_bytes());
            bytes.push(insn.jt);
            bytes.push(insn.jf);
            bytes.extend_from_slice(&insn.k.to_le_bytes());
        }
        let path = out.join(format!("seccomp-{name}.bpf"));
        std::fs::write(&path, bytes)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}
