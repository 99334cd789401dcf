//! One sandbox in memory: what never changes (id, template, environment, labels, folder) and,
//! behind a lock, what does (its VM and agent connection while it runs, its expiry, its count of
//! commands).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln_agent::client::Client;

use super::error::DaemonError;
use crate::db::SandboxRow;
use crate::net::NetRecord;
use crate::template::spec::Spec;
use crate::types::{PublishedPort, SandboxInfo, SandboxState};
use crate::vm::{VmProcess, start_ticks};

/// How long a running sandbox's agent may take to accept a new connection when its old one
/// ended.
const RECONNECT_WAIT: Duration = Duration::from_secs(10);

/// What changes over a sandbox's life.
pub struct Live {
    /// Running or paused.
    pub state: SandboxState,
    /// Its VM while it runs.
    pub vm: Option<VmProcess>,
    /// Its agent connection while it runs.
    pub client: Option<Client>,
    /// When it is killed, seconds since the epoch.
    pub expires_at: u64,
    /// Commands run so far.
    pub exec_count: u64,
    /// The folder whose snapshot its memory maps.
    pub memory_from: PathBuf,
    /// The host ports its published ports had when they were last open (a paused sandbox's,
    /// tried first when it resumes).
    pub ports: Vec<PublishedPort>,
}

/// A sandbox.
pub struct Sandbox {
    /// Its id.
    pub id: String,
    /// Its template's content key.
    pub template_id: String,
    /// Its template's name.
    pub template_name: String,
    /// Its template's spec (workdir, user and environment of its commands).
    pub spec: Arc<Spec>,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// Its own environment, over the template's.
    pub env: BTreeMap<String, String>,
    /// Its labels.
    pub metadata: BTreeMap<String, String>,
    /// Its folder (VMM sockets, console, pause snapshot).
    pub dir: PathBuf,
    /// Its network: whether it has an interface, its policy and the ports it publishes.
    pub net: NetRecord,
    live: Mutex<Live>,
}

impl Sandbox {
    /// A sandbox with `live` state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        template_id: String,
        template_name: String,
        spec: Arc<Spec>,
        created_at: u64,
        env: BTreeMap<String, String>,
        metadata: BTreeMap<String, String>,
        dir: PathBuf,
        net: NetRecord,
        live: Live,
    ) -> Sandbox {
        Sandbox {
            id,
            template_id,
            template_name,
            spec,
            created_at,
            env,
            metadata,
            dir,
            net,
            live: Mutex::new(live),
        }
    }

    /// The changing state, locked.
    pub fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The agent connection of a running sandbox. One that ended is made again: a snapshot
    /// (a fork's) sends the guest a vsock transport reset, which ends every connection into it
    /// while the VM runs on.
    pub fn client(&self) -> Result<Client, DaemonError> {
        let mut live = self.live();
        match (&live.client, live.state) {
            (Some(c), SandboxState::Running) if c.is_closed() => {
                let vsock = live.vm.as_ref().map(|vm| vm.vsock.clone()).ok_or_else(|| {
                    DaemonError::Conflict(format!("sandbox {} has no VM", self.id))
                })?;
                if let Some(why) = live.vm.as_mut().and_then(VmProcess::ended) {
                    return Err(self.vm_ended(&why));
                }
                match kiln_agent::client::wait_ready(&vsock, Instant::now() + RECONNECT_WAIT) {
                    Ok(client) => {
                        live.client = Some(client.clone());
                        Ok(client)
                    }
                    Err(e) => match live.vm.as_mut().and_then(VmProcess::ended) {
                        Some(why) => Err(self.vm_ended(&why)),
                        None => Err(e.into()),
                    },
                }
            }
            (Some(c), SandboxState::Running) => Ok(c.clone()),
            (_, SandboxState::Paused) => Err(DaemonError::Conflict(format!(
                "sandbox {} is paused; resume it first",
                self.id
            ))),
            (None, _) => Err(DaemonError::Conflict(format!(
                "sandbox {} has no agent connection",
                self.id
            ))),
        }
    }

    /// The error for a sandbox whose VM ended under it, logged: a VM does not die silently.
    fn vm_ended(&self, why: &str) -> DaemonError {
        tracing::warn!(sandbox = %self.id, "its VM ended: {why}");
        DaemonError::Vm(format!("sandbox {}'s VM ended: {why}", self.id))
    }

    /// Why its VM ended, if it did within `wait` (a VMM whose guest died closes the agent's
    /// connection as it exits, so a lost connection is often followed by its exit).
    pub fn why_ended(&self, wait: Duration) -> Option<String> {
        let end = Instant::now() + wait;
        loop {
            if let Some(why) = self.live().vm.as_mut().and_then(VmProcess::ended) {
                tracing::warn!(sandbox = %self.id, "its VM ended: {why}");
                return Some(why);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The environment its commands start with: the template's, then its own.
    pub fn full_env(&self) -> BTreeMap<String, String> {
        crate::template::build::sandbox_env(&self.spec, &self.env)
    }

    /// As the API shows it.
    pub fn info(&self) -> SandboxInfo {
        let live = self.live();
        SandboxInfo {
            id: self.id.clone(),
            template: self.template_name.clone(),
            template_id: self.template_id.clone(),
            state: live.state,
            created_at: self.created_at,
            expires_at: match live.state {
                SandboxState::Running => live.expires_at,
                SandboxState::Paused => super::now_s() + live.expires_at,
            },
            vcpus: self.spec.vcpus,
            mem_mib: self.spec.mem_mib,
            metadata: self.metadata.clone(),
            exec_count: live.exec_count,
            network: crate::net::info(&self.net, live.vm.as_ref().map(VmProcess::net)),
        }
    }

    /// Its record.
    pub fn row(&self) -> SandboxRow {
        let live = self.live();
        let pid = live.vm.as_ref().map(VmProcess::pid);
        let net = NetRecord {
            ports: match &live.vm {
                Some(vm) => vm.net().published().to_vec(),
                None => live.ports.clone(),
            },
            ..self.net.clone()
        };
        SandboxRow {
            id: self.id.clone(),
            template_id: self.template_id.clone(),
            template_name: self.template_name.clone(),
            state: live.state.as_str().into(),
            created_at: self.created_at,
            expires_at: live.expires_at,
            env_json: serde_json::to_string(&self.env).unwrap_or_default(),
            metadata_json: serde_json::to_string(&self.metadata).unwrap_or_default(),
            vcpus: self.spec.vcpus,
            mem_mib: self.spec.mem_mib,
            exec_count: live.exec_count,
            vmm_pid: pid,
            vmm_start: pid.and_then(start_ticks),
            dir: self.dir.display().to_string(),
            memory_from: live.memory_from.display().to_string(),
            network_json: serde_json::to_string(&net).unwrap_or_default(),
        }
    }
}
