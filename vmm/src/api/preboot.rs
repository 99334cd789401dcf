//! Before `InstanceStart`: API requests build up the configuration. Values are checked as they
//! arrive where they can be on their own (the kernel exists and is a kernel, vCPUs and memory are
//! in range, a drive's file exists); the whole is validated and built at `InstanceStart`, and a
//! failure there leaves the VMM waiting for a corrected configuration.

use kiln_api::ApiRequest;
use kiln_api::ApiResponse;
use kiln_api::requests::actions::Action;
use kiln_api::requests::instance::{InstanceInfo, InstanceState};
use kiln_api::requests::snapshot::SnapshotLoad;

use super::{ApiLink, INSTANCE_ID, convert};
use crate::Vmm;
use crate::builder::{build_in, prepare_vm};
use crate::config::{
    BalloonConfig, BootSourceConfig, DriveConfig, MachineConfig, SerialConfig, VmConfig,
    VsockConfig, default_machine, validate_machine,
};
use crate::loader::inspect_kernel;
use crate::persist::restore::restore;
use crate::vstate::vm::Vm;

/// What a request asks of [`configure`] beyond an answer.
enum Next {
    /// Boot the configured VM.
    Start,
    /// Build the VM from a snapshot.
    Load(SnapshotLoad),
}

/// The configuration so far.
struct PreBoot {
    boot: Option<BootSourceConfig>,
    machine: MachineConfig,
    drives: Vec<DriveConfig>,
    vsock: Option<VsockConfig>,
    balloon: Option<BalloonConfig>,
}

impl PreBoot {
    fn config(&self, serial: &SerialConfig) -> Result<VmConfig, String> {
        let boot = self
            .boot
            .clone()
            .ok_or("boot-source is not set; PUT /boot-source first")?;
        Ok(VmConfig {
            boot_source: boot,
            machine: self.machine.clone(),
            serial: serial.clone(),
            drives: self.drives.clone(),
            vsock: self.vsock.clone(),
            balloon: self.balloon,
        })
    }

    /// True once anything that only a boot uses was configured (a snapshot load is refused then,
    /// as Firecracker does).
    fn configured(&self) -> bool {
        self.boot.is_some()
            || !self.drives.is_empty()
            || self.vsock.is_some()
            || self.balloon.is_some()
            || self.machine != default_machine()
    }

    /// Answers a request, or says what [`configure`] must carry out.
    fn handle(&mut self, request: ApiRequest) -> Result<ApiResponse, Next> {
        use ApiRequest::*;
        Ok(match request {
            GetInstanceInfo => {
                ApiResponse::json(&InstanceInfo::new(INSTANCE_ID, InstanceState::NotStarted))
            }
            GetVmConfig => ApiResponse::json(&convert::full(
                self.boot.as_ref(),
                &self.machine,
                &self.drives,
                self.vsock.as_ref(),
                self.balloon.as_ref(),
            )),
            PutBootSource(b) => match inspect_kernel(&b.kernel_image_path) {
                Ok(_) => {
                    self.boot = Some(b);
                    ApiResponse::NoContent
                }
                Err(e) => ApiResponse::fault(format!("boot-source: {e}")),
            },
            GetMachineConfig => ApiResponse::json(&self.machine),
            PutMachineConfig(m) => self.set_machine(m),
            PatchMachineConfig(update) => {
                let patched = update.apply(&self.machine);
                self.set_machine(patched)
            }
            PutDrive(d) => {
                if let Err(e) = std::fs::metadata(&d.path_on_host) {
                    return Ok(ApiResponse::fault(format!(
                        "drives/{}: path_on_host {}: {e}",
                        d.drive_id,
                        d.path_on_host.display()
                    )));
                }
                match self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
                    Some(slot) => *slot = d,
                    None => self.drives.push(d),
                }
                ApiResponse::NoContent
            }
            PatchDrive(u) => match (
                self.drives.iter_mut().find(|o| o.drive_id == u.drive_id),
                u.path_on_host,
            ) {
                (None, _) => ApiResponse::fault(format!(
                    "drives/{}: no such drive; PUT it first",
                    u.drive_id
                )),
                (Some(slot), Some(path)) => {
                    slot.path_on_host = path;
                    ApiResponse::NoContent
                }
                (Some(_), None) => ApiResponse::NoContent,
            },
            PutVsock(v) => {
                self.vsock = Some(v);
                ApiResponse::NoContent
            }
            PutAction(Action::InstanceStart) => return Err(Next::Start),
            PutAction(Action::SendCtrlAltDel) => {
                ApiResponse::fault("SendCtrlAltDel: the instance has not started")
            }
            PatchVm(_) => ApiResponse::fault("vm state: the instance has not started"),
            CreateSnapshot(_) => {
                ApiResponse::fault("snapshot/create: the instance has not started")
            }
            LoadSnapshot(_) if self.configured() => ApiResponse::fault(
                "snapshot/load: not allowed after boot-source, machine-config, drives, vsock or balloon were configured",
            ),
            request @ (GetBalloon | PutBalloon(_) | PatchBalloon(_) | GetBalloonStats
            | PatchBalloonStats(_)) => {
                super::balloon::preboot(&mut self.balloon, &self.machine, request)
            }
            LoadSnapshot(params) => return Err(Next::Load(params)),
        })
    }

    /// Validates and builds the VM configured so far, in `prepared` if there is one (taken only
    /// once the configuration is valid).
    fn start(
        &self,
        serial: &SerialConfig,
        prepared: &mut Option<Vm>,
    ) -> Result<(Vmm, VmConfig), String> {
        let config = self.config(serial)?;
        config.validate().map_err(|e| e.to_string())?;
        let vmm = build_in(&config, prepared.take()).map_err(|e| e.to_string())?;
        Ok((vmm, config))
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
pub fn configure(link: &ApiLink, serial: SerialConfig) -> Option<Vmm> {
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
        balloon: None,
    };
    log::debug!("ready for the configuration");
    loop {
        let pending = link.requests.recv().ok()?;
        let _ = link.wakeup.read();
        log::debug!("API request: {:?}", pending.request);
        let mut started = None;
        pending.respond(|request| match state.handle(request) {
            Ok(answer) => answer,
            Err(Next::Start) => match state.start(&serial, &mut prepared) {
                Ok((vmm, _)) => {
                    started = Some(vmm);
                    ApiResponse::NoContent
                }
                Err(e) => ApiResponse::fault(format!("InstanceStart: {e}")),
            },
            Err(Next::Load(params)) => match restore(&params, &serial, &mut prepared) {
                Ok(mut vmm) => {
                    if params.resume_vm {
                        vmm.resume_on_start();
                    }
                    started = Some(vmm);
                    ApiResponse::NoContent
                }
                Err(e) => ApiResponse::fault(format!("snapshot/load: {e}")),
            },
        });
        if started.is_some() {
            return started;
        }
    }
}
