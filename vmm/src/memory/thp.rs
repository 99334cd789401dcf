//! Transparent huge pages stay off for kiln-vmm's own memory.
//!
//! With THP set to `always` on the host (Debian's default), any anonymous mapping that covers an
//! aligned 2 MiB range gets a huge page at its first touch. A thread's 2 MiB stack placed right
//! under guest memory (whose mapping is 2 MiB aligned) is exactly such a range: measured in the
//! lab, every idle sandbox's VMM held one 2 MiB huge page for a stack that uses a few KiB, 2 of
//! its 5.4 MiB. So the process turns THP off for itself first thing (`PR_SET_THP_DISABLE`, kept
//! across the jailer's exec), and turns it back on only when the guest's memory asks for it
//! (`huge_pages: "Transparent"`), just before advising that memory.

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
