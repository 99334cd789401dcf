//! Ctrl-C and friends. The signals are blocked in every thread and taken by one thread with
//! `sigwait`, which cleans up and exits (128 + N); SIGWINCH instead resizes the guest terminal.
//! [`install`] must run before any other thread starts, so they all inherit the mask.

use std::sync::Mutex;
use std::thread;

use crate::cleanup;

type Resize = Box<dyn Fn() + Send>;

static ON_WINCH: Mutex<Option<Resize>> = Mutex::new(None);

const HANDLED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGWINCH];

fn set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in HANDLED {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Blocks the signals and starts the thread that takes them.
pub fn install() {
    let set = set();
    // SAFETY: valid sigset_t; no old mask wanted. (`Vm::boot` clears the mask in the VMM.)
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let _ = thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                let mut sig = 0;
                // SAFETY: sigwait with a valid set and out-pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                if sig == libc::SIGWINCH {
                    if let Some(f) = ON_WINCH.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                        f();
                    }
                    continue;
                }
                cleanup::signalled();
                cleanup::run_all();
                let name = match sig {
                    libc::SIGINT => "interrupted",
                    libc::SIGTERM => "terminated",
                    _ => "hung up",
                };
                eprintln!("\r\nkiln: {name}; the VM was stopped");
                std::process::exit(128 + sig);
            }
        });
}

/// Runs `f` on every SIGWINCH (or nothing, with `None`).
pub fn on_winch(f: Option<Resize>) {
    *ON_WINCH.lock().unwrap_or_else(|p| p.into_inner()) = f;
}
