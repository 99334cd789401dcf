//! Firecracker's `RateLimiter` and `TokenBucket` objects: a drive's (and the serial console's)
//! budget of bytes and operations. The buckets themselves run in `kiln-devices`; these are their
//! shapes on the wire.

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// Firecracker's `TokenBucket`: `size` tokens refilled over `refill_time` milliseconds, plus a
/// first burst of `one_time_burst` that is not refilled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Tokens the bucket holds when full.
    pub size: u64,
    /// Extra tokens for the start, spent first and never refilled.
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill from empty to `size`.
    pub refill_time: u64,
}

impl TokenBucket {
    /// True when the bucket limits nothing (Firecracker treats `size` or `refill_time` of 0 so).
    pub fn is_unlimited(&self) -> bool {
        self.size == 0 || self.refill_time == 0
    }
}

/// Firecracker's `RateLimiter`: a bucket of bytes and one of operations, each optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes per refill period.
    #[serde(default)]
    pub bandwidth: Option<TokenBucket>,
    /// Operations per refill period.
    #[serde(default)]
    pub ops: Option<TokenBucket>,
}

/// Refill times longer than this are refused: a bucket refilled once a day is a mistake, and
/// the bound keeps the refill arithmetic far from overflow.
pub const MAX_REFILL_TIME_MS: u64 = 24 * 3600 * 1000;

impl RateLimiter {
    /// Checks each bucket's refill time; `resource` names the body in the error.
    pub fn check(&self, resource: &'static str) -> Result<(), ApiError> {
        for (name, bucket) in [("bandwidth", self.bandwidth), ("ops", self.ops)] {
            if let Some(b) = bucket
                && b.refill_time > MAX_REFILL_TIME_MS
            {
                return Err(ApiError::bad_body(
                    resource,
                    format!(
                        "rate_limiter.{name}.refill_time {} ms is longer than a day ({MAX_REFILL_TIME_MS} ms)",
                        b.refill_time
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_parse_and_zero_means_unlimited() {
        let r: RateLimiter = serde_json::from_str(
            r#"{"bandwidth": {"size": 1048576, "refill_time": 1000, "one_time_burst": 4096},
                "ops": {"size": 0, "refill_time": 100}}"#,
        )
        .unwrap();
        let bw = r.bandwidth.unwrap();
        assert_eq!(
            (bw.size, bw.refill_time, bw.one_time_burst),
            (1 << 20, 1000, Some(4096))
        );
        assert!(!bw.is_unlimited());
        assert!(r.ops.unwrap().is_unlimited());
        assert!(serde_json::from_str::<RateLimiter>(r#"{"bw": {}}"#).is_err());
        let long = RateLimiter {
            ops: Some(TokenBucket {
                size: 1,
                one_time_burst: None,
                refill_time: MAX_REFILL_TIME_MS + 1,
            }),
            bandwidth: None,
        };
        assert!(
            long.check("drives")
                .unwrap_err()
                .to_string()
                .contains("rate_limiter.ops.refill_time")
        );
    }
}
