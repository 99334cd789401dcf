//! After `InstanceStart`: an event-loop subscriber answers API requests on the VMM thread.
//! Queries are answered; changes to the booted configuration are refused by name.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kiln_api::requests::actions::Action;
use kiln_api::requests::instance::{InstanceInfo, InstanceState};
use kiln_api::{ApiRequest, ApiResponse};

use super::{ApiLink, INSTANCE_ID, convert};
use crate::config::VmConfig;

/// Answers API requests while the VM runs.
pub struct RunningApi {
    link: ApiLink,
    config: VmConfig,
}

impl RunningApi {
    /// Serves `link` for the VM built from `config`.
    pub fn new(link: ApiLink, config: VmConfig) -> Self {
        Self { link, config }
    }

    fn handle(&self, request: ApiRequest) -> ApiResponse {
        use ApiRequest::*;
        let after_start = |what: &str| {
            ApiResponse::fault(format!(
                "{what} cannot be changed after the instance started"
            ))
        };
        match request {
            GetInstanceInfo => {
                ApiResponse::json(&InstanceInfo::new(INSTANCE_ID, InstanceState::Running))
            }
            GetVmConfig => ApiResponse::json(&convert::full_of(&self.config)),
            GetMachineConfig => ApiResponse::json(&convert::api_machine(&self.config.machine)),
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
            PutAction(Action::SendCtrlAltDel) => {
                ApiResponse::fault("SendCtrlAltDel is not supported yet")
            }
            PatchVm(_) => ApiResponse::fault("pausing and resuming is not supported yet"),
            CreateSnapshot(_) => ApiResponse::fault("snapshot/create is not supported yet"),
            LoadSnapshot(_) => {
                ApiResponse::fault("snapshot/load: the instance has already started")
            }
        }
    }
}

impl MutEventSubscriber for RunningApi {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.link.wakeup, EventSet::IN)) {
            log::error!("cannot watch the API: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.link.wakeup.read();
        while let Ok(pending) = self.link.requests.try_recv() {
            pending.respond(|request| self.handle(request));
        }
    }
}
