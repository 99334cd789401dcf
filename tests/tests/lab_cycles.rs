//! Many VM lifecycles in one L1, one after another, as a user's loop of `kiln run` makes them:
//! restores of one snapshot (restore, exec, kill) and boots (boot, exec, shutdown). Every cycle
//! must give the right output within its bound, L1 must stay up, and nothing may be left behind.
//! CI runs `KILN_CYCLES_RESTORES` (default 100) and `KILN_CYCLES_BOOTS` (default 20);
//! `cargo xtask bench cycles` runs 500 and 200 with timings.

use kiln_tests::ScratchDir;
use kiln_tests::cycles::{Census, Cycle, make_snapshot, p50_p99, run_cycle};

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn restores_and_boots_cycle_without_hangs_or_leaks() {
    let scratch = ScratchDir::new("cycles");
    let snap = make_snapshot(scratch.path()).expect("a snapshot to restore");
    let before = Census::take();
    let mut times = Vec::new();
    for (kind, n) in [
        (Cycle::Restore, count("KILN_CYCLES_RESTORES", 100)),
        (Cycle::Boot, count("KILN_CYCLES_BOOTS", 20)),
    ] {
        times.clear();
        for i in 0..n {
            match run_cycle(kind, i, &snap) {
                Ok(t) => times.push(t),
                Err(e) => panic!("{e}"),
            }
        }
        let (p50, p99) = p50_p99(&times);
        eprintln!("{n} {kind:?} cycles: p50 {p50} ms, p99 {p99} ms");
    }
    let after = Census::take();
    assert_eq!(before, after, "what the cycles left behind");
}

/// KVM patches kernel text (static keys) whenever the first VM on L1 is created or the last one
/// destroyed, which under QEMU's multi-threaded TCG hung L1 for good within a few hundred VMs; the
/// lab's init holds one VM open (`kvm-pin`) so the keys never flip. This churns 1000 VMs while
/// other threads switch contexts as fast as they can: it hung L1 every time without the pin.
#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn creating_and_destroying_kvm_vms_does_not_hang_l1() {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    let (mut a_read, mut a_write) = std::io::pipe().expect("pipe");
    let (mut b_read, mut b_write) = std::io::pipe().expect("pipe");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let echo = std::thread::spawn(move || {
        let mut byte = [0u8];
        while a_read.read_exact(&mut byte).is_ok() && b_write.write_all(&byte).is_ok() {}
    });
    let ping = std::thread::spawn(move || {
        let mut byte = [0u8];
        while !stop2.load(std::sync::atomic::Ordering::Relaxed)
            && a_write.write_all(&byte).is_ok()
            && b_read.read_exact(&mut byte).is_ok()
        {}
    });
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .expect("open /dev/kvm");
    for i in 0..count("KILN_VM_CHURN", 1000) {
        // SAFETY: KVM_CREATE_VM on our /dev/kvm descriptor takes no pointer argument.
        let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), 0xae01, 0) };
        assert!(
            vm >= 0,
            "KVM_CREATE_VM #{i}: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `vm` was just returned by KVM and is owned by nothing else; dropping it
        // destroys the VM.
        drop(unsafe { OwnedFd::from_raw_fd(vm) });
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    ping.join().expect("the ping thread");
    echo.join().expect("the echo thread");
}
