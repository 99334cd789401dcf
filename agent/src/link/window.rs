//! Flow control. A [`Window`] is the credit we have for sending on one stream: senders wait on it
//! and the peer's credit frames refill it. A [`Budget`] checks that a peer stays within the credit
//! we gave it, so a hostile peer cannot make us queue without bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

struct State {
    available: u64,
    /// The most `available` may be: the initial credit (what the peer can hold unacknowledged).
    cap: u64,
    closed: bool,
}

/// What waiting for credit until a deadline came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credit {
    /// This many bytes may be sent now.
    Granted(usize),
    /// The stream is over.
    Closed,
    /// The deadline passed first.
    TimedOut,
}

/// Send credit for one stream.
pub struct Window {
    state: Mutex<State>,
    changed: Condvar,
}

impl Window {
    /// A window holding `initial` bytes of credit.
    pub fn new(initial: u32) -> Window {
        Window {
            state: Mutex::new(State {
                available: u64::from(initial),
                cap: u64::from(initial),
                closed: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until there is credit, then returns how much may be sent now (at most `max`), or
    /// `None` once the window is closed. The caller then [`Window::consume`]s what it sent.
    pub fn wait(&self, max: usize) -> Option<usize> {
        let mut s = self.lock();
        loop {
            if s.closed {
                return None;
            }
            if s.available > 0 {
                return Some(usize::try_from(s.available).unwrap_or(usize::MAX).min(max));
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Spends `n` bytes of credit.
    pub fn consume(&self, n: usize) {
        let mut s = self.lock();
        s.available = s.available.saturating_sub(n as u64);
    }

    /// Adds credit the peer returned, up to the initial window (more would be credit for bytes
    /// never sent).
    pub fn grant(&self, n: u32) {
        let mut s = self.lock();
        s.available = s.available.saturating_add(u64::from(n)).min(s.cap);
        self.changed.notify_all();
    }

    /// Like [`Window::wait`], but gives up at `deadline`.
    pub fn wait_until(&self, max: usize, deadline: Instant) -> Credit {
        let mut s = self.lock();
        loop {
            if s.closed {
                return Credit::Closed;
            }
            if s.available > 0 {
                return Credit::Granted(
                    usize::try_from(s.available).unwrap_or(usize::MAX).min(max),
                );
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Credit::TimedOut;
            };
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Wakes every waiter for good: the stream is over.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

/// Bytes a peer has sent on one stream that we have not yet returned as credit.
#[derive(Default)]
pub struct Budget {
    outstanding: AtomicU64,
}

impl Budget {
    /// Records `n` received bytes; false if that takes the peer past `limit`.
    pub fn charge(&self, n: usize, limit: u32) -> bool {
        let now = self.outstanding.fetch_add(n as u64, Ordering::AcqRel) + n as u64;
        now <= u64::from(limit)
    }

    /// Records that `n` bytes were consumed (and credited back to the peer).
    pub fn release(&self, n: usize) {
        let _ = self
            .outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n as u64))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn waits_for_credit_and_wakes_on_close() {
        let w = Arc::new(Window::new(10));
        assert_eq!(w.wait(4), Some(4));
        w.consume(10);
        let w2 = w.clone();
        let t = thread::spawn(move || w2.wait(100));
        thread::sleep(Duration::from_millis(20));
        w.grant(7);
        assert_eq!(t.join().unwrap(), Some(7));
        w.consume(7);
        let w3 = w.clone();
        let t = thread::spawn(move || w3.wait(100));
        thread::sleep(Duration::from_millis(20));
        w.close();
        assert_eq!(t.join().unwrap(), None);
    }

    #[test]
    fn grants_never_exceed_the_initial_window() {
        let w = Window::new(10);
        w.consume(4);
        w.grant(u32::MAX);
        w.grant(u32::MAX);
        assert_eq!(w.wait(usize::MAX), Some(10));
        w.consume(10);
        let end = Instant::now() + Duration::from_millis(30);
        assert_eq!(w.wait_until(5, end), Credit::TimedOut);
        w.grant(3);
        assert_eq!(w.wait_until(5, end), Credit::Granted(3));
        w.close();
        assert_eq!(w.wait_until(5, end), Credit::Closed);
    }

    #[test]
    fn budget_catches_overrun() {
        let b = Budget::default();
        assert!(b.charge(6, 10));
        assert!(b.charge(4, 10));
        b.release(5);
        assert!(b.charge(5, 10));
        assert!(!b.charge(1, 10));
    }
}
