//! Transparent huge pages stay off for kiln-vmm's own memory.
//!
//! With THP set to `always` on the host (Debian's default), any anonymous mapping that covers an
//! aligned 2 MiB range gets a huge page at its first touch. Measured in the lab, every idle
//! sandbox's VMM had one anonymous mapping of exactly 2 MiB, 2 MiB aligned and wholly resident
//! (2 of its 5.4 MiB PSS): by its size a thread's stack (Rust's default, its guard page apart),
//! which uses a few KiB. So the process turns THP off for itself first thing
//! (`PR_SET_THP_DISABLE`, kept across the jailer's exec), and back on only when the guest's
//! memory asks for it (`huge_pages: "Transparent"`), just before advising that memory.

use std::io;

/// `PR_SET_THP_DISABLE` with `disable`.
fn set(disable: bool) -> io::Result<()> {
    // SAFETY: prctl with an integer option and integer arguments; it touches no memory of ours.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_THP_DISABLE,
            libc::c_ulong::from(disable),
            0,
            0,
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Turns THP off for this process's memory (call it first thing in `main`).
pub fn disable_for_process() -> io::Result<()> {
    set(true)
}

/// Turns THP back on (for guest memory with `huge_pages: "Transparent"`).
pub fn enable_for_process() -> io::Result<()> {
    set(false)
}

/// Whether THP is off for this process.
pub fn disabled_for_process() -> io::Result<bool> {
    // SAFETY: prctl with an integer option; it returns the flag or -1.
    let rc = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
    match rc {
        0 => Ok(false),
        r if r > 0 => Ok(true),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_goes_off_and_on() {
        disable_for_process().unwrap();
        assert!(disabled_for_process().unwrap());
        enable_for_process().unwrap();
        assert!(!disabled_for_process().unwrap());
    }
}
