//! Token buckets, as Firecracker's rate limiter: a device spends a bucket's tokens (bytes, or
//! operations) before it does the work; when a bucket is short, the work waits until the bucket
//! has refilled enough, and the device's timer says when.
//!
//! A bucket holds `size` tokens and refills at `size` per `refill_time`, continuously, never past
//! `size`; an extra `one_time_burst` is spent first and never refilled. A single cost larger than
//! the whole bucket is let through once the bucket is full, leaving a debt that later work waits
//! out (otherwise a request larger than the bucket could never run).

use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// One bucket's settings: Firecracker's `TokenBucket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketConfig {
    /// Tokens when full.
    pub size: u64,
    /// Extra tokens spent first, never refilled.
    pub one_time_burst: u64,
    /// Time to refill from empty to full.
    pub refill_time: Duration,
}

/// A limiter's settings: a bucket of bytes and one of operations, each optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimiterConfig {
    /// Bytes.
    pub bandwidth: Option<BucketConfig>,
    /// Operations.
    pub ops: Option<BucketConfig>,
}

/// One bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    config: BucketConfig,
    /// Tokens now; negative while a cost larger than the bucket is being paid off.
    budget: i128,
    burst: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; `None` for a configuration that limits nothing (a size or refill time of
    /// zero, as Firecracker treats them).
    pub fn new(config: BucketConfig, now: Instant) -> Option<Self> {
        if config.size == 0 || config.refill_time.is_zero() {
            return None;
        }
        Some(Self {
            config,
            budget: i128::from(config.size),
            burst: config.one_time_burst,
            last: now,
        })
    }

    /// The settings.
    pub fn config(&self) -> BucketConfig {
        self.config
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let size = i128::from(self.config.size);
        let period = self.config.refill_time.as_nanos() as i128;
        let gained = elapsed.as_nanos() as i128 * size / period;
        if gained > 0 {
            // Advance `last` only by the time the gained tokens account for, so fractions of a
            // token are not lost between calls.
            let used = Duration::from_nanos((gained * period / size) as u64);
            self.last += used;
            self.budget = (self.budget + gained).min(size);
        }
        if self.budget == size {
            self.last = now;
        }
    }

    /// Spends `tokens` at `now`, or says how long until it can.
    pub fn reduce(&mut self, tokens: u64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let mut tokens = tokens;
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        tokens -= from_burst;
        let want = i128::from(tokens);
        let size = i128::from(self.config.size);
        if self.budget >= want || (want > size && self.budget == size) {
            self.budget -= want;
            return Ok(());
        }
        // Give back what the burst paid: the whole cost is paid at once or not at all.
        self.burst += from_burst;
        let missing = want.min(size) - self.budget;
        let period = self.config.refill_time.as_nanos() as i128;
        let wait = (missing * period + size - 1) / size;
        Err(Duration::from_nanos(wait.clamp(1, u64::MAX as i128) as u64))
    }
}

/// A device's limiter: a bucket of bytes and one of operations, and the timer that wakes the
/// device when a throttled request can go.
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    /// The timer is set: the device waits for it before trying again.
    blocked: bool,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("bandwidth", &self.bandwidth)
            .field("ops", &self.ops)
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter with these buckets (none: unlimited). The timer is made here, before the VMM
    /// thread's seccomp filter is in, so limits can be set later without creating descriptors.
    pub fn new(
        bandwidth: Option<BucketConfig>,
        ops: Option<BucketConfig>,
    ) -> std::io::Result<Self> {
        let now = Instant::now();
        Ok(Self {
            bandwidth: bandwidth.and_then(|c| TokenBucket::new(c, now)),
            ops: ops.and_then(|c| TokenBucket::new(c, now)),
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

    /// Replaces the buckets that are `Some` (each `Some(None)` removes that bucket's limit), as
    /// `PATCH /drives` does, and lets a waiting request try again at once.
    pub fn update(
        &mut self,
        bandwidth: Option<Option<BucketConfig>>,
        ops: Option<Option<BucketConfig>>,
    ) {
        let now = Instant::now();
        if let Some(b) = bandwidth {
            self.bandwidth = b.and_then(|c| TokenBucket::new(c, now));
        }
        if let Some(o) = ops {
            self.ops = o.and_then(|c| TokenBucket::new(c, now));
        }
        if self.blocked {
            let _ = self.timer.clear();
            self.blocked = false;
        }
    }

    /// The buckets' settings.
    pub fn config(&self) -> (Option<BucketConfig>, Option<BucketConfig>) {
        (
            self.bandwidth.as_ref().map(TokenBucket::config),
            self.ops.as_ref().map(TokenBucket::config),
        )
    }

    /// Spends one operation and `bytes`, both or neither; false when the device must wait
    /// (the timer is then set for when it can try again).
    pub fn consume(&mut self, bytes: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let ops_wait = match self.ops.as_mut().map(|b| b.reduce(1, now)) {
            Some(Err(wait)) => Some(wait),
            _ => None,
        };
        let bytes_wait = match ops_wait {
            Some(_) => None,
            None => match self.bandwidth.as_mut().map(|b| b.reduce(bytes, now)) {
                Some(Err(wait)) => {
                    // The operation was spent; give it back, since nothing runs.
                    if let Some(ops) = self.ops.as_mut() {
                        ops.budget += 1;
                    }
                    Some(wait)
                }
                _ => None,
            },
        };
        let Some(wait) = ops_wait.or(bytes_wait) else {
            return true;
        };
        if let Err(e) = self.timer.reset(wait.max(Duration::from_micros(100)), None) {
            log::warn!("rate limiter: cannot set its timer: {e}");
            return true;
        }
        self.blocked = true;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, ms: u64, now: Instant) -> TokenBucket {
        TokenBucket::new(
            BucketConfig {
                size,
                one_time_burst: burst,
                refill_time: Duration::from_millis(ms),
            },
            now,
        )
        .unwrap()
    }

    #[test]
    fn a_bucket_spends_then_waits_for_its_refill() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        assert!(b.reduce(600, t0).is_ok());
        assert_eq!(b.reduce(600, t0), Err(Duration::from_millis(200)));
        assert!(b.reduce(600, t0 + Duration::from_millis(200)).is_ok());
        // Never more than full.
        let later = t0 + Duration::from_secs(100);
        assert!(b.reduce(1000, later).is_ok());
        assert!(b.reduce(1, later).is_err());
    }

    #[test]
    fn burst_is_spent_first_and_costs_larger_than_the_bucket_pass_when_it_is_full() {
        let t0 = Instant::now();
        let mut b = bucket(100, 50, 100, t0);
        assert!(b.reduce(150, t0).is_ok(), "burst plus the full bucket");
        assert!(b.reduce(1, t0).is_err());
        let t1 = t0 + Duration::from_millis(100);
        assert!(
            b.reduce(250, t1).is_ok(),
            "larger than the bucket, bucket full"
        );
        // The debt of 150 is paid off before anything else runs: 150 + 1 tokens is 151 ms.
        assert_eq!(b.reduce(1, t1), Err(Duration::from_millis(151)));
        assert!(b.reduce(1, t1 + Duration::from_millis(151)).is_ok());
    }

    #[test]
    fn zero_size_or_refill_limits_nothing() {
        let t0 = Instant::now();
        let zero = BucketConfig {
            size: 0,
            one_time_burst: 0,
            refill_time: Duration::from_millis(10),
        };
        assert!(TokenBucket::new(zero, t0).is_none());
        let mut r = RateLimiter::new(Some(zero), None).unwrap();
        assert!(r.consume(u64::MAX, t0));
    }

    #[test]
    fn a_limiter_takes_both_buckets_or_neither_and_blocks_until_its_timer() {
        let cfg = |size| BucketConfig {
            size,
            one_time_burst: 0,
            refill_time: Duration::from_millis(50),
        };
        let mut r = RateLimiter::new(Some(cfg(4096)), Some(cfg(2))).unwrap();
        let t0 = Instant::now();
        assert!(r.consume(4096, t0));
        assert!(!r.consume(512, t0), "bytes exhausted");
        assert!(r.is_blocked());
        assert!(!r.consume(0, t0), "still blocked until the timer");
        std::thread::sleep(Duration::from_millis(60));
        r.on_timer();
        assert!(r.consume(512, Instant::now()));
        // The refused attempt did not spend an operation: one is left of two, refilled.
        r.update(Some(None), None);
        assert!(
            r.consume(1 << 30, Instant::now()),
            "bandwidth limit removed"
        );
        assert_eq!(r.config().0, None);
        assert_eq!(r.config().1, Some(cfg(2)));
    }
}
