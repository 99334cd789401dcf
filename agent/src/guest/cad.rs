//! Ctrl-Alt-Del, as PID 1 receives it. The kernel's keyboard handler either restarts the machine at
//! once, without syncing (its default), or, once init has asked with `reboot(RB_DISABLE_CAD)`,
//! sends SIGINT to PID 1. The agent asks, and treats SIGINT as a shutdown request: stop every
//! process, sync, unmount, reset the VM ([`super::init::power_off`]). This is what the VMM's
//! `PUT /actions SendCtrlAltDel` leads to.
//!
//! SIGINT is taken with `sigwait` on a thread of its own, so it must be blocked in every thread:
//! [`watch_sigint`] blocks it in the calling thread, which all threads started later inherit.
//! Children get an empty mask back before they exec (`spawn.rs`).

use std::io;
use std::thread;

use super::log;

/// Blocks SIGINT in the calling thread (and so in every thread it starts from now on), and starts
/// a thread that runs `on_sigint` when SIGINT arrives. Call it before any other thread starts: a
/// thread that does not block SIGINT could receive it instead.
pub fn watch_sigint(on_sigint: impl FnOnce() + Send + 'static) -> io::Result<()> {
    // SAFETY: sigset_t is plain data; all-zero is a valid value that sigemptyset then initialises.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned here; SIGINT is a valid signal number.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    let waiter = move || {
        loop {
            let mut signal = 0;
            // SAFETY: `set` is an initialised sigset_t moved into this thread; `signal` is a
            // valid out-pointer.
            let rc = unsafe { libc::sigwait(&set, &mut signal) };
            if rc == 0 && signal == libc::SIGINT {
                on_sigint();
                return;
            }
        }
    };
    thread::Builder::new()
        .name("sigint".into())
        .spawn(waiter)
        .map(drop)
}

/// As PID 1: shut down cleanly on Ctrl-Alt-Del. Failures are logged; then the kernel's default,
/// an immediate restart, stays in force, which still ends the VM.
pub fn shut_down_on_ctrl_alt_del() {
    let watching = watch_sigint(|| {
        log(format_args!("Ctrl-Alt-Del: shutting down"));
        super::init::power_off()
    });
    if let Err(e) = watching {
        log(format_args!("cannot watch for Ctrl-Alt-Del: {e}"));
        return;
    }
    // SAFETY: reboot(2) with RB_DISABLE_CAD only changes what the kernel does on Ctrl-Alt-Del.
    if unsafe { libc::reboot(libc::RB_DISABLE_CAD) } < 0 {
        log(format_args!(
            "cannot have Ctrl-Alt-Del sent as SIGINT: {}",
            io::Error::last_os_error()
        ));
    }
}
