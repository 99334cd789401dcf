//! Counters the devices keep for kiln-vmm's metrics file (Firecracker's groups and names). Each
//! device holds its counters behind an `Arc`, so the VMM reads them without stopping the device.
//! Counters are reported as what happened since the previous report, as Firecracker's are.

use std::sync::atomic::{AtomicU64, Ordering};

pub use serde_json::{Map, Value};

/// A count that only grows, reported as the increase since it was last reported.
#[derive(Debug, Default)]
pub struct IncMetric {
    count: AtomicU64,
    reported: AtomicU64,
}

impl IncMetric {
    /// A counter at zero (usable in statics).
    pub const fn new() -> Self {
        Self {
            count: AtomicU64::new(0),
            reported: AtomicU64::new(0),
        }
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.count.fetch_add(n, Ordering::Relaxed);
    }

    /// The total so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The increase since the previous call (the first call: the total).
    pub fn take_delta(&self) -> u64 {
        let now = self.count();
        now.saturating_sub(self.reported.swap(now, Ordering::Relaxed))
    }
}

/// A value that is set, not counted (a latency, a start-up time); reported as it stands.
#[derive(Debug, Default)]
pub struct StoreMetric(AtomicU64);

impl StoreMetric {
    /// A value of zero (usable in statics).
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Sets the value.
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Adds each of `report`'s counts to the same name in `total` (a group summed over devices,
/// such as `block` over every `block_<id>`).
pub fn add_counts(total: &mut Map<String, Value>, report: &Map<String, Value>) {
    for (k, v) in report {
        let sum = total.get(k).and_then(Value::as_u64).unwrap_or(0) + v.as_u64().unwrap_or(0);
        total.insert(k.clone(), sum.into());
    }
}

/// Generates a metrics struct of [`IncMetric`]s and its report.
#[macro_export]
macro_rules! metrics_group {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: IncMetric,)*
        }

        impl $name {
            /// Every counter at zero (usable in statics).
            pub const fn new() -> Self {
                Self { $($field: IncMetric::new(),)* }
            }

            /// Each counter's increase since the previous report, by Firecracker's names.
            pub fn report(&self) -> $crate::metrics::Map<String, $crate::metrics::Value> {
                let mut m = $crate::metrics::Map::new();
                $(m.insert(stringify!($field).to_string(), self.$field.take_delta().into());)*
                m
            }
        }
    };
}

metrics_group!(
    /// A drive's counters (Firecracker's `block` group).
    BlockMetrics {
        /// Activations that failed.
        activate_fails,
        /// Backing-file swaps and rate-limit updates (PATCH /drives).
        update_count,
        /// Updates that failed.
        update_fails,
        /// Queue notifications from the guest.
        queue_event_count,
        /// Times the rate limiter's timer woke the device.
        rate_limiter_event_count,
        /// Requests that could not run (bad chain, I/O error).
        execute_fails,
        /// Requests refused as malformed.
        invalid_reqs_count,
        /// FLUSH requests.
        flush_count,
        /// Bytes read for the guest.
        read_bytes,
        /// Bytes written for the guest.
        write_bytes,
        /// Read requests.
        read_count,
        /// Write requests.
        write_count,
        /// Times a request waited for the rate limiter.
        rate_limiter_throttled_events,
    }
);

metrics_group!(
    /// The vsock device's counters (Firecracker's `vsock` group).
    VsockMetrics {
        /// Activations that failed.
        activate_fails,
        /// rx queue notifications from the guest.
        rx_queue_event_count,
        /// tx queue notifications from the guest.
        tx_queue_event_count,
        /// Packets given to the guest.
        rx_packets_count,
        /// Payload bytes given to the guest.
        rx_bytes_count,
        /// Packets taken from the guest.
        tx_packets_count,
        /// Payload bytes taken from the guest.
        tx_bytes_count,
        /// tx chains refused as malformed.
        tx_write_fails,
    }
);

metrics_group!(
    /// The balloon's counters (Firecracker's `balloon` group; Kiln has no free page hinting, so
    /// no `free_page_hint_*`).
    BalloonMetrics {
        /// Activations that failed.
        activate_fails,
        /// Inflate queue passes.
        inflate_count,
        /// Statistics buffers received.
        stats_updates_count,
        /// Statistics buffers with something the device could not take (an unknown tag).
        stats_update_fails,
        /// Deflate queue passes.
        deflate_count,
        /// Queue passes that ended with the device needing a reset.
        event_fails,
        /// Free page reporting queue passes.
        free_page_report_count,
        /// Bytes the guest reported free.
        free_page_report_freed,
        /// Reports whose memory could not be given back.
        free_page_report_fails,
    }
);

metrics_group!(
    /// A network interface's counters (Firecracker's `net` group, the names Kiln has the thing
    /// measured for).
    NetMetrics {
        /// Activations that failed.
        activate_fails,
        /// Queue passes that ended with the device needing a reset (the driver broke a queue).
        event_fails,
        /// rx queue notifications from the guest.
        rx_queue_event_count,
        /// Times the TAP had frames to read.
        rx_tap_event_count,
        /// Times the receive rate limiter's timer woke the device.
        rx_event_rate_limiter_count,
        /// Times a frame waited in the TAP for the receive rate limiter.
        rx_rate_limiter_throttled,
        /// Times the guest had no (or too little) receive buffer room.
        no_rx_avail_buffer,
        /// Frames given to the guest.
        rx_packets_count,
        /// Their bytes (Ethernet frames, offload headers excluded).
        rx_bytes_count,
        /// Frames that could not be given to the guest (too big for its buffers, a TAP error).
        rx_fails,
        /// Reads from the TAP that failed.
        tap_read_fails,
        /// tx queue notifications from the guest.
        tx_queue_event_count,
        /// Times the transmit rate limiter's timer woke the device.
        tx_rate_limiter_event_count,
        /// Times a frame waited in the queue for the transmit rate limiter.
        tx_rate_limiter_throttled,
        /// Frames taken from the guest and written to the TAP.
        tx_packets_count,
        /// Their bytes.
        tx_bytes_count,
        /// Frames from the guest that were dropped (malformed, or refused by the TAP).
        tx_fails,
        /// Transmit chains refused as malformed.
        tx_malformed_frames,
        /// Writes to the TAP that failed.
        tap_write_fails,
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summed_group_adds_each_devices_counts_by_name() {
        let (a, b) = (NetMetrics::new(), NetMetrics::new());
        a.tx_packets_count.add(2);
        b.tx_packets_count.add(3);
        b.rx_fails.inc();
        let mut total = Map::new();
        add_counts(&mut total, &a.report());
        add_counts(&mut total, &b.report());
        assert_eq!(total["tx_packets_count"], 5);
        assert_eq!(total["rx_fails"], 1);
        assert_eq!(total["tx_bytes_count"], 0);
    }

    #[test]
    fn counters_report_their_increase_since_the_last_report() {
        let m = BlockMetrics::default();
        m.read_bytes.add(4096);
        m.read_count.inc();
        let r = m.report();
        assert_eq!(r["read_bytes"], 4096);
        assert_eq!(r["read_count"], 1);
        assert_eq!(r["write_count"], 0);
        m.read_bytes.add(512);
        assert_eq!(m.report()["read_bytes"], 512);
        assert_eq!(m.report()["read_bytes"], 0);
        assert_eq!(m.read_bytes.count(), 4608);
    }
}
