//! A configured drive as the block device takes it.

use kiln_api::requests::drives::IoEngine as ApiEngine;
use kiln_devices::virtio::block::{BlockConfig, IoEngine};

use super::DriveConfig;
use super::rate_limiter::rate_limiter;

/// The device's I/O engine for a drive's `io_engine` (Sync when unset, as in Firecracker).
pub fn io_engine(engine: Option<ApiEngine>) -> IoEngine {
    match engine.unwrap_or_default() {
        ApiEngine::Sync => IoEngine::Sync,
        ApiEngine::Async => IoEngine::Async,
    }
}

/// The block device's configuration for drive `d`.
pub fn device_config(d: &DriveConfig) -> BlockConfig {
    BlockConfig {
        id: d.drive_id.clone(),
        path: d.path_on_host.clone(),
        cow_overlay: d.cow_overlay_path.clone(),
        read_only: d.is_read_only,
        rate_limiter: rate_limiter(d.rate_limiter.as_ref()),
        io_engine: io_engine(d.io_engine),
    }
}
