//! `kvm-pin`: a tiny static program L1's init starts before CMD, which holds one KVM VM with one
//! vCPU open for L1's whole life.
//!
//! Why: KVM flips kernel static keys when the first VM on a host is created and the last one is
//! destroyed (`preempt_notifier_key`, tested in `__schedule`), and when a vCPU's local APIC is
//! software-enabled (`apic_sw_disabled`, from a deferred worker a second later). Each flip patches
//! kernel text live with `text_poke_bp` (an `int3` over the site, IPIs, the new bytes). Under
//! QEMU's multi-threaded TCG that cross-CPU code patching is not reliable: a lab running one VM
//! after another hung L1 for good after 7 to 61 VMs, both L1 CPUs looping on an `int3` at the
//! patch site in `__schedule` (`xtask lab`'s hang report showed it). With one VM always alive the
//! counts never return to zero, the keys never flip, and nothing is patched: the same loop ran
//! its 300 VMs clean. Real hosts (hardware KVM) patch safely and need none of this.

use std::path::PathBuf;
use std::process::Command;

use crate::util::{self, Result};

/// The program, built with `rustc` alone (no crates), statically linked so busybox's initramfs can
/// run it.
const SOURCE: &str = r#"
//! Holds a KVM VM with one vCPU (in-kernel irqchip) until killed; see xtask/src/lab/kvm_pin.rs.
use std::os::fd::AsRawFd;

// SAFETY: the C library's own declarations of ioctl(2) and pause(2).
unsafe extern "C" {
    fn ioctl(fd: i32, request: u64, ...) -> i32;
    fn pause() -> i32;
}

const KVM_CREATE_VM: u64 = 0xae01;
const KVM_CREATE_IRQCHIP: u64 = 0xae60;
const KVM_CREATE_VCPU: u64 = 0xae41;

fn check(what: &str, ret: i32) -> i32 {
    if ret < 0 {
        eprintln!("kvm-pin: {what} failed: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    ret
}

fn main() {
    let kvm = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(f) => f,
        Err(e) => {
            eprintln!("kvm-pin: /dev/kvm: {e}");
            std::process::exit(1);
        }
    };
    // SAFETY: plain KVM ioctls on descriptors this program owns; no pointers are passed.
    let vm = check("KVM_CREATE_VM", unsafe { ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0u64) });
    // SAFETY: as above.
    check("KVM_CREATE_IRQCHIP", unsafe { ioctl(vm, KVM_CREATE_IRQCHIP, 0u64) });
    // SAFETY: as above.
    check("KVM_CREATE_VCPU", unsafe { ioctl(vm, KVM_CREATE_VCPU, 0u64) });
    if let Some(ready) = std::env::args().nth(1) {
        let _ = std::fs::write(ready, b"1");
    }
    loop {
        // SAFETY: pause only waits for a signal.
        unsafe { pause() };
    }
}
"#;

/// Builds `kvm-pin` (cached under `<cache>/lab/` by the source and the compiler's version) and
/// returns its path.
pub fn build() -> Result<PathBuf> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = util::output(Command::new(&rustc).arg("--version"))?;
    let key = util::hash_parts([SOURCE.as_bytes(), version.as_bytes()]);
    let dir = util::cache_dir().join("lab");
    let out = dir.join(format!("kvm-pin-{}", &key[..16]));
    if out.exists() {
        return Ok(out);
    }
    util::mkdir(&dir)?;
    let src = dir.join(format!("kvm-pin-{}.rs", std::process::id()));
    util::write_atomic(&src, SOURCE.as_bytes())?;
    let tmp = out.with_extension("tmp");
    let built = util::run(
        Command::new(&rustc)
            .args([
                "--edition",
                "2024",
                "-O",
                "-C",
                "target-feature=+crt-static",
            ])
            .args(["--target", "x86_64-unknown-linux-gnu", "-o"])
            .arg(&tmp)
            .arg(&src),
    );
    let _ = std::fs::remove_file(&src);
    built?;
    std::fs::rename(&tmp, &out)
        .map_err(|e| format!("cannot move {} to {}: {e}", tmp.display(), out.display()))?;
    Ok(out)
}

/// Where init finds it in the L1 initramfs.
pub const IN_INITRAMFS: &str = "bin/kvm-pin";

/// For tests: `path` is an ELF with no program interpreter (statically linked).
#[cfg(test)]
fn is_static_elf(path: &std::path::Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| {
        b.get(o..o + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
    };
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let phoff = b
        .get(0x20..0x28)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])) as usize);
    let (Some(phoff), Some(size), Some(num)) = (phoff, u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    const PT_INTERP: u32 = 3;
    b.starts_with(b"\x7fELF")
        && (0..num).all(|i| u32_at(phoff + i * size).is_some_and(|t| t != PT_INTERP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_builds_static() {
        let path = build().expect("build kvm-pin");
        assert!(
            is_static_elf(&path),
            "{} is not a static ELF",
            path.display()
        );
    }
}
