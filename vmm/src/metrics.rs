//! kiln-vmm's metrics: one JSON object a line, written to the file or named pipe given by
//! `--metrics-path` or `PUT /metrics`, every [`FLUSH_PERIOD`], on `FlushMetrics` and when the VMM
//! exits. Groups and names are Firecracker's where Kiln measures the same thing: `api_server`,
//! `get_api_requests`, `put_api_requests`, `patch_api_requests`, `block` (all drives) and
//! `block_<id>` (each), `net` and `net_<id>` likewise, `vsock`, `balloon`, `vcpu`,
//! `latencies_us`, `logger`, `seccomp`, `signals`. Counters are what happened since the previous
//! line, as in Firecracker; latencies and start-up times are the latest value. The devices'
//! groups come from [`Vmm::metrics_line`].
//!
//! [`Vmm::metrics_line`]: crate::Vmm::metrics_line

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_api::ApiRequest;
use kiln_api::requests::actions::Action;
use kiln_devices::metrics::{IncMetric, Map, StoreMetric, Value};
use kiln_devices::metrics_group;

/// How often the metrics line is written once a file is configured (Firecracker's period).
pub const FLUSH_PERIOD: Duration = Duration::from_secs(60);

metrics_group!(
    /// vCPU exits (Firecracker's `vcpu` group).
    VcpuMetrics {
        /// Port reads.
        exit_io_in,
        /// Port writes.
        exit_io_out,
        /// MMIO reads.
        exit_mmio_read,
        /// MMIO writes.
        exit_mmio_write,
        /// Exits that stopped the VM (triple fault, KVM errors).
        failures,
    }
);

/// Every vCPU's exits, counted together.
pub static VCPU: VcpuMetrics = VcpuMetrics::new();

/// The latest duration of each operation, in microseconds (Firecracker's `latencies_us`).
pub struct Latencies {
    /// `PUT /snapshot/create` of a full snapshot.
    pub full_create_snapshot: StoreMetric,
    /// `PUT /snapshot/create` of a diff snapshot.
    pub diff_create_snapshot: StoreMetric,
    /// `PUT /snapshot/load`.
    pub load_snapshot: StoreMetric,
    /// `PATCH /vm` to Paused.
    pub pause_vm: StoreMetric,
    /// `PATCH /vm` to Resumed.
    pub resume_vm: StoreMetric,
    /// `InstanceStart`: validating and building the VM, to its answer (Kiln's addition).
    pub boot_vm: StoreMetric,
}

/// The latencies.
pub static LATENCIES: Latencies = Latencies {
    full_create_snapshot: StoreMetric::new(),
    diff_create_snapshot: StoreMetric::new(),
    load_snapshot: StoreMetric::new(),
    pause_vm: StoreMetric::new(),
    resume_vm: StoreMetric::new(),
    boot_vm: StoreMetric::new(),
};

/// Time from the process's start (or `--start-time-us`) to the API serving, as Firecracker's
/// `api_server.process_startup_time_us` and `_cpu_us`.
pub static STARTUP_US: StoreMetric = StoreMetric::new();
/// CPU time of the same.
pub static STARTUP_CPU_US: StoreMetric = StoreMetric::new();

metrics_group!(
    /// GET requests (Firecracker's `get_api_requests`).
    GetRequests {
        /// `GET /balloon` and `GET /balloon/statistics`.
        balloon_count,
        /// `GET /`.
        instance_info_count,
        /// `GET /machine-config` and `GET /vm/config`.
        machine_cfg_count,
        /// `GET /mmds`.
        mmds_count,
        /// `GET /version`.
        vmm_version_count,
    }
);

metrics_group!(
    /// PUT requests and their failures (Firecracker's `put_api_requests`).
    PutRequests {
        /// `PUT /actions`.
        actions_count,
        /// Failed.
        actions_fails,
        /// `PUT /balloon`.
        balloon_count,
        /// Failed.
        balloon_fails,
        /// `PUT /boot-source`.
        boot_source_count,
        /// Failed.
        boot_source_fails,
        /// `PUT /drives`.
        drive_count,
        /// Failed.
        drive_fails,
        /// `PUT /logger`.
        logger_count,
        /// Failed.
        logger_fails,
        /// `PUT /machine-config`.
        machine_cfg_count,
        /// Failed.
        machine_cfg_fails,
        /// `PUT /metrics`.
        metrics_count,
        /// Failed.
        metrics_fails,
        /// `PUT /mmds` and `PUT /mmds/config`.
        mmds_count,
        /// Failed.
        mmds_fails,
        /// `PUT /network-interfaces`.
        network_count,
        /// Failed.
        network_fails,
        /// `PUT /vsock`.
        vsock_count,
        /// Failed.
        vsock_fails,
        /// `PUT /serial`.
        serial_count,
        /// Failed.
        serial_fails,
        /// `PUT /snapshot/create` and `/snapshot/load`.
        snapshot_count,
        /// Failed.
        snapshot_fails,
    }
);

metrics_group!(
    /// PATCH requests and their failures (Firecracker's `patch_api_requests`).
    PatchRequests {
        /// `PATCH /balloon` and `PATCH /balloon/statistics`.
        balloon_count,
        /// Failed.
        balloon_fails,
        /// `PATCH /drives`.
        drive_count,
        /// Failed.
        drive_fails,
        /// `PATCH /machine-config`.
        machine_cfg_count,
        /// Failed.
        machine_cfg_fails,
        /// `PATCH /mmds`.
        mmds_count,
        /// Failed.
        mmds_fails,
        /// `PATCH /network-interfaces`.
        network_count,
        /// Failed.
        network_fails,
        /// `PATCH /vm`.
        vmm_count,
        /// Failed.
        vmm_fails,
    }
);

/// GET request counts.
pub static GET: GetRequests = GetRequests::new();
/// PUT request counts.
pub static PUT: PutRequests = PutRequests::new();
/// PATCH request counts.
pub static PATCH: PatchRequests = PatchRequests::new();

/// The counter a request adds to, and the one its failure adds to.
fn request_counters(request: &ApiRequest) -> (&'static IncMetric, Option<&'static IncMetric>) {
    use ApiRequest::*;
    match request {
        GetInstanceInfo => (&GET.instance_info_count, None),
        GetVmConfig | GetMachineConfig => (&GET.machine_cfg_count, None),
        GetMmds => (&GET.mmds_count, None),
        GetVersion => (&GET.vmm_version_count, None),
        GetBalloon | GetBalloonStats => (&GET.balloon_count, None),
        PutBalloon(_) => (&PUT.balloon_count, Some(&PUT.balloon_fails)),
        PatchBalloon(_) | PatchBalloonStats(_) => {
            (&PATCH.balloon_count, Some(&PATCH.balloon_fails))
        }
        PutAction(_) => (&PUT.actions_count, Some(&PUT.actions_fails)),
        PutBootSource(_) => (&PUT.boot_source_count, Some(&PUT.boot_source_fails)),
        PutDrive(_) => (&PUT.drive_count, Some(&PUT.drive_fails)),
        PutLogger(_) => (&PUT.logger_count, Some(&PUT.logger_fails)),
        PutMachineConfig(_) => (&PUT.machine_cfg_count, Some(&PUT.machine_cfg_fails)),
        PutMetrics(_) => (&PUT.metrics_count, Some(&PUT.metrics_fails)),
        PutMmds(_) | PutMmdsConfig(_) => (&PUT.mmds_count, Some(&PUT.mmds_fails)),
        PutNetworkInterface(_) => (&PUT.network_count, Some(&PUT.network_fails)),
        PutVsock(_) => (&PUT.vsock_count, Some(&PUT.vsock_fails)),
        PutSerial(_) => (&PUT.serial_count, Some(&PUT.serial_fails)),
        CreateSnapshot(_) | LoadSnapshot(_) | SaveWorkingSet(_) => {
            (&PUT.snapshot_count, Some(&PUT.snapshot_fails))
        }
        PatchDrive(_) => (&PATCH.drive_count, Some(&PATCH.drive_fails)),
        PatchMachineConfig(_) => (&PATCH.machine_cfg_count, Some(&PATCH.machine_cfg_fails)),
        PatchMmds(_) => (&PATCH.mmds_count, Some(&PATCH.mmds_fails)),
        PatchNetworkInterface(_) => (&PATCH.network_count, Some(&PATCH.network_fails)),
        PatchVm(_) => (&PATCH.vmm_count, Some(&PATCH.vmm_fails)),
    }
}

/// Counts `request` and, if its answer had status `status` of 400 or more, its failure.
pub fn count_request(request: &ApiRequest, status: u16) {
    let (count, fails) = request_counters(request);
    count.inc();
    if status >= 400
        && let Some(f) = fails
    {
        f.inc();
    }
}

/// True for `FlushMetrics`, whose answer depends on the metrics file itself.
pub fn is_flush(request: &ApiRequest) -> bool {
    matches!(request, ApiRequest::PutAction(Action::FlushMetrics))
}

/// Why the metrics file could not be set up or written.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Opening it failed.
    #[error("metrics: cannot open metrics_path {path}: {err}")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// It was configured before (Firecracker configures metrics once).
    #[error("metrics: already configured to write to {0}; metrics are configured once")]
    Again(PathBuf),
    /// Nothing to write to.
    #[error("metrics are not configured; PUT /metrics or start kiln-vmm with --metrics-path first")]
    NotConfigured,
    /// The line could not be written whole.
    #[error("metrics: cannot write to {path}: {err}")]
    Write {
        /// The path.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
}

/// Counts of lines the metrics file could not take.
pub static MISSED_METRICS_COUNT: IncMetric = IncMetric::new();
/// Lines whose write failed outright.
pub static METRICS_FAILS: IncMetric = IncMetric::new();

/// Where metrics lines go.
#[derive(Debug, Default)]
pub struct MetricsSink {
    file: Option<(File, PathBuf)>,
}

impl MetricsSink {
    /// Opens `path` (created if missing; a named pipe is opened without waiting for a reader).
    pub fn configure(&mut self, path: &Path) -> Result<(), MetricsError> {
        if let Some((_, old)) = &self.file {
            return Err(MetricsError::Again(old.clone()));
        }
        let file = crate::logger::open_nonblocking(path).map_err(|err| MetricsError::Open {
            path: path.to_path_buf(),
            err,
        })?;
        // Configured once and never closed: the fatal signals' handler may write its line here.
        crate::signals::set_metrics_fd(std::os::fd::AsRawFd::as_raw_fd(&file));
        self.file = Some((file, path.to_path_buf()));
        Ok(())
    }

    /// The file, once configured.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|(_, p)| p.as_path())
    }

    /// Writes one line (`groups` plus the timestamp and the VMM-wide groups).
    pub fn write(&self, mut groups: Map<String, Value>) -> Result<(), MetricsError> {
        let Some((file, path)) = &self.file else {
            return Err(MetricsError::NotConfigured);
        };
        add_vmm_groups(&mut groups);
        let mut line = Value::Object(groups).to_string();
        line.push('\n');
        let mut file = file;
        match file.write(line.as_bytes()) {
            Ok(n) if n == line.len() => Ok(()),
            Ok(_) => {
                MISSED_METRICS_COUNT.inc();
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                MISSED_METRICS_COUNT.inc();
                Ok(())
            }
            Err(err) => {
                METRICS_FAILS.inc();
                Err(MetricsError::Write {
                    path: path.clone(),
                    err,
                })
            }
        }
    }
}

fn add_vmm_groups(groups: &mut Map<String, Value>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    groups.insert("utc_timestamp_ms".into(), (now.as_millis() as u64).into());
    let mut api = Map::new();
    api.insert("process_startup_time_us".into(), STARTUP_US.get().into());
    api.insert(
        "process_startup_time_cpu_us".into(),
        STARTUP_CPU_US.get().into(),
    );
    groups.insert("api_server".into(), api.into());
    groups.insert("get_api_requests".into(), GET.report().into());
    groups.insert("put_api_requests".into(), PUT.report().into());
    groups.insert("patch_api_requests".into(), PATCH.report().into());
    groups.insert("vcpu".into(), VCPU.report().into());
    let l = &LATENCIES;
    let mut lat = Map::new();
    for (name, m) in [
        ("full_create_snapshot", &l.full_create_snapshot),
        ("diff_create_snapshot", &l.diff_create_snapshot),
        ("load_snapshot", &l.load_snapshot),
        ("pause_vm", &l.pause_vm),
        ("resume_vm", &l.resume_vm),
        ("boot_vm", &l.boot_vm),
    ] {
        lat.insert(name.into(), m.get().into());
    }
    groups.insert("latencies_us".into(), lat.into());
    let mut logger = Map::new();
    let swap = |a: &std::sync::atomic::AtomicU64| a.swap(0, Ordering::Relaxed);
    logger.insert(
        "missed_log_count".into(),
        swap(&crate::logger::MISSED_LOG_COUNT).into(),
    );
    logger.insert("log_fails".into(), swap(&crate::logger::LOG_FAILS).into());
    logger.insert(
        "missed_metrics_count".into(),
        MISSED_METRICS_COUNT.take_delta().into(),
    );
    logger.insert("metrics_fails".into(), METRICS_FAILS.take_delta().into());
    groups.insert("logger".into(), logger.into());
    // A process whose filter trapped a call has ended; its SIGSYS handler writes its own last
    // line, counting the fault (crate::signals::write_last_metrics_line).
    let mut seccomp = Map::new();
    seccomp.insert("num_faults".into(), 0.into());
    groups.insert("seccomp".into(), seccomp.into());
    groups.insert("signals".into(), crate::signals::SIGNALS.report().into());
}

/// Microseconds since `start`, for the latency metrics.
pub fn micros_since(start: std::time::Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_one_json_object_with_firecracker_groups() {
        let dir = std::env::temp_dir().join(format!("kiln-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.json");
        let _ = std::fs::remove_file(&path);
        let mut sink = MetricsSink::default();
        assert!(matches!(
            sink.write(Map::new()),
            Err(MetricsError::NotConfigured)
        ));
        sink.configure(&path).unwrap();
        assert!(matches!(sink.configure(&path), Err(MetricsError::Again(_))));
        VCPU.exit_io_out.add(3);
        count_request(&ApiRequest::GetVersion, 200);
        count_request(
            &ApiRequest::PutMetrics(kiln_api::requests::metrics::Metrics {
                metrics_path: path.clone(),
            }),
            400,
        );
        LATENCIES.pause_vm.set(1234);
        let mut groups = Map::new();
        groups.insert("block".into(), Map::new().into());
        sink.write(groups).unwrap();
        sink.write(Map::new()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        let first = &lines[0];
        assert!(first["utc_timestamp_ms"].as_u64().unwrap() > 1_700_000_000_000);
        assert!(first["vcpu"]["exit_io_out"].as_u64().unwrap() >= 3);
        assert!(
            first["get_api_requests"]["vmm_version_count"]
                .as_u64()
                .unwrap()
                >= 1
        );
        assert!(first["put_api_requests"]["metrics_fails"].as_u64().unwrap() >= 1);
        assert_eq!(first["latencies_us"]["pause_vm"], 1234);
        assert!(first["block"].is_object());
        assert_eq!(lines[1]["seccomp"]["num_faults"], 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
