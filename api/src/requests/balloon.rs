//! `PUT`, `PATCH` and `GET /balloon`, `GET` and `PATCH /balloon/statistics`: the memory balloon,
//! with Firecracker's bodies and field names.

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// Firecracker's `Balloon` body: `PUT /balloon`, the config file's `balloon` object, and the
/// answer to `GET /balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
    /// Whether the guest deflates the balloon when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates; 0 (the default) turns statistics off.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Firecracker's free page hinting; Kiln offers free page reporting instead and refuses
    /// `true`.
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Whether the guest reports the memory it frees, which the host then takes back.
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl Balloon {
    /// Refuses what Kiln does not offer.
    pub fn check(&self) -> Result<(), ApiError> {
        if self.free_page_hinting {
            return Err(ApiError::bad_body(
                "balloon",
                "free_page_hinting is not supported; use free_page_reporting",
            ));
        }
        Ok(())
    }
}

/// Firecracker's `BalloonUpdate`: `PATCH /balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// New target balloon size in MiB.
    pub amount_mib: u32,
}

/// Firecracker's `BalloonStatsUpdate`: `PATCH /balloon/statistics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// New seconds between statistics updates (statistics cannot be turned on or off after boot).
    pub stats_polling_interval_s: u16,
}

/// Firecracker's `BalloonStats`: the answer to `GET /balloon/statistics`. The guest's numbers
/// are left out until the guest has sent them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStats {
    /// Target number of 4 KiB pages.
    pub target_pages: u32,
    /// Pages the balloon holds, as the guest reported.
    pub actual_pages: u32,
    /// Target in MiB.
    pub target_mib: u32,
    /// Held, in MiB.
    pub actual_mib: u32,
    /// Bytes swapped in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    /// Major page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Minor page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Free memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    /// Total memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    /// Available memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    /// Disk caches, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    /// Hugetlb allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// Hugetlb allocation failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    /// OOM killer invocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kill: Option<u64>,
    /// Allocation stalls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_stall: Option<u64>,
    /// Pages scanned by kswapd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_scan: Option<u64>,
    /// Pages scanned directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_scan: Option<u64>,
    /// Pages reclaimed by kswapd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_reclaim: Option<u64>,
    /// Pages reclaimed directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_reclaim: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiRequest;
    use crate::requests::{parse_request, tests::fault};

    #[test]
    fn put_takes_firecrackers_body() {
        let body = br#"{"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1,
                        "free_page_reporting": true}"#;
        let want = Balloon {
            amount_mib: 64,
            deflate_on_oom: true,
            stats_polling_interval_s: 1,
            free_page_hinting: false,
            free_page_reporting: true,
        };
        assert_eq!(
            parse_request("PUT", "/balloon", body).unwrap(),
            ApiRequest::PutBalloon(want)
        );
        let minimal = br#"{"amount_mib": 0, "deflate_on_oom": false}"#;
        let ApiRequest::PutBalloon(b) = parse_request("PUT", "/balloon", minimal).unwrap() else {
            panic!("wrong variant")
        };
        assert_eq!(
            (b.stats_polling_interval_s, b.free_page_reporting),
            (0, false)
        );
    }

    #[test]
    fn put_errors_name_the_field() {
        let f = fault("PUT", "/balloon", r#"{"amount_mib": 1}"#);
        assert!(
            f.starts_with("balloon: missing field `deflate_on_oom`"),
            "{f}"
        );
        let f = fault(
            "PUT",
            "/balloon",
            r#"{"amount_mib": 1, "deflate_on_oom": true, "must_tell_host": true}"#,
        );
        assert!(
            f.starts_with("balloon: unknown field `must_tell_host`"),
            "{f}"
        );
        let f = fault(
            "PUT",
            "/balloon",
            r#"{"amount_mib": -1, "deflate_on_oom": true}"#,
        );
        assert!(f.starts_with("balloon: invalid value: integer `-1`"), "{f}");
        let f = fault(
            "PUT",
            "/balloon",
            r#"{"amount_mib": 1, "deflate_on_oom": true, "free_page_hinting": true}"#,
        );
        assert_eq!(
            f,
            "balloon: free_page_hinting is not supported; use free_page_reporting"
        );
        let f = fault(
            "PUT",
            "/balloon",
            r#"{"amount_mib": 1, "deflate_on_oom": true, "stats_polling_interval_s": 70000}"#,
        );
        assert!(
            f.starts_with("balloon: invalid value: integer `70000`"),
            "{f}"
        );
    }

    #[test]
    fn patches_and_gets() {
        assert_eq!(
            parse_request("PATCH", "/balloon", br#"{"amount_mib": 200}"#).unwrap(),
            ApiRequest::PatchBalloon(BalloonUpdate { amount_mib: 200 })
        );
        let f = fault(
            "PATCH",
            "/balloon",
            r#"{"amount_mib": 2, "deflate_on_oom": true}"#,
        );
        assert!(
            f.starts_with("balloon: unknown field `deflate_on_oom`"),
            "{f}"
        );
        assert_eq!(
            parse_request(
                "PATCH",
                "/balloon/statistics",
                br#"{"stats_polling_interval_s": 5}"#
            )
            .unwrap(),
            ApiRequest::PatchBalloonStats(BalloonStatsUpdate {
                stats_polling_interval_s: 5
            })
        );
        let f = fault("PATCH", "/balloon/statistics", "{}");
        assert!(
            f.starts_with("balloon/statistics: missing field `stats_polling_interval_s`"),
            "{f}"
        );
        assert_eq!(
            parse_request("GET", "/balloon", b"").unwrap(),
            ApiRequest::GetBalloon
        );
        assert_eq!(
            parse_request("GET", "/balloon/statistics", b"").unwrap(),
            ApiRequest::GetBalloonStats
        );
        assert_eq!(
            fault("PUT", "/balloon/statistics", "{}"),
            "/balloon/statistics does not accept PUT"
        );
    }

    #[test]
    fn stats_leave_out_what_the_guest_never_sent() {
        let stats = BalloonStats {
            target_pages: 512,
            target_mib: 2,
            free_memory: Some(1 << 20),
            ..BalloonStats::default()
        };
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"target_pages": 512, "actual_pages": 0, "target_mib": 2,
                               "actual_mib": 0, "free_memory": 1048576})
        );
    }
}
