//! Rate limiters (drives', network interfaces') from the API's shapes to the device's
//! ([`kiln_devices::rate_limiter`]) and back.

use kiln_api::requests::rate_limiter::{RateLimiter, TokenBucket};
use kiln_devices::rate_limiter::{BucketConfig, BucketUpdate, RateLimiterConfig};

/// A bucket as the device takes it (an absent burst is none).
pub fn bucket(b: &TokenBucket) -> BucketConfig {
    BucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst.unwrap_or(0),
        refill_time_ms: b.refill_time,
    }
}

/// A limiter as the device takes it (absent: no limit).
pub fn rate_limiter(l: Option<&RateLimiter>) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: l.and_then(|l| l.bandwidth.as_ref()).map(bucket),
        ops: l.and_then(|l| l.ops.as_ref()).map(bucket),
    }
}

/// A `PATCH`'s limiter as bucket updates: a bucket given replaces, one left out stays.
pub fn updates(l: Option<&RateLimiter>) -> [BucketUpdate; 2] {
    let update =
        |b: Option<&TokenBucket>| b.map_or(BucketUpdate::Keep, |b| BucketUpdate::Set(bucket(b)));
    match l {
        None => [BucketUpdate::Keep; 2],
        Some(l) => [update(l.bandwidth.as_ref()), update(l.ops.as_ref())],
    }
}

/// The API's shape of a limiter the device runs (for `GET /vm/config` after a `PATCH`).
pub fn api_rate_limiter(c: &RateLimiterConfig) -> Option<RateLimiter> {
    let bucket = |b: &BucketConfig| TokenBucket {
        size: b.size,
        one_time_burst: (b.one_time_burst != 0).then_some(b.one_time_burst),
        refill_time: b.refill_time_ms,
    };
    let l = RateLimiter {
        bandwidth: c.bandwidth.as_ref().map(bucket),
        ops: c.ops.as_ref().map(bucket),
    };
    (l != RateLimiter::default()).then_some(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiters_convert_both_ways() {
        let l = RateLimiter {
            bandwidth: Some(TokenBucket {
                size: 1000,
                one_time_burst: Some(10),
                refill_time: 100,
            }),
            ops: None,
        };
        let c = rate_limiter(Some(&l));
        assert_eq!(
            c.bandwidth,
            Some(BucketConfig {
                size: 1000,
                one_time_burst: 10,
                refill_time_ms: 100
            })
        );
        assert_eq!(api_rate_limiter(&c), Some(l));
        assert_eq!(api_rate_limiter(&RateLimiterConfig::default()), None);
        assert_eq!(
            updates(Some(&l)),
            [BucketUpdate::Set(c.bandwidth.unwrap()), BucketUpdate::Keep]
        );
        assert_eq!(updates(None), [BucketUpdate::Keep; 2]);
    }
}
