//! A [`RateLimiter`] with the timer that wakes its device: for devices that check the limiter
//! before each request and, when it says wait, stop until the timer fires (the block device).
//! The network device, which learns a frame's length only after reading it, arms timers of its
//! own from [`RateLimiter::wait`].

use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::timerfd::TimerFd;

use super::{BucketUpdate, Clock, RateLimiter, RateLimiterConfig};

/// The shortest timer set: a wait rounded down to nothing would spin the event loop.
const MIN_WAIT: Duration = Duration::from_micros(100);

/// A limiter, its timer, and whether the device is waiting for that timer.
pub struct TimedRateLimiter {
    limiter: RateLimiter,
    timer: TimerFd,
    /// The timer is set: the device waits for it before trying again.
    blocked: bool,
}

impl std::fmt::Debug for TimedRateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimedRateLimiter")
            .field("limiter", &self.limiter)
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl TimedRateLimiter {
    /// A limiter on `clock`. The timer is made here, before the VMM thread's seccomp filter is
    /// in, so limits can be set later without creating descriptors.
    pub fn new(config: &RateLimiterConfig, clock: Arc<dyn Clock>) -> std::io::Result<Self> {
        Ok(Self {
            limiter: RateLimiter::new(config, clock),
            timer: TimerFd::new()?,
            blocked: false,
        })
    }

    /// The timer the device's event handler watches.
    pub fn timer(&self) -> &TimerFd {
        &self.timer
    }

    /// True while a throttled request waits for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer fired: the device may try again.
    pub fn on_timer(&mut self) {
        let _ = self.timer.wait();
        self.blocked = false;
    }

    /// Applies a `PATCH`, and lets a waiting request try again at once.
    pub fn update(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        self.limiter.update(bandwidth, ops);
        if self.blocked {
            let _ = self.timer.clear();
            self.blocked = false;
        }
    }

    /// The buckets' settings.
    pub fn config(&self) -> RateLimiterConfig {
        self.limiter.config()
    }

    /// Counts one request of `bytes` and returns true when the limiter lets it go now; false
    /// when the device must wait, with the timer set for when it may try again.
    pub fn consume(&mut self, bytes: u64) -> bool {
        if self.blocked {
            return false;
        }
        let Some(wait) = self.limiter.wait() else {
            self.limiter.consume(bytes);
            return true;
        };
        if let Err(e) = self.timer.reset(wait.max(MIN_WAIT), None) {
            // Without a timer nothing would wake the device: let the request go.
            log::warn!("rate limiter: cannot set its timer: {e}");
            self.limiter.consume(bytes);
            return true;
        }
        self.blocked = true;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limiter::{BucketConfig, FakeClock};

    fn bucket(size: u64) -> Option<BucketConfig> {
        Some(BucketConfig {
            size,
            one_time_burst: 0,
            refill_time_ms: 50,
        })
    }

    #[test]
    fn a_throttled_request_waits_for_the_timer_and_updates_release_it() {
        let clock = FakeClock::new();
        let config = RateLimiterConfig {
            bandwidth: bucket(4096),
            ops: bucket(2),
        };
        let mut r = TimedRateLimiter::new(&config, Arc::new(clock.clone())).unwrap();
        assert!(r.consume(4096));
        assert!(!r.consume(512), "bytes exhausted");
        assert!(r.is_blocked());
        clock.advance(Duration::from_millis(60));
        assert!(!r.consume(0), "still blocked until the timer");
        // The timer was set for the refill (50 ms of real time at most, 100 us at least).
        r.on_timer();
        assert!(!r.is_blocked());
        assert!(r.consume(512));
        assert!(r.consume(1));
        assert!(!r.consume(1), "two operations spent within one refill");
        r.update(
            BucketUpdate::Keep,
            BucketUpdate::Set(BucketConfig {
                size: 0,
                one_time_burst: 0,
                refill_time_ms: 0,
            }),
        );
        assert!(!r.is_blocked(), "an update lets a waiting request retry");
        assert!(r.consume(1), "ops limit removed; bandwidth left");
        assert_eq!(r.config().ops, None);
        assert_eq!(r.config().bandwidth, bucket(4096));
    }
}
