//! What belongs to the kiln-vmm process rather than to the VM's devices: its id, log and metrics
//! files, the MMDS data store and its configuration, and when the process started (for the boot
//! timer and the start-up metrics). Made in `main` from the command line, changed by the API
//! before boot, and handed to the [`crate::Vmm`] once it is built.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_api::requests::logger::Logger as LoggerConfig;
use kiln_api::requests::metrics::Metrics as MetricsConfig;
use kiln_api::requests::mmds::{MmdsConfig, MmdsVersion as MmdsConfigVersion};
use kiln_mmds::Mmds;

use crate::metrics::MetricsSink;
use crate::persist::working_set::LoadedSnapshot;

/// The instance id when none is given (Firecracker's default).
pub const DEFAULT_INSTANCE_ID: &str = "anonymous-instance";

/// A point in time on the two clocks the boot timer reports: monotonic wall time and the
/// process's CPU time, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    /// `CLOCK_MONOTONIC`, microseconds.
    pub wall_us: u64,
    /// `CLOCK_PROCESS_CPUTIME_ID`, microseconds.
    pub cpu_us: u64,
}

fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which is valid for the call.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1000
}

impl Timestamp {
    /// Now, on both clocks.
    pub fn now() -> Self {
        Self {
            wall_us: clock_us(libc::CLOCK_MONOTONIC),
            cpu_us: clock_us(libc::CLOCK_PROCESS_CPUTIME_ID),
        }
    }
}

/// The process-level state.
pub struct Instance {
    /// The id the API reports and log lines carry (`--id`).
    pub id: String,
    /// When the process started, or when the caller says it did (`--start-time-us`,
    /// `--start-time-cpu-us`, as Firecracker's jailer passes them).
    pub started: Timestamp,
    /// When the process itself began (for logs).
    pub process_start: Instant,
    /// `--boot-timer`: the guest's write of 123 to the boot-timer device ends the boot
    /// measurement.
    pub boot_timer: bool,
    /// The logger configuration, once set.
    pub logger: Option<LoggerConfig>,
    /// The metrics file, once configured.
    pub metrics: MetricsSink,
    /// The metrics configuration, for `GET /vm/config`.
    pub metrics_config: Option<MetricsConfig>,
    /// The metadata store, shared with the network devices that serve it.
    pub mmds: Arc<Mutex<Mmds>>,
    /// The MMDS configuration, once set.
    pub mmds_config: Option<MmdsConfig>,
    /// The snapshot this VM was loaded from, when its memory maps a snapshot's memory file (what
    /// `PUT /snapshot/working-set` records against).
    pub loaded_snapshot: Option<LoadedSnapshot>,
}

impl Instance {
    /// A fresh instance named `id`, with an MMDS of at most `mmds_limit` bytes.
    pub fn new(id: impl Into<String>, started: Timestamp, mmds_limit: usize) -> Self {
        Self {
            id: id.into(),
            started,
            process_start: Instant::now(),
            boot_timer: false,
            logger: None,
            metrics: MetricsSink::default(),
            metrics_config: None,
            mmds: Arc::new(Mutex::new(Mmds::new(mmds_limit))),
            mmds_config: None,
            loaded_snapshot: None,
        }
    }

    /// Locks the metadata store.
    pub fn mmds(&self) -> std::sync::MutexGuard<'_, Mmds> {
        self.mmds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts `config` in force: the store's version (V2 makes a fresh token key, so tokens
    /// handed out before, also before a snapshot, are void) and IMDS answers. The interfaces it
    /// names are the caller's to check.
    pub fn configure_mmds(&mut self, config: MmdsConfig) -> Result<(), kiln_mmds::MmdsError> {
        let version = match config.version {
            MmdsConfigVersion::V1 => kiln_mmds::MmdsVersion::V1,
            MmdsConfigVersion::V2 => kiln_mmds::MmdsVersion::V2,
        };
        {
            let mut mmds = self.mmds();
            mmds.set_version(version)?;
            mmds.set_imds_compat(config.imds_compat);
        }
        self.mmds_config = Some(config);
        Ok(())
    }
}

impl Default for Instance {
    fn default() -> Self {
        Self::new(
            DEFAULT_INSTANCE_ID,
            Timestamp::now(),
            kiln_mmds::data_store::DEFAULT_LIMIT,
        )
    }
}
