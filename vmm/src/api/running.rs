//! After `InstanceStart` (or a snapshot load): the event loop answers API requests on the VMM
//! thread. Queries are answered, pause/resume, snapshots and Ctrl-Alt-Del are carried out, and
//! changes to the booted configuration are refused by name.

use kiln_api::requests::actions::Action;
use kiln_api::requests::instance::{InstanceInfo, InstanceState};
use kiln_api::requests::vm::VmState;
use kiln_api::{ApiRequest, ApiResponse};

use super::{INSTANCE_ID, convert};
use crate::Vmm;

/// Answers one request for the running (or paused) VM.
pub fn handle(vmm: &mut Vmm, request: ApiRequest) -> ApiResponse {
    use ApiRequest::*;
    let after_start = |what: &str| {
        ApiResponse::fault(format!(
            "{what} cannot be changed after the instance started"
        ))
    };
    match request {
        GetInstanceInfo => {
            let state = if vmm.is_paused() {
                InstanceState::Paused
            } else {
                InstanceState::Running
            };
            ApiResponse::json(&InstanceInfo::new(INSTANCE_ID, state))
        }
        GetVmConfig => ApiResponse::json(&convert::full_of(vmm.config())),
        GetMachineConfig => ApiResponse::json(&vmm.config().machine),
        PutBootSource(_) => after_start("boot-source"),
        PutMachineConfig(_) | PatchMachineConfig(_) => after_start("machine-config"),
        PutDrive(d) => after_start(&format!("drives/{}", d.drive_id)),
        PatchDrive(d) => ApiResponse::fault(format!(
            "drives/{}: changing a drive of a running VM is not supported yet",
            d.drive_id
        )),
        PutVsock(_) => after_start("vsock"),
        PutAction(Action::InstanceStart) => {
            ApiResponse::fault("InstanceStart: the instance is already running")
        }
        PutAction(Action::SendCtrlAltDel) => match vmm.send_ctrl_alt_del() {
            Ok(()) => ApiResponse::NoContent,
            Err(e) => ApiResponse::fault(format!("SendCtrlAltDel: {e}")),
        },
        PatchVm(VmState::Paused) => match vmm.pause() {
            Ok(()) => ApiResponse::NoContent,
            Err(e) => ApiResponse::fault(format!("vm: cannot pause: {e}")),
        },
        PatchVm(VmState::Resumed) => match vmm.resume() {
            Ok(()) => ApiResponse::NoContent,
            Err(e) => ApiResponse::fault(format!("vm: cannot resume: {e}")),
        },
        CreateSnapshot(params) => match vmm.snapshot(&params) {
            Ok(()) => ApiResponse::NoContent,
            Err(e) => ApiResponse::fault(format!("snapshot/create: {e}")),
        },
        LoadSnapshot(_) => ApiResponse::fault(
            "snapshot/load: the instance has already started; load into a new kiln-vmm",
        ),
        request @ (GetBalloon | PutBalloon(_) | PatchBalloon(_) | GetBalloonStats
        | PatchBalloonStats(_)) => super::balloon::running(vmm, request),
    }
}
