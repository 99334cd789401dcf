//! The token buckets on a fake clock: the rate over time, the burst, debt from large frames,
//! updates, and saved state.

use super::*;

const MS: Duration = Duration::from_millis(1);

fn bucket(size: u64, burst: u64, refill_ms: u64) -> BucketConfig {
    BucketConfig {
        size,
        one_time_burst: burst,
        refill_time_ms: refill_ms,
    }
}

fn limiter(bw: Option<BucketConfig>, ops: Option<BucketConfig>) -> (RateLimiter, FakeClock) {
    let clock = FakeClock::new();
    let cfg = RateLimiterConfig { bandwidth: bw, ops };
    (RateLimiter::new(&cfg, Arc::new(clock.clone())), clock)
}

/// Sends `frame`-byte frames whenever the limiter allows, stepping the clock by `step`, for
/// `total`; returns the bytes sent.
fn send_for(
    l: &mut RateLimiter,
    clock: &FakeClock,
    frame: u64,
    step: Duration,
    total: Duration,
) -> u64 {
    let mut sent = 0;
    let end = clock.now() + total;
    while clock.now() < end {
        while l.ready() {
            l.consume(frame);
            sent += frame;
        }
        clock.advance(step);
    }
    sent
}

#[test]
fn a_full_bucket_lets_its_size_through_then_waits_for_the_refill() {
    // 10,000 bytes per 100 ms.
    let (mut l, clock) = limiter(Some(bucket(10_000, 0, 100)), None);
    let mut sent = 0;
    while l.ready() {
        l.consume(1000);
        sent += 1000;
    }
    assert_eq!(sent, 10_000, "exactly the bucket, no more");
    // One token takes 10 us to come back.
    assert_eq!(l.wait(), Some(Duration::from_micros(10)));
    clock.advance(Duration::from_micros(9));
    assert!(!l.ready());
    assert_eq!(l.wait(), Some(Duration::from_micros(1)));
    clock.advance(Duration::from_micros(1));
    assert!(l.ready());
    assert_eq!(l.wait(), None);
}

#[test]
fn over_ten_seconds_the_rate_is_the_configured_one() {
    // 1 MB/s as 100,000 bytes per 100 ms, 1500-byte frames, polled every 0.7 ms.
    let (mut l, clock) = limiter(Some(bucket(100_000, 0, 100)), None);
    let sent = send_for(
        &mut l,
        &clock,
        1500,
        Duration::from_micros(700),
        Duration::from_secs(10),
    );
    // The full bucket at the start plus ten seconds of refill, give or take a frame.
    let want = 100_000 + 10 * 1_000_000;
    assert!(
        sent.abs_diff(want) <= 1500,
        "sent {sent} bytes in 10 s; want {want} +- one frame"
    );
}

#[test]
fn nanosecond_polling_loses_no_refill() {
    // 1000 tokens per second: one token every millisecond, polled every 3 ns.
    let (mut l, clock) = limiter(None, Some(bucket(1000, 0, 1000)));
    for _ in 0..1000 {
        assert!(l.ready());
        l.consume(0);
    }
    assert!(!l.ready());
    let mut steps = 0u64;
    while !l.ready() {
        clock.advance(Duration::from_nanos(3));
        steps += 1;
    }
    assert_eq!(
        steps, 333_334,
        "the first token comes back after 1 ms of 3 ns steps"
    );
}

#[test]
fn the_one_time_burst_is_spent_first_and_never_comes_back() {
    let (mut l, clock) = limiter(Some(bucket(1000, 5000, 1000)), None);
    let mut sent = 0;
    while l.ready() {
        l.consume(500);
        sent += 500;
    }
    assert_eq!(sent, 6000, "burst and bucket");
    clock.advance(Duration::from_secs(100));
    let mut again = 0;
    while l.ready() {
        l.consume(500);
        again += 500;
    }
    assert_eq!(again, 1000, "only the bucket refills");
}

#[test]
fn a_frame_larger_than_the_bucket_passes_and_leaves_a_debt() {
    // 1000 bytes per second; one 65,000-byte frame.
    let (mut l, clock) = limiter(Some(bucket(1000, 0, 1000)), None);
    assert!(l.ready());
    l.consume(65_000);
    // 64,000 bytes of debt plus one byte: 64.001 s.
    assert_eq!(l.wait(), Some(Duration::from_millis(64_001)));
    clock.advance(Duration::from_secs(64));
    assert!(!l.ready());
    clock.advance(MS);
    assert!(l.ready());
}

#[test]
fn the_ops_bucket_counts_frames_whatever_their_size() {
    // 10 frames per second, no byte limit.
    let (mut l, clock) = limiter(None, Some(bucket(10, 0, 1000)));
    let sent = send_for(&mut l, &clock, 60_000, MS, Duration::from_millis(5001));
    assert_eq!(
        sent / 60_000,
        10 + 50,
        "ten at once, then one every 100 ms for 5 s"
    );
}

#[test]
fn both_buckets_must_agree() {
    // Bytes allow 10 frames of 100; ops allow 3.
    let (mut l, _clock) = limiter(Some(bucket(1000, 0, 1000)), Some(bucket(3, 0, 1000)));
    let mut frames = 0;
    while l.ready() {
        l.consume(100);
        frames += 1;
    }
    assert_eq!(frames, 3);
}

#[test]
fn zero_size_or_refill_time_limits_nothing() {
    for cfg in [bucket(0, 0, 100), bucket(100, 0, 0)] {
        let (mut l, _clock) = limiter(Some(cfg), Some(cfg));
        assert!(l.is_unlimited());
        for _ in 0..10_000 {
            assert!(l.ready());
            l.consume(1 << 20);
        }
        assert_eq!(l.wait(), None);
    }
}

#[test]
fn updates_replace_or_keep_each_bucket() {
    let (mut l, clock) = limiter(Some(bucket(1000, 0, 1000)), Some(bucket(5, 0, 1000)));
    l.consume(1000);
    assert!(!l.ready());
    // A new bandwidth bucket starts full; the ops bucket keeps its state.
    l.update(BucketUpdate::Set(bucket(2000, 0, 1000)), BucketUpdate::Keep);
    assert!(l.ready());
    assert_eq!(l.config().bandwidth, Some(bucket(2000, 0, 1000)));
    assert_eq!(
        l.save().ops.unwrap().budget,
        4,
        "one op was used before the update"
    );
    // Removing the byte limit.
    l.consume(5000);
    l.update(BucketUpdate::Set(bucket(0, 0, 0)), BucketUpdate::Keep);
    assert!(l.ready());
    assert_eq!(l.config().bandwidth, None);
    clock.advance(MS);
}

#[test]
fn saved_state_comes_back_with_its_debt() {
    let (mut l, _clock) = limiter(Some(bucket(1000, 300, 1000)), None);
    l.consume(2000);
    let state = l.save();
    assert_eq!(
        state.bandwidth,
        Some(BucketState {
            config: bucket(1000, 300, 1000),
            budget: -700,
            burst_left: 0
        })
    );
    let clock = FakeClock::new();
    clock.advance(Duration::from_secs(1000));
    let mut back = RateLimiter::restore(&state, Arc::new(clock.clone()));
    assert_eq!(
        back.save(),
        state,
        "refills count from the restore, not the clock's origin"
    );
    assert_eq!(back.wait(), Some(Duration::from_millis(701)));
}

#[test]
fn configurations_out_of_range_are_named() {
    let e = bucket(10, 0, MAX_REFILL_TIME_MS + 1)
        .check("rx_rate_limiter")
        .unwrap_err();
    assert!(
        e.to_string().starts_with("rx_rate_limiter: refill_time"),
        "{e}"
    );
    let cfg = RateLimiterConfig {
        bandwidth: None,
        ops: Some(bucket(u64::MAX, 0, 10)),
    };
    let e = cfg.check("tx_rate_limiter").unwrap_err();
    assert!(
        e.to_string()
            .contains("size 18446744073709551615 is too large"),
        "{e}"
    );
}
