//! Executables linked statically against glibc (`-C target-feature=+crt-static`, for the host's
//! own target triple in a target folder of its own), and the check that one really is static:
//! the guest agent runs as PID 1 in a root filesystem whose libc it must not depend on, and
//! kiln-vmm is shipped static as Firecracker is (no shared libraries to copy into each jail, and
//! none of libc's pages in each VMM's resident memory).

use crate::util;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target triple static executables are built for; a separate target folder keeps the static
/// flags from rebuilding the host's own artifacts.
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds the bin target `bin` of `package` in release mode with a static C runtime, checks that
/// it is static, and returns its path.
pub fn build(package: &str, bin: &str) -> util::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("xtask: cargo build --release -p {package} --bin {bin} --target {TARGET} (static)");
    let messages = util::output(
        Command::new(cargo)
            .args(["build", "--release", "-p", package, "--bin", bin])
            .args(["--target", TARGET])
            // JSON on stdout names the executable wherever the target folder is; diagnostics
            // are still rendered for people on stderr.
            .arg("--message-format=json-render-diagnostics")
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            )
            .current_dir(util::workspace_root()),
    )?;
    let exe = executable(&messages, bin)
        .ok_or_else(|| format!("cargo built {package} but reported no {bin} executable"))?;
    check_static(&exe)?;
    Ok(exe)
}

/// The path of the executable `bin` from cargo's JSON messages.
fn executable(messages: &str, bin: &str) -> Option<PathBuf> {
    messages
        .lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

/// Fails unless `path` is an x86-64 ELF executable that asks for no program interpreter.
pub fn check_static(path: &Path) -> util::Result<()> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match elf_interpreter(&bytes) {
        Ok(None) => Ok(()),
        Ok(Some(interp)) => Err(format!(
            "{} is dynamically linked (it asks for {interp}); it must be static (is RUSTFLAGS \
             set? it overrides the target's +crt-static flag)",
            path.display()
        )),
        Err(why) => Err(format!("{} {why}", path.display())),
    }
}

/// The program interpreter (PT_INTERP) a 64-bit little-endian x86-64 ELF file asks for, if any.
/// A static or static-pie executable has none.
fn elf_interpreter(bytes: &[u8]) -> Result<Option<String>, String> {
    const PT_INTERP: u32 = 3;
    const EM_X86_64: u16 = 62;
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    let u64_at = |at: usize| {
        bytes
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    if bytes.get(..6) != Some(b"\x7fELF\x02\x01") {
        return Err("is not a 64-bit little-endian ELF file".into());
    }
    if u16_at(0x12) != Some(EM_X86_64) {
        return Err("is not an x86-64 executable".into());
    }
    let truncated = || "is a truncated ELF file".to_string();
    let phoff = u64_at(0x20).ok_or_else(truncated)? as usize;
    let phentsize = usize::from(u16_at(0x36).ok_or_else(truncated)?);
    let phnum = usize::from(u16_at(0x38).ok_or_else(truncated)?);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph).ok_or_else(truncated)? != PT_INTERP {
            continue;
        }
        let offset = u64_at(ph + 8).ok_or_else(truncated)? as usize;
        let size = u64_at(ph + 32).ok_or_else(truncated)? as usize;
        let name = bytes.get(offset..offset + size).ok_or_else(truncated)?;
        let name = String::from_utf8_lossy(name);
        return Ok(Some(name.trim_end_matches('\0').to_string()));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal x86-64 ELF header with one program header of type `p_type`, whose contents (if
    /// it is PT_INTERP) name the glibc loader.
    fn elf(p_type: u32) -> Vec<u8> {
        let mut b = vec![0u8; 0x40 + 0x38];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        b[0x40..0x44].copy_from_slice(&p_type.to_le_bytes());
        let interp = b"/lib64/ld-linux-x86-64.so.2\0";
        let offset = b.len() as u64;
        b[0x48..0x50].copy_from_slice(&offset.to_le_bytes());
        b[0x60..0x68].copy_from_slice(&(interp.len() as u64).to_le_bytes());
        b.extend_from_slice(interp);
        b
    }

    #[test]
    fn interpreter_found_only_in_dynamic_executables() {
        assert_eq!(
            elf_interpreter(&elf(3)).unwrap().as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        // PT_LOAD only: a static executable.
        assert_eq!(elf_interpreter(&elf(1)).unwrap(), None);
    }

    #[test]
    fn non_elf_and_truncated_files_are_refused() {
        assert!(
            elf_interpreter(b"#!/bin/sh\n")
                .unwrap_err()
                .contains("not a 64-bit")
        );
        let mut arm = elf(1);
        arm[0x12] = 183;
        assert!(elf_interpreter(&arm).unwrap_err().contains("x86-64"));
        assert!(
            elf_interpreter(&elf(3)[..0x50])
                .unwrap_err()
                .contains("truncated")
        );
    }

    #[test]
    fn the_host_shell_is_dynamic() {
        // A real file as a cross-check of the parser: Debian's /bin/sh is dynamically linked.
        let sh = std::fs::read("/bin/sh").unwrap();
        assert!(elf_interpreter(&sh).unwrap().is_some());
    }

    #[test]
    fn executable_comes_from_the_named_artifact() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"libc"},"executable":null}
{"reason":"compiler-artifact","target":{"name":"kiln-agent"},"executable":"/t/release/kiln-agent"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable(messages, "kiln-agent"),
            Some(PathBuf::from("/t/release/kiln-agent"))
        );
        assert_eq!(executable(messages, "kiln-vmm"), None);
        assert_eq!(
            executable("{\"reason\":\"build-finished\"}", "kiln-agent"),
            None
        );
    }
}
