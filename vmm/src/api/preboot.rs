//! Before `InstanceStart`: API requests build up the configuration. Values are checked as they
//! arrive where they can be on their own (the kernel exists and is a kernel, vCPUs and memory are
//! in range, a drive's file exists); the whole is validated and built at `InstanceStart`, and a
//! failure there leaves the VMM waiting for a corrected configuration.

use kiln_api::ApiRequest;
use kiln_api::ApiResponse;
use kiln_api::requests::actions::Action;
use kiln_api::requests::instance::{InstanceInfo, InstanceState};

use super::{ApiLink, INSTANCE_ID, convert};
use crate::Vmm;
use crate::config::{
    BootSourceConfig, DriveConfig, MachineConfig, SerialConfig, VmConfig, VsockConfig,
};
use crate::loader::inspect_kernel;

/// The configuration so far.
#[derive(Default)]
struct PreBoot {
    boot: Option<BootSourceConfig>,
    machine: MachineConfig,
    drives: Vec<DriveConfig>,
    vsock: Option<VsockConfig>,
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
        })
    }

    fn handle(&mut self, request: ApiRequest) -> ApiResponse {
        use ApiRequest::*;
        match request {
            GetInstanceInfo => {
                ApiResponse::json(&InstanceInfo::new(INSTANCE_ID, InstanceState::NotStarted))
            }
            GetVmConfig => ApiResponse::json(&convert::full(
                self.boot.as_ref(),
                &self.machine,
                &self.drives,
                self.vsock.as_ref(),
            )),
            PutBootSource(b) => match inspect_kernel(&b.kernel_image_path) {
                Ok(_) => {
                    self.boot = Some(convert::boot_source(b));
                    ApiResponse::NoContent
                }
                Err(e) => ApiResponse::fault(format!("boot-source: {e}")),
            },
            GetMachineConfig => ApiResponse::json(&convert::api_machine(&self.machine)),
            PutMachineConfig(m) => self.set_machine(convert::machine(m)),
            PatchMachineConfig(update) => {
                let patched = update.apply(&convert::api_machine(&self.machine));
                self.set_machine(convert::machine(patched))
            }
            PutDrive(d) => {
                if let Err(e) = std::fs::metadata(&d.path_on_host) {
                    return ApiResponse::fault(format!(
                        "drives/{}: path_on_host {}: {e}",
                        d.drive_id,
                        d.path_on_host.display()
                    ));
                }
                let d = convert::drive(d);
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
                self.vsock = Some(convert::vsock(v));
                ApiResponse::NoContent
            }
            PutAction(Action::InstanceStart) => unreachable_start(),
            PutAction(Action::SendCtrlAltDel) => {
                ApiResponse::fault("SendCtrlAltDel: the instance has not started")
            }
            PatchVm(_) => ApiResponse::fault("vm state: the instance has not started"),
            CreateSnapshot(_) => {
                ApiResponse::fault("snapshot/create: the instance has not started")
            }
            LoadSnapshot(_) => ApiResponse::fault("snapshot/load is not supported yet"),
        }
    }

    fn set_machine(&mut self, m: MachineConfig) -> ApiResponse {
        match m.validate() {
            Ok(()) => {
                self.machine = m;
                ApiResponse::NoContent
            }
            Err(e) => ApiResponse::fault(e),
        }
    }
}

/// InstanceStart is taken out of `handle` by [`configure`]; reaching it here is a bug worth a 400.
fn unreachable_start() -> ApiResponse {
    ApiResponse::fault("InstanceStart was not expected here")
}

/// Serves API requests until an `InstanceStart` builds a VM; returns it with its configuration.
/// `None` if the API thread went away before that.
pub fn configure(link: &ApiLink, serial: SerialConfig) -> Option<(Vmm, VmConfig)> {
    let mut state = PreBoot::default();
    loop {
        let pending = link.requests.recv().ok()?;
        let _ = link.wakeup.read();
        if !matches!(
            pending.request,
            ApiRequest::PutAction(Action::InstanceStart)
        ) {
            let response = state.handle(pending.request.clone());
            pending.answer(response);
            continue;
        }
        let built = state
            .config(&serial)
            .and_then(|c| c.validate().map(|()| c).map_err(|e| e.to_string()))
            .and_then(|c| {
                Vmm::try_from(&c)
                    .map(|vmm| (vmm, c))
                    .map_err(|e| e.to_string())
            });
        match built {
            Ok(ready) => {
                pending.answer(ApiResponse::NoContent);
                return Some(ready);
            }
            Err(e) => pending.answer(ApiResponse::fault(format!("InstanceStart: {e}"))),
        }
    }
}
