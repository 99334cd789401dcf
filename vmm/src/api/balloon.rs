//! The balloon's requests: `PUT`, `PATCH`, `GET /balloon` and `GET`, `PATCH /balloon/statistics`.
//! Before boot they edit the configuration; after it they reach the device (a new target, a new
//! statistics interval, the latest numbers) and keep the configuration `GET /vm/config` shows in
//! step.

use kiln_api::requests::balloon::{Balloon, BalloonStats};
use kiln_api::{ApiRequest, ApiResponse};
use kiln_devices::virtio::balloon::{self as device, PAGES_PER_MIB};

use crate::Vmm;
use crate::config::{BalloonConfig, MachineConfig, validate_balloon};

const NONE: &str = "balloon: no balloon device is configured; PUT /balloon before boot";

/// Answers a balloon request before boot, against the configuration being built.
pub fn preboot(
    slot: &mut Option<BalloonConfig>,
    machine: &MachineConfig,
    request: ApiRequest,
) -> ApiResponse {
    match request {
        ApiRequest::PutBalloon(b) => set(slot, machine, b),
        ApiRequest::PatchBalloon(u) => match *slot {
            Some(b) => set(
                slot,
                machine,
                Balloon {
                    amount_mib: u.amount_mib,
                    ..b
                },
            ),
            None => ApiResponse::fault(NONE),
        },
        ApiRequest::GetBalloon => match slot {
            Some(b) => ApiResponse::json(b),
            None => ApiResponse::fault(NONE),
        },
        ApiRequest::PatchBalloonStats(u) => match slot {
            Some(b) => {
                b.stats_polling_interval_s = u.stats_polling_interval_s;
                ApiResponse::NoContent
            }
            None => ApiResponse::fault(NONE),
        },
        ApiRequest::GetBalloonStats => {
            ApiResponse::fault("balloon/statistics: the instance has not started")
        }
        other => ApiResponse::fault(format!("not a balloon request: {other:?}")),
    }
}

fn set(slot: &mut Option<BalloonConfig>, machine: &MachineConfig, b: Balloon) -> ApiResponse {
    match validate_balloon(&b, machine) {
        Ok(()) => {
            *slot = Some(b);
            ApiResponse::NoContent
        }
        Err(e) => ApiResponse::fault(e),
    }
}

/// Answers a balloon request for the running (or paused) VM.
pub fn running(vmm: &mut Vmm, request: ApiRequest) -> ApiResponse {
    if let ApiRequest::PutBalloon(_) = request {
        return ApiResponse::fault(
            "balloon cannot be changed after the instance started; PATCH /balloon changes its target",
        );
    }
    let Some(dev) = vmm.devices.balloon().cloned() else {
        return ApiResponse::fault(NONE);
    };
    let mut dev = dev.lock().unwrap_or_else(|p| p.into_inner());
    let answer = match request {
        ApiRequest::GetBalloon => return ApiResponse::json(&api_config(&dev.config())),
        ApiRequest::PatchBalloon(u) => dev.set_target(u.amount_mib),
        ApiRequest::PatchBalloonStats(u) => dev.set_stats_interval(u.stats_polling_interval_s),
        ApiRequest::GetBalloonStats => {
            return match dev.stats() {
                Some(guest) => ApiResponse::json(&stats(&dev, guest)),
                None => ApiResponse::fault(
                    "balloon/statistics: statistics are off (stats_polling_interval_s was 0 when the balloon was configured)",
                ),
            };
        }
        other => return ApiResponse::fault(format!("not a balloon request: {other:?}")),
    };
    match answer {
        Ok(()) => {
            vmm.config.balloon = Some(api_config(&dev.config()));
            ApiResponse::NoContent
        }
        Err(e) => ApiResponse::fault(e),
    }
}

/// The API's view of the device's configuration.
fn api_config(c: &device::BalloonConfig) -> Balloon {
    Balloon {
        amount_mib: c.amount_mib,
        deflate_on_oom: c.deflate_on_oom,
        stats_polling_interval_s: c.stats_polling_interval_s,
        free_page_hinting: false,
        free_page_reporting: c.free_page_reporting,
    }
}

/// `GET /balloon/statistics`.
fn stats(dev: &device::Balloon, g: &device::GuestStats) -> BalloonStats {
    BalloonStats {
        target_pages: dev.target_pages(),
        actual_pages: dev.actual_pages(),
        target_mib: dev.target_pages() / PAGES_PER_MIB,
        actual_mib: dev.actual_pages() / PAGES_PER_MIB,
        swap_in: g.swap_in,
        swap_out: g.swap_out,
        major_faults: g.major_faults,
        minor_faults: g.minor_faults,
        free_memory: g.free_memory,
        total_memory: g.total_memory,
        available_memory: g.available_memory,
        disk_caches: g.disk_caches,
        hugetlb_allocations: g.hugetlb_allocations,
        hugetlb_failures: g.hugetlb_failures,
        oom_kill: g.oom_kill,
        alloc_stall: g.alloc_stall,
        async_scan: g.async_scan,
        direct_scan: g.direct_scan,
        async_reclaim: g.async_reclaim,
        direct_reclaim: g.direct_reclaim,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api::requests::balloon::{BalloonStatsUpdate, BalloonUpdate};

    fn body(r: ApiResponse) -> String {
        match r {
            ApiResponse::Json(b) => b,
            ApiResponse::Fault(f) => format!("fault: {f}"),
            ApiResponse::FaultWith {
                status, message, ..
            } => format!("fault {status}: {message}"),
            ApiResponse::NoContent => "204".into(),
        }
    }

    #[test]
    fn before_boot_the_configuration_is_edited_and_checked() {
        let machine = crate::config::default_machine();
        let mut slot = None;
        let get = |slot: &mut Option<BalloonConfig>| {
            body(preboot(slot, &machine, ApiRequest::GetBalloon))
        };
        assert_eq!(get(&mut slot), format!("fault: {NONE}"));
        let patch = ApiRequest::PatchBalloon(BalloonUpdate { amount_mib: 1 });
        assert_eq!(
            body(preboot(&mut slot, &machine, patch.clone())),
            format!("fault: {NONE}")
        );
        let b = Balloon {
            amount_mib: 16,
            deflate_on_oom: true,
            stats_polling_interval_s: 0,
            free_page_hinting: false,
            free_page_reporting: true,
        };
        assert_eq!(
            body(preboot(&mut slot, &machine, ApiRequest::PutBalloon(b))),
            "204"
        );
        assert_eq!(body(preboot(&mut slot, &machine, patch)), "204");
        let stats = ApiRequest::PatchBalloonStats(BalloonStatsUpdate {
            stats_polling_interval_s: 4,
        });
        assert_eq!(body(preboot(&mut slot, &machine, stats)), "204");
        let got: Balloon = serde_json::from_str(&get(&mut slot)).unwrap();
        assert_eq!(
            (
                got.amount_mib,
                got.stats_polling_interval_s,
                got.free_page_reporting
            ),
            (1, 4, true)
        );
        let too_big = ApiRequest::PatchBalloon(BalloonUpdate { amount_mib: 129 });
        assert_eq!(
            body(preboot(&mut slot, &machine, too_big)),
            "fault: balloon: amount_mib 129 is larger than machine-config.mem_size_mib 128"
        );
        assert_eq!(
            slot.unwrap().amount_mib,
            1,
            "a refused change changes nothing"
        );
        assert_eq!(
            body(preboot(&mut slot, &machine, ApiRequest::GetBalloonStats)),
            "fault: balloon/statistics: the instance has not started"
        );
    }
}
