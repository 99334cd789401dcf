//! After `InstanceStart` (or a snapshot load): the event loop answers API requests on the VMM
//! thread. Queries are answered, pause/resume, snapshots, working sets, Ctrl-Alt-Del, metrics
//! flushes, MMDS changes and drive rate limits are carried out, and changes to the booted
//! configuration are refused by name.

use std::path::Path;
use std::time::Instant;

use kiln_api::requests::actions::Action;
use kiln_api::requests::instance::{InstanceInfo, InstanceState};
use kiln_api::requests::snapshot::SnapshotType;
use kiln_api::requests::vm::VmState;
use kiln_api::{ApiRequest, ApiResponse};

use super::{common, convert};
use crate::Vmm;
use crate::metrics::{self, LATENCIES};
use crate::persist::working_set::WorkingSet;

/// Answers one request for the running (or paused) VM.
pub fn handle(vmm: &mut Vmm, request: ApiRequest) -> ApiResponse {
    let counted = request.clone();
    let answer = answer(vmm, request);
    metrics::count_request(&counted, answer.status());
    answer
}

fn answer(vmm: &mut Vmm, request: ApiRequest) -> ApiResponse {
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
            ApiResponse::json(&InstanceInfo::new(&vmm.instance().id, state))
        }
        GetVersion => common::version(),
        GetVmConfig => ApiResponse::json(&convert::full_of(vmm.instance(), vmm.config())),
        GetMachineConfig => ApiResponse::json(&vmm.config().machine),
        PutBootSource(_) => after_start("boot-source"),
        PutMachineConfig(_) | PatchMachineConfig(_) => after_start("machine-config"),
        PutDrive(d) => after_start(&format!("drives/{}", d.drive_id)),
        PatchDrive(d) => match vmm.patch_drive(&d) {
            Ok(()) => ApiResponse::NoContent,
            Err(e) => ApiResponse::fault(format!("drives/{}: {e}", d.drive_id)),
        },
        PutVsock(_) => after_start("vsock"),
        PutNetworkInterface(n) => after_start(&format!("network-interfaces/{}", n.iface_id)),
        PatchNetworkInterface(u) => match vmm.update_net(&u) {
            Ok(()) => ApiResponse::NoContent,
            Err(e) => ApiResponse::fault(format!("network-interfaces/{}: {e}", u.iface_id)),
        },
        PutLogger(_) => after_start("logger"),
        PutMetrics(_) => after_start("metrics"),
        PutSerial(_) => after_start("serial"),
        PutMmdsConfig(_) => after_start("mmds/config"),
        GetMmds => common::get_mmds(vmm.instance()),
        PutMmds(data) => common::put_mmds(vmm.instance(), data),
        PatchMmds(patch) => common::patch_mmds(vmm.instance(), &patch),
        PutAction(Action::InstanceStart) => {
            ApiResponse::fault("InstanceStart: the instance is already running")
        }
        PutAction(Action::SendCtrlAltDel) => match vmm.send_ctrl_alt_del() {
            Ok(()) => ApiResponse::NoContent,
            Err(e) => ApiResponse::fault(format!("SendCtrlAltDel: {e}")),
        },
        PutAction(Action::FlushMetrics) => match vmm.flush_metrics() {
            Ok(()) => ApiResponse::NoContent,
            Err(e) => ApiResponse::fault(format!("FlushMetrics: {e}")),
        },
        PatchVm(VmState::Paused) => {
            let t0 = Instant::now();
            match vmm.pause() {
                Ok(()) => {
                    LATENCIES.pause_vm.set(metrics::micros_since(t0));
                    ApiResponse::NoContent
                }
                Err(e) => ApiResponse::fault(format!("vm: cannot pause: {e}")),
            }
        }
        PatchVm(VmState::Resumed) => {
            let t0 = Instant::now();
            match vmm.resume() {
                Ok(()) => {
                    LATENCIES.resume_vm.set(metrics::micros_since(t0));
                    ApiResponse::NoContent
                }
                Err(e) => ApiResponse::fault(format!("vm: cannot resume: {e}")),
            }
        }
        CreateSnapshot(params) => {
            let t0 = Instant::now();
            match vmm.snapshot(&params) {
                Ok(()) => {
                    let latency = match params.snapshot_type {
                        SnapshotType::Full => &LATENCIES.full_create_snapshot,
                        SnapshotType::Diff => &LATENCIES.diff_create_snapshot,
                    };
                    latency.set(metrics::micros_since(t0));
                    ApiResponse::NoContent
                }
                Err(e) => ApiResponse::fault(format!("snapshot/create: {e}")),
            }
        }
        SaveWorkingSet(params) => match save_working_set(vmm, &params.path) {
            Ok(()) => ApiResponse::NoContent,
            Err(e) => ApiResponse::fault(format!("snapshot/working-set: {e}")),
        },
        LoadSnapshot(_) => ApiResponse::fault(
            "snapshot/load: the instance has already started; load into a new kiln-vmm",
        ),
        request @ (GetBalloon | PutBalloon(_) | PatchBalloon(_) | GetBalloonStats
        | PatchBalloonStats(_)) => super::balloon::running(vmm, request),
    }
}

/// Writes the guest pages `vmm` has touched since its snapshot was loaded to `path`.
fn save_working_set(vmm: &Vmm, path: &Path) -> Result<(), String> {
    let loaded = vmm.instance().loaded_snapshot.ok_or(
        "this VM was not loaded from a snapshot's memory file (PUT /snapshot/load with the File \
         backend), so there is no snapshot to record its working set against",
    )?;
    let set = WorkingSet::record(&vmm.mem, loaded).map_err(|e| {
        let jail = if e.kind() == std::io::ErrorKind::NotFound {
            " (this process sees no /proc: kiln-jailer mounts one in its jails, a chroot made \
             otherwise may have none)"
        } else {
            ""
        };
        format!("cannot read /proc/self/pagemap{jail}: {e}")
    })?;
    set.save(path).map_err(|e| e.to_string())
}
