//! Before `InstanceStart`: API requests build up the configuration. Values are checked as they
//! arrive, as Firecracker checks them at PUT time (the kernel exists and is a kernel, vCPUs,
//! memory, SMT and huge pages fit together, a drive's file exists and no second root drive, a
//! vsock CID is not reserved and its socket path is free); the whole is validated and built at
//! `InstanceStart`, and a failure there leaves the VMM waiting for a corrected configuration.

use std::time::Instant;

use kiln_api::ApiRequest;
use kiln_api::ApiResponse;
use kiln_api::requests::actions::Action;
use kiln_api::requests::instance::{InstanceInfo, InstanceState};
use kiln_api::requests::snapshot::SnapshotLoad;

use super::{ApiLink, common, convert};
use crate::Vmm;
use crate::builder::{build_in, prepare_vm};
use crate::config::{
    BalloonConfig, BootSourceConfig, DriveConfig, MachineConfig, NetworkInterfaceConfig,
    SerialConfig, VmConfig, VsockConfig, default_machine, validate_drive, validate_machine,
    validate_vsock,
};
use crate::instance::Instance;
use crate::loader::inspect_kernel;
use crate::metrics::{self, LATENCIES};
use crate::persist::restore::restore;
use crate::vstate::vm::Vm;

/// What a request asks of [`configure`] beyond an answer.
enum Next {
    /// Boot the configured VM.
    Start,
    /// Build the VM from a snapshot (boxed: the load body is large next to `Start`).
    Load(Box<SnapshotLoad>),
}

/// The configuration so far.
struct PreBoot {
    boot: Option<BootSourceConfig>,
    machine: MachineConfig,
    drives: Vec<DriveConfig>,
    vsock: Option<VsockConfig>,
    nets: Vec<NetworkInterfaceConfig>,
    balloon: Option<BalloonConfig>,
    serial: SerialConfig,
}

impl PreBoot {
    fn config(&self) -> Result<VmConfig, String> {
        let boot = self
            .boot
            .clone()
            .ok_or("boot-source is not set; PUT /boot-source first")?;
        Ok(VmConfig {
            boot_source: boot,
            machine: self.machine.clone(),
            serial: self.serial.clone(),
            drives: self.drives.clone(),
            vsock: self.vsock.clone(),
            network_interfaces: self.nets.clone(),
            balloon: self.balloon,
            ..VmConfig::default()
        })
    }

    /// True once anything that only a boot uses was configured (a snapshot load is refused then,
    /// as Firecracker does; the logger, metrics and MMDS data are allowed).
    fn configured(&self) -> bool {
        self.boot.is_some()
            || !self.drives.is_empty()
            || self.vsock.is_some()
            || !self.nets.is_empty()
            || self.balloon.is_some()
            || self.machine != default_machine()
    }

    /// Answers a request, or says what [`configure`] must carry out.
    fn handle(
        &mut self,
        instance: &mut Instance,
        request: ApiRequest,
    ) -> Result<ApiResponse, Next> {
        use ApiRequest::*;
        Ok(match request {
            GetInstanceInfo => {
                ApiResponse::json(&InstanceInfo::new(&instance.id, InstanceState::NotStarted))
            }
            GetVersion => common::version(),
            GetVmConfig => ApiResponse::json(&convert::full(
                instance,
                self.boot.as_ref(),
                &self.machine,
                &self.drives,
                self.vsock.as_ref(),
                &self.nets,
                self.balloon.as_ref(),
            )),
            PutBootSource(b) => {
                if let Err(e) = inspect_kernel(&b.kernel_image_path) {
                    return Ok(ApiResponse::fault(format!("boot-source: {e}")));
                }
                if let Some(initrd) = &b.initrd_path
                    && let Err(e) = std::fs::metadata(initrd)
                {
                    return Ok(ApiResponse::fault(format!(
                        "boot-source: initrd_path {}: {e}",
                        initrd.display()
                    )));
                }
                self.boot = Some(b);
                ApiResponse::NoContent
            }
            GetMachineConfig => ApiResponse::json(&self.machine),
            PutMachineConfig(m) => self.set_machine(m),
            PatchMachineConfig(update) => {
                let patched = update.apply(&self.machine);
                self.set_machine(patched)
            }
            PutDrive(d) => self.put_drive(d),
            PatchDrive(u) => ApiResponse::fault(format!(
                "drives/{}: PATCH changes a drive of a running VM; before InstanceStart, PUT the drive again",
                u.drive_id
            )),
            PutVsock(v) => match validate_vsock(&v) {
                Ok(()) => {
                    self.vsock = Some(v);
                    ApiResponse::NoContent
                }
                Err(e) => ApiResponse::fault(e),
            },
            PutLogger(config) => match crate::logger::configure(&config) {
                Ok(()) => {
                    instance.logger = Some(config);
                    ApiResponse::NoContent
                }
                Err(e) => ApiResponse::fault(e),
            },
            PutMetrics(config) => match instance.metrics.configure(&config.metrics_path) {
                Ok(()) => {
                    instance.metrics_config = Some(config);
                    ApiResponse::NoContent
                }
                Err(e) => ApiResponse::fault(e),
            },
            PutSerial(s) => {
                let serial = SerialConfig {
                    serial_out_path: s.serial_out_path,
                    rate_limiter: s.rate_limiter,
                };
                match crate::config::validate_serial(&serial) {
                    Ok(()) => {
                        self.serial = serial;
                        ApiResponse::NoContent
                    }
                    Err(e) => ApiResponse::fault(e),
                }
            }
            PutNetworkInterface(n) => self.put_net(n),
            PatchNetworkInterface(u) => ApiResponse::fault(format!(
                "network-interfaces/{}: PATCH changes a running VM's rate limiters; before boot, PUT the interface again",
                u.iface_id
            )),
            GetMmds => common::get_mmds(instance),
            PutMmds(data) => common::put_mmds(instance, data),
            PatchMmds(patch) => common::patch_mmds(instance, &patch),
            // The interfaces named must be configured first; each then answers the MMDS address.
            PutMmdsConfig(config) => {
                let ifaces: Vec<&str> = self.nets.iter().map(|n| n.iface_id.as_str()).collect();
                common::put_mmds_config(instance, config, &ifaces)
            }
            PutAction(Action::InstanceStart) => return Err(Next::Start),
            PutAction(Action::SendCtrlAltDel) => {
                ApiResponse::fault("SendCtrlAltDel: the instance has not started")
            }
            PutAction(Action::FlushMetrics) => {
                common::flush_metrics(instance, kiln_devices::metrics::Map::new())
            }
            PatchVm(_) => ApiResponse::fault("vm state: the instance has not started"),
            CreateSnapshot(_) => {
                ApiResponse::fault("snapshot/create: the instance has not started")
            }
            SaveWorkingSet(_) => ApiResponse::fault(
                "snapshot/working-set: no snapshot was loaded; a working set is what a VM loaded \
                 from a snapshot has touched since the load",
            ),
            LoadSnapshot(_) if self.configured() => ApiResponse::fault(
                "snapshot/load: not allowed after boot-source, machine-config, drives, vsock, network-interfaces or balloon were configured",
            ),
            request @ (GetBalloon | PutBalloon(_) | PatchBalloon(_) | GetBalloonStats
            | PatchBalloonStats(_)) => {
                super::balloon::preboot(&mut self.balloon, &self.machine, request)
            }
            LoadSnapshot(params) => return Err(Next::Load(Box::new(params))),
        })
    }

    fn put_drive(&mut self, d: DriveConfig) -> ApiResponse {
        if let Err(e) = validate_drive(&d) {
            return ApiResponse::fault(format!("drives/{}: {e}", d.drive_id));
        }
        if d.is_root_device
            && let Some(root) = self
                .drives
                .iter()
                .find(|o| o.is_root_device && o.drive_id != d.drive_id)
        {
            return ApiResponse::fault(format!(
                "drives/{}: a root block device already exists ({}); only one drive may be the root",
                d.drive_id, root.drive_id
            ));
        }
        match self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
            Some(slot) => *slot = d,
            None => self.drives.push(d),
        }
        ApiResponse::NoContent
    }

    /// Validates and builds the VM configured so far, in `prepared` if there is one (taken only
    /// once the configuration is valid).
    fn start(&self, instance: &Instance, prepared: &mut Option<Vm>) -> Result<Vmm, String> {
        let config = self.config()?;
        config.validate().map_err(|e| e.to_string())?;
        build_in(&config, prepared.take(), instance).map_err(|e| e.to_string())
    }

    /// Adds or replaces an interface, checked on its own and against the others (the TAP itself
    /// is attached at `InstanceStart`).
    fn put_net(&mut self, n: NetworkInterfaceConfig) -> ApiResponse {
        let id = n.iface_id.clone();
        if let Err(e) = crate::config::net::check_interface(&n) {
            return ApiResponse::fault(format!("network-interfaces/{id}: {e}"));
        }
        let others = self.nets.iter().filter(|o| o.iface_id != id);
        if let Some(o) = others.clone().find(|o| o.host_dev_name == n.host_dev_name) {
            return ApiResponse::fault(format!(
                "network-interfaces/{id}: host_dev_name {} is used by interface {}",
                n.host_dev_name, o.iface_id
            ));
        }
        if let Some(mac) = &n.guest_mac
            && let Some(o) = others.clone().find(|o| {
                o.guest_mac.as_deref().map(str::to_ascii_lowercase)
                    == Some(mac.to_ascii_lowercase())
            })
        {
            return ApiResponse::fault(format!(
                "network-interfaces/{id}: guest_mac {mac} is used by interface {}",
                o.iface_id
            ));
        }
        match self.nets.iter_mut().find(|o| o.iface_id == id) {
            Some(slot) => *slot = n,
            None => self.nets.push(n),
        }
        ApiResponse::NoContent
    }

    fn set_machine(&mut self, m: MachineConfig) -> ApiResponse {
        match validate_machine(&m) {
            Ok(()) => {
                self.machine = m;
                ApiResponse::NoContent
            }
            Err(e) => ApiResponse::fault(e),
        }
    }
}

/// Serves API requests until an `InstanceStart` builds a VM or a `snapshot/load` restores one;
/// returns it. `None` if the API thread went away before that.
///
/// The KVM VM itself (with its irqchip and PIT) is made first, while the client is still writing
/// its first request: it does not depend on the configuration, and a restore into a VMM that was
/// started ahead then only maps memory and puts state back. If making it fails here, the build
/// tries again and reports the error on the request that needed it.
pub fn configure(link: &ApiLink, serial: SerialConfig, instance: &mut Instance) -> Option<Vmm> {
    let mut prepared = match prepare_vm() {
        Ok(vm) => Some(vm),
        Err(e) => {
            log::warn!("cannot make the KVM VM ahead: {e}");
            None
        }
    };
    let mut state = PreBoot {
        boot: None,
        machine: default_machine(),
        drives: Vec::new(),
        vsock: None,
        nets: Vec::new(),
        balloon: None,
        serial,
    };
    log::debug!("ready for the configuration");
    loop {
        let pending = link.requests.recv().ok()?;
        let _ = link.wakeup.read();
        log::debug!("API request: {:?}", pending.request);
        let mut started = None;
        pending.respond(|request| {
            let counted = request.clone();
            let answer = match state.handle(instance, request) {
                Ok(answer) => answer,
                Err(Next::Start) => {
                    let t0 = Instant::now();
                    match state.start(instance, &mut prepared) {
                        Ok(vmm) => {
                            LATENCIES.boot_vm.set(metrics::micros_since(t0));
                            started = Some(vmm);
                            ApiResponse::NoContent
                        }
                        Err(e) => ApiResponse::fault(format!("InstanceStart: {e}")),
                    }
                }
                Err(Next::Load(params)) => {
                    let t0 = Instant::now();
                    match restore(&params, &state.serial, &mut prepared, instance) {
                        Ok(mut vmm) => {
                            LATENCIES.load_snapshot.set(metrics::micros_since(t0));
                            if params.resume_vm {
                                vmm.resume_on_start();
                            }
                            started = Some(vmm);
                            ApiResponse::NoContent
                        }
                        Err(e) => ApiResponse::fault(format!("snapshot/load: {e}")),
                    }
                }
            };
            metrics::count_request(&counted, answer.status());
            answer
        });
        if started.is_some() {
            return started;
        }
    }
}
