//! What must be undone however `kiln` ends, in one place that both the normal path and the
//! signal thread use: the VMM process killed, the temp dir removed, the terminal restored.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

#[derive(Default)]
struct State {
    vmm_pid: Option<libc::pid_t>,
    dir: Option<PathBuf>,
    termios: Option<libc::termios>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// Set once a signal is ending kiln: its thread then owns the exit (and the exit status).
static SIGNALLED: AtomicBool = AtomicBool::new(false);

fn state() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

fn with<R>(f: impl FnOnce(&mut State) -> R) -> R {
    f(state().get_or_insert_with(State::default))
}

/// Records the running VMM (or forgets it with `None`).
pub fn set_vmm(pid: Option<libc::pid_t>) {
    with(|s| s.vmm_pid = pid);
}

/// Records the temp dir (or forgets it with `None`).
pub fn set_dir(dir: Option<PathBuf>) {
    with(|s| s.dir = dir);
}

/// Records the terminal settings to restore (or forgets them with `None`).
pub fn set_termios(t: Option<libc::termios>) {
    with(|s| s.termios = t);
}

/// Restores the terminal now, if it was changed.
pub fn restore_terminal() {
    if let Some(t) = with(|s| s.termios.take()) {
        // SAFETY: tcsetattr on stdin with a termios that tcgetattr filled.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
    }
}

/// Undoes everything recorded. Safe to call more than once.
pub fn run_all() {
    restore_terminal();
    let (pid, dir) = with(|s| (s.vmm_pid.take(), s.dir.take()));
    if let Some(pid) = pid {
        // SAFETY: kill(2) has no memory effects; the pid is our unreaped child, so not recycled.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Says that a signal is ending kiln. Call before [`run_all`]: killing the VMM makes the main
/// thread fail too, and it must not exit first with its own status.
pub fn signalled() {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// Undoes everything and exits with `code`; if a signal is already ending kiln, waits for its
/// thread to exit instead, so the status is always 128 + the signal.
pub fn exit(code: i32) -> ! {
    if SIGNALLED.load(Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
    run_all();
    std::process::exit(code)
}
