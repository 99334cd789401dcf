//! The local terminal, for `--tty`: raw mode while the guest owns the screen, and its size.

use kiln_agent::protocol::TtySize;

use crate::cleanup;

/// Whether descriptor `fd` is a terminal.
pub fn is_tty(fd: libc::c_int) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// The size of the terminal on stdout (or stdin), or 24x80.
pub fn size() -> TtySize {
    for fd in [1, 0] {
        // SAFETY: winsize is plain data; TIOCGWINSZ fills it.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes a winsize to the valid pointer.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
            return TtySize {
                rows: ws.ws_row,
                cols: ws.ws_col,
            };
        }
    }
    TtySize { rows: 24, cols: 80 }
}

/// Puts stdin in raw mode until the guard drops (or cleanup runs): keys, Ctrl-C included, go to
/// the guest's terminal as bytes.
pub struct RawMode;

impl RawMode {
    /// Enters raw mode; `None` if stdin is not a terminal.
    pub fn enter() -> Option<RawMode> {
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr on stdin with a valid pointer.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return None;
        }
        cleanup::set_termios(Some(t));
        let mut raw = t;
        // SAFETY: cfmakeraw edits the valid termios; tcsetattr applies it to stdin.
        unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw);
        }
        Some(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        cleanup::restore_terminal();
    }
}
