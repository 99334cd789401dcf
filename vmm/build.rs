//! Compiles kiln-vmm's seccomp filters at build time, as Firecracker does: the JSON in
//! `resources/seccomp/<arch>.json` (seccompiler's format, one filter per thread kind) becomes one
//! BPF program per thread kind in `$OUT_DIR/seccomp-<kind>.bpf`, which `src/seccomp/mod.rs` embeds
//! with `include_bytes!`. A program is its instructions back to back, 8 bytes each (`code` u16,
//! `jt` u8, `jf` u8, `k` u32, little-endian), so reading it back needs no parser beyond that.
//!
//! A JSON mistake (an unknown syscall name, a missing thread kind) fails the build, not the VMM.
//!
//! It also writes `$OUT_DIR/syscall_names.rs`, the system call names by number, for the report
//! the SIGSYS handler writes when a filter stops a thread (`src/seccomp/sigsys.rs`). On x86_64
//! they come from the kernel's `asm/unistd_64.h` as installed (linux-libc-dev); without it the
//! table is empty and the report gives numbers only, with a build warning saying so.

use std::fmt::Write;
use std::path::{Path, PathBuf};

/// The thread kinds the JSON must define, and nothing else.
const KINDS: [&str; 3] = ["vmm", "api", "vcpu"];

/// Where the x86_64 system call numbers are, on a Debian-like host.
const UNISTD_X86_64: &str = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h";

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
    write_syscall_names(&arch, &out.join("syscall_names.rs"));
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

/// Writes the table of system call names by number (empty when the header is not there).
fn write_syscall_names(arch: &str, path: &Path) {
    let mut names: Vec<String> = Vec::new();
    let header = Path::new(UNISTD_X86_64);
    if arch == "x86_64" {
        println!("cargo::rerun-if-changed={UNISTD_X86_64}");
        match std::fs::read_to_string(header) {
            Ok(text) => names = parse_unistd(&text),
            Err(e) => println!(
                "cargo::warning=no system call names for seccomp reports ({UNISTD_X86_64}: {e}); \
                 they will give numbers only"
            ),
        }
    }
    let mut code = format!(
        "/// System call names by number ({}); empty names are gaps in the numbering.\n\
         const SYSCALL_NAMES: &[&str] = &[\n",
        if names.is_empty() {
            "none were found at build time".to_string()
        } else {
            format!("from {UNISTD_X86_64}")
        }
    );
    for name in &names {
        // Writing to a String cannot fail.
        let _ = writeln!(code, "    {name:?},");
    }
    code.push_str("];\n");
    std::fs::write(path, code).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The names of `#define __NR_<name> <number>` lines, indexed by number.
fn parse_unistd(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some("#define"), Some(name), Some(number), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        let (Some(name), Ok(number)) = (name.strip_prefix("__NR_"), number.parse::<usize>()) else {
            continue;
        };
        // Numbers are small and dense (0 to about 460 on x86_64); refuse anything odd.
        if number > 4096 {
            continue;
        }
        if names.len() <= number {
            names.resize(number + 1, String::new());
        }
        names[number] = name.to_string();
    }
    names
}
