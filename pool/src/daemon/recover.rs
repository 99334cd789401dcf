//! Starting again after a restart or a crash (SIGKILL included): sandboxes whose VMM still runs
//! (same pid, same start time) are adopted, their network's services started again in the
//! namespace their VMM kept (found through `/proc/<pid>/ns/net`), their published ports opened
//! again and their agent reconnected, or killed when any of that fails; paused ones are kept;
//! everything else that a dead daemon left (VMs it never handed out, half-built templates,
//! folders without a record, fork snapshots nobody maps) is removed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::DaemonError;
use super::sandbox::{Live, Sandbox};
use super::snapshot::SOURCE_FILE;
use super::templates::READY_MARKER;
use super::{Daemon, now_s};
use crate::db::SandboxRow;
use crate::net::{NetRecord, VmNet};
use crate::types::SandboxState;
use crate::vm::{VmProcess, process_alive, start_ticks};

/// How long an adopted sandbox's agent may take to answer again.
const REJOIN_WAIT: Duration = Duration::from_secs(10);

/// What recovery did, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Running sandboxes adopted.
    pub adopted: usize,
    /// Paused sandboxes kept.
    pub paused: usize,
    /// Records of dead VMs (and warm VMs never handed out) cleaned up.
    pub cleaned: usize,
}

/// True when the row's VMM is still the process it started as.
fn still_running(row: &SandboxRow) -> bool {
    match (row.vmm_pid, row.vmm_start) {
        (Some(pid), Some(start)) => process_alive(pid) && start_ticks(pid) == Some(start),
        _ => false,
    }
}

impl Daemon {
    /// Recovers from what a previous daemon left; call once before serving.
    pub fn recover(self: &Arc<Self>) -> Result<Recovered, DaemonError> {
        let mut done = Recovered::default();
        for entry in std::fs::read_dir(self.cfg.templates_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            // A snapshot's folder is ready before its record is written: one without a record
            // is a snapshot that died between the two.
            let name = entry.file_name().to_string_lossy().into_owned();
            let unrecorded_snapshot =
                entry.path().join(SOURCE_FILE).exists() && self.db().template(&name)?.is_none();
            if !entry.path().join(READY_MARKER).exists() || unrecorded_snapshot {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let rows = self.db().sandboxes()?;
        for row in rows {
            match self.recover_one(&row) {
                Ok(Some(state)) => {
                    match state {
                        SandboxState::Running => done.adopted += 1,
                        SandboxState::Paused => done.paused += 1,
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(sandbox = %row.id, "cannot adopt it, so it is killed: {e}")
                }
            }
            if still_running(&row)
                && let Some(pid) = row.vmm_pid
            {
                let launcher = &self.cfg.inputs.vmm;
                let dir = PathBuf::from(&row.dir);
                match VmProcess::adopt(launcher, pid, &dir, VmNet::none()) {
                    Ok(mut vm) => vm.kill(),
                    // SAFETY: kill(2) with a pid and a signal number touches no memory.
                    Err(_) => unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGKILL);
                    },
                }
            }
            let _ = std::fs::remove_dir_all(&row.dir);
            self.db().remove_sandbox(&row.id)?;
            done.cleaned += 1;
        }
        let known: HashSet<String> = self.all_sandboxes().iter().map(|s| s.id.clone()).collect();
        for entry in std::fs::read_dir(self.cfg.sandboxes_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            if !known.contains(&entry.file_name().to_string_lossy().into_owned()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        for entry in std::fs::read_dir(self.cfg.forks_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            self.release_memory_source(&entry.path())?;
        }
        // Jails of VMs that are gone (a kilnd killed mid-build, a VM that died with it).
        if let Some(jail) = &self.cfg.inputs.vmm.jail {
            let keep: BTreeSet<String> = self
                .all_sandboxes()
                .iter()
                .filter_map(|s| {
                    s.live()
                        .vm
                        .as_ref()
                        .and_then(|v| v.jail_id().map(String::from))
                })
                .collect();
            let swept = jail.sweep(&keep);
            if swept > 0 {
                tracing::info!(jails = swept, "removed jails left by a previous run");
            }
        }
        Ok(done)
    }

    /// Brings one record back as a sandbox; `None` when it cannot be (it is then cleaned up).
    fn recover_one(
        self: &Arc<Self>,
        row: &SandboxRow,
    ) -> Result<Option<SandboxState>, DaemonError> {
        let state = match row.state.as_str() {
            "running" if still_running(row) => SandboxState::Running,
            "paused" if PathBuf::from(&row.memory_from).join("vmstate").exists() => {
                SandboxState::Paused
            }
            _ => return Ok(None),
        };
        let (template_id, template_name, spec, _, _) = self.template_parts(&row.template_id)?;
        let dir = PathBuf::from(&row.dir);
        // A record from before networks has none: no interface, no policy.
        let net: NetRecord = match row.network_json.as_str() {
            "" => NetRecord::default(),
            text => serde_json::from_str(text).map_err(|e| {
                DaemonError::Internal(format!("sandbox {}'s stored network: {e}", row.id))
            })?,
        };
        let (vm, client) = match state {
            SandboxState::Running => {
                let pid = row.vmm_pid.unwrap_or(0);
                // Its network's services died with the last kilnd; its namespace, TAP and rules
                // live on, held by its VMM: the services start again there, or the sandbox is
                // killed (a VM is never left with a dead network).
                let vm_net = match net.nic {
                    true => {
                        let policy = net.policy.check("network").map_err(DaemonError::Internal)?;
                        VmNet::adopt(&row.id, pid, policy)?
                    }
                    false => VmNet::none(),
                };
                let mut vm = VmProcess::adopt(&self.cfg.inputs.vmm, pid, &dir, vm_net)?;
                vm.publish(&net.publish, &net.ports)?;
                let client =
                    kiln_agent::client::wait_ready(&vm.vsock, Instant::now() + REJOIN_WAIT)?;
                (Some(vm), Some(client))
            }
            SandboxState::Paused => (None, None),
        };
        let env: BTreeMap<String, String> = serde_json::from_str(&row.env_json).unwrap_or_default();
        let metadata: BTreeMap<String, String> =
            serde_json::from_str(&row.metadata_json).unwrap_or_default();
        let sb = Arc::new(Sandbox::new(
            row.id.clone(),
            template_id,
            template_name,
            spec,
            row.created_at,
            env,
            metadata,
            dir,
            net.clone(),
            Live {
                state,
                vm,
                client,
                // A paused one's `expires_at` is the lifetime it has left (see `pause`).
                expires_at: match state {
                    SandboxState::Running => row.expires_at.max(now_s()),
                    SandboxState::Paused => row.expires_at,
                },
                exec_count: row.exec_count,
                memory_from: PathBuf::from(&row.memory_from),
                ports: net.ports,
            },
        ));
        self.sandboxes().insert(row.id.clone(), sb);
        Ok(Some(state))
    }
}
