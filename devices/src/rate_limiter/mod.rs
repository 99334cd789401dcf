//! Firecracker's rate limiter: a token bucket for bytes and one for operations, each optional.
//!
//! A bucket holds up to `size` tokens and refills continuously, `size` tokens every
//! `refill_time`; it starts full, plus a `one_time_burst` that is spent first and never comes
//! back. A device asks [`RateLimiter::ready`] before it moves a frame and [`RateLimiter::consume`]
//! afterwards, with the frame's length: the bucket may then go into debt (a frame larger than
//! what is left, even larger than the bucket, is never stuck), and nothing moves again until the
//! debt is paid back by refills. Over any long stretch the rate is exactly `size / refill_time`;
//! a device's receive side, which learns a frame's length only once it has read it, is limited
//! the same way as its transmit side.
//!
//! Time comes from a [`Clock`], so tests drive a fake one ([`FakeClock`]); devices use
//! [`MonotonicClock`]. The device arms its own timer from [`RateLimiter::wait`]: this type makes
//! no system calls. [`TimedRateLimiter`] adds the timer, for devices that stop until it fires
//! (block). The serial console's output uses a lone [`TokenBucket`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

mod timed;

pub use timed::TimedRateLimiter;

/// Why a rate limiter configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateLimiterError {
    /// A bucket's refill time does not fit in nanoseconds.
    #[error("{what}: refill_time {ms} ms is too long (at most {max} ms)")]
    RefillTime {
        /// Which bucket.
        what: &'static str,
        /// The refill time given.
        ms: u64,
        /// The largest accepted.
        max: u64,
    },
    /// A bucket's size or burst does not fit a signed 64-bit token count.
    #[error("{what}: {field} {value} is too large (at most {max})")]
    TooLarge {
        /// Which bucket.
        what: &'static str,
        /// `size` or `one_time_burst`.
        field: &'static str,
        /// The value given.
        value: u64,
        /// The largest accepted.
        max: u64,
    },
}

/// The longest refill time accepted: a year, far beyond any use, and far from overflow.
pub const MAX_REFILL_TIME_MS: u64 = 365 * 24 * 3600 * 1000;
/// The largest bucket size or burst accepted (2^62 tokens).
pub const MAX_TOKENS: u64 = 1 << 62;

/// One bucket as configured: Firecracker's `TokenBucket` object. A `size` or `refill_time` of 0
/// means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketConfig {
    /// Tokens the bucket holds when full (bytes or operations).
    pub size: u64,
    /// Extra tokens available once, at the start.
    pub one_time_burst: u64,
    /// Milliseconds to refill `size` tokens.
    pub refill_time_ms: u64,
}

impl BucketConfig {
    /// True when the bucket limits nothing.
    pub fn is_unlimited(&self) -> bool {
        self.size == 0 || self.refill_time_ms == 0
    }

    /// Checks the values fit the arithmetic; `what` names the bucket in the error.
    pub fn check(&self, what: &'static str) -> Result<(), RateLimiterError> {
        if self.refill_time_ms > MAX_REFILL_TIME_MS {
            return Err(RateLimiterError::RefillTime {
                what,
                ms: self.refill_time_ms,
                max: MAX_REFILL_TIME_MS,
            });
        }
        for (field, value) in [("size", self.size), ("one_time_burst", self.one_time_burst)] {
            if value > MAX_TOKENS {
                return Err(RateLimiterError::TooLarge {
                    what,
                    field,
                    value,
                    max: MAX_TOKENS,
                });
            }
        }
        Ok(())
    }
}

/// A limiter as configured: Firecracker's `RateLimiter` object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterConfig {
    /// Bytes.
    pub bandwidth: Option<BucketConfig>,
    /// Operations (frames, requests).
    pub ops: Option<BucketConfig>,
}

impl RateLimiterConfig {
    /// Checks both buckets; `what` names the limiter in errors ("rx_rate_limiter").
    pub fn check(&self, what: &'static str) -> Result<(), RateLimiterError> {
        if let Some(b) = &self.bandwidth {
            b.check(what)?;
        }
        if let Some(b) = &self.ops {
            b.check(what)?;
        }
        Ok(())
    }
}

/// A change to one bucket of a running limiter (`PATCH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketUpdate {
    /// Leave it as it is.
    Keep,
    /// Replace it (a zero size or refill time removes the limit).
    Set(BucketConfig),
}

/// Where time comes from.
pub trait Clock: Send + Sync {
    /// Time since some fixed point in the past; never goes backwards.
    fn now(&self) -> Duration;
}

/// The host's monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Clone, Default)]
pub struct FakeClock(Arc<AtomicU64>);

impl FakeClock {
    /// A clock at 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }
}

/// A bucket's saved state (snapshots): its configuration and what is left in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketState {
    /// The configuration.
    pub config: BucketConfig,
    /// Tokens in the bucket (negative: debt).
    pub budget: i64,
    /// What is left of the one-time burst.
    pub burst_left: u64,
}

/// One token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    config: BucketConfig,
    size: i64,
    refill_ns: u128,
    budget: i64,
    burst_left: u64,
    /// The time up to which refills were counted.
    counted_to: Duration,
}

impl TokenBucket {
    /// A full bucket, or `None` when `config` limits nothing. `config` must have passed
    /// [`BucketConfig::check`].
    pub fn new(config: BucketConfig, now: Duration) -> Option<Self> {
        if config.is_unlimited() {
            return None;
        }
        let size = config.size.min(MAX_TOKENS) as i64;
        Some(Self {
            config,
            size,
            refill_ns: u128::from(config.refill_time_ms.min(MAX_REFILL_TIME_MS)) * 1_000_000,
            budget: size,
            burst_left: config.one_time_burst.min(MAX_TOKENS),
            counted_to: now,
        })
    }

    /// The bucket as configured.
    pub fn config(&self) -> BucketConfig {
        self.config
    }

    /// Tokens in the bucket now (negative: debt), burst not included.
    pub fn budget(&self) -> i64 {
        self.budget
    }

    /// Adds what refilled since the last call.
    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.counted_to).as_nanos();
        let add = elapsed * self.size as u128 / self.refill_ns;
        if add == 0 {
            return;
        }
        let room = (self.size - self.budget) as u128;
        if add >= room {
            self.budget = self.size;
            self.counted_to = now;
        } else {
            self.budget += add as i64;
            // Only the time those tokens took is used up; the rest counts towards the next one.
            let used = (add * self.refill_ns).div_ceil(self.size as u128);
            self.counted_to += Duration::from_nanos(used.min(elapsed) as u64);
        }
    }

    /// Whether anything may go now: some burst is left or the budget is positive.
    pub fn ready(&mut self, now: Duration) -> bool {
        self.refill(now);
        self.burst_left > 0 || self.budget > 0
    }

    /// Takes `n` tokens, from the burst first; the budget may go into debt.
    pub fn consume(&mut self, now: Duration, n: u64) {
        self.refill(now);
        let from_burst = n.min(self.burst_left);
        self.burst_left -= from_burst;
        let rest = (n - from_burst).min(MAX_TOKENS) as i64;
        self.budget = self.budget.saturating_sub(rest).max(-(MAX_TOKENS as i64));
    }

    /// How long until [`TokenBucket::ready`] turns true (zero when it is).
    pub fn wait(&mut self, now: Duration) -> Duration {
        if self.ready(now) {
            return Duration::ZERO;
        }
        // One token is needed on top of the debt; the time already counted towards it is
        // subtracted.
        let missing = (1 - self.budget) as u128;
        let total = (missing * self.refill_ns).div_ceil(self.size as u128);
        let done = now.saturating_sub(self.counted_to).as_nanos();
        Duration::from_nanos(total.saturating_sub(done).max(1).min(u64::MAX as u128) as u64)
    }

    /// The bucket's state for a snapshot.
    pub fn save(&self) -> BucketState {
        BucketState {
            config: self.config,
            budget: self.budget,
            burst_left: self.burst_left,
        }
    }

    /// A bucket as saved, counting refills from `now`.
    pub fn restore(state: &BucketState, now: Duration) -> Option<Self> {
        let mut b = Self::new(state.config, now)?;
        b.budget = state.budget.clamp(-(MAX_TOKENS as i64), b.size);
        b.burst_left = state.burst_left.min(MAX_TOKENS);
        Some(b)
    }
}

/// A limiter's saved state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterState {
    /// The bytes bucket, if limited.
    pub bandwidth: Option<BucketState>,
    /// The operations bucket, if limited.
    pub ops: Option<BucketState>,
}

/// A bytes bucket and an operations bucket on one clock.
pub struct RateLimiter {
    clock: Arc<dyn Clock>,
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("bandwidth", &self.bandwidth)
            .field("ops", &self.ops)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter with full buckets; `config` must have passed [`RateLimiterConfig::check`].
    pub fn new(config: &RateLimiterConfig, clock: Arc<dyn Clock>) -> Self {
        let now = clock.now();
        Self {
            bandwidth: config.bandwidth.and_then(|c| TokenBucket::new(c, now)),
            ops: config.ops.and_then(|c| TokenBucket::new(c, now)),
            clock,
        }
    }

    /// A limiter that limits nothing.
    pub fn unlimited(clock: Arc<dyn Clock>) -> Self {
        Self::new(&RateLimiterConfig::default(), clock)
    }

    /// True when neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// The limiter's configuration now (unlimited buckets as `None`).
    pub fn config(&self) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::config),
            ops: self.ops.as_ref().map(TokenBucket::config),
        }
    }

    /// Whether one more operation may go now.
    pub fn ready(&mut self) -> bool {
        let now = self.clock.now();
        let bw = self.bandwidth.as_mut().is_none_or(|b| b.ready(now));
        let ops = self.ops.as_mut().is_none_or(|b| b.ready(now));
        bw && ops
    }

    /// Counts one operation of `bytes` bytes.
    pub fn consume(&mut self, bytes: u64) {
        let now = self.clock.now();
        if let Some(b) = self.bandwidth.as_mut() {
            b.consume(now, bytes);
        }
        if let Some(b) = self.ops.as_mut() {
            b.consume(now, 1);
        }
    }

    /// How long until [`RateLimiter::ready`] turns true; `None` when it is true now.
    pub fn wait(&mut self) -> Option<Duration> {
        let now = self.clock.now();
        let bw = self
            .bandwidth
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait(now));
        let ops = self.ops.as_mut().map_or(Duration::ZERO, |b| b.wait(now));
        let wait = bw.max(ops);
        (!wait.is_zero()).then_some(wait)
    }

    /// Applies a `PATCH`: each bucket kept or replaced by a full new one.
    pub fn update(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        let now = self.clock.now();
        if let BucketUpdate::Set(c) = bandwidth {
            self.bandwidth = TokenBucket::new(c, now);
        }
        if let BucketUpdate::Set(c) = ops {
            self.ops = TokenBucket::new(c, now);
        }
    }

    /// The limiter's state for a snapshot.
    pub fn save(&self) -> RateLimiterState {
        RateLimiterState {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::save),
            ops: self.ops.as_ref().map(TokenBucket::save),
        }
    }

    /// A limiter as saved, on `clock`.
    pub fn restore(state: &RateLimiterState, clock: Arc<dyn Clock>) -> Self {
        let now = clock.now();
        Self {
            bandwidth: state
                .bandwidth
                .as_ref()
                .and_then(|s| TokenBucket::restore(s, now)),
            ops: state
                .ops
                .as_ref()
                .and_then(|s| TokenBucket::restore(s, now)),
            clock,
        }
    }
}

#[cfg(test)]
mod tests;
