//! Creating a sandbox: a warm VM of its template when one is ready and the sandbox asks for the
//! template's default network policy (its clone step, with the template's environment, was done
//! when the pool made it: handing it out needs no round trip to the guest unless the sandbox has
//! an environment of its own), else one restored on demand on a network of its own with the
//! clone step (fresh entropy, the host's time, the sandbox's environment) in the same round trip
//! as the connection. Its published ports open once it runs.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::DaemonError;
use super::sandbox::{Live, Sandbox};
use super::{Daemon, Warm, new_id, now_s};
use crate::jail::{Launcher, Limits};
use crate::net::{NetRecord, VmNet};
use crate::template::TemplateFiles;
use crate::template::build::limits;
use crate::template::spec::Spec;
use crate::types::{CreateSandbox, NetPolicy, SandboxInfo, SandboxState};
use crate::vm::VmProcess;

/// How long a restored VM's agent may take to answer.
pub const AGENT_WAIT: Duration = Duration::from_secs(60);
/// The longest lifetime a sandbox may ask for: a day.
pub const MAX_TIMEOUT_S: u64 = 24 * 3600;

/// A template as a create finds it: its id, name, spec, files and most sandboxes.
pub type TemplateParts = (String, String, Arc<Spec>, TemplateFiles, u32);

/// Templates as [`Daemon::template_parts`] found them, by the name or id asked for, while the
/// database's templates version stays what it was when they were read: every create looks its
/// template up, and a built template's record only changes through the database.
#[derive(Debug, Default)]
pub(super) struct TemplateCache {
    version: u64,
    parts: HashMap<String, TemplateParts>,
}

/// Restores `from` into a new VM in `dir` on the network `net`, with the clone step done in the
/// same round trip as the connection (warm VMs, the on-demand path, resume and fork). A VM that
/// fails is killed with its network; the folder is the caller's to remove (a paused sandbox's
/// holds its snapshot).
pub fn restore_cloned(
    vmm: &Launcher,
    dir: &Path,
    from: &TemplateFiles,
    limits: Limits,
    env: BTreeMap<String, String>,
    net: VmNet,
) -> Result<(VmProcess, kiln_agent::client::Client), DaemonError> {
    let mut vm = VmProcess::spawn(vmm, dir, limits, net)?;
    vm.restore(from)?;
    match kiln_agent::client::restore_connect(&vm.vsock, Instant::now() + AGENT_WAIT, env) {
        Ok((client, _)) => Ok((vm, client)),
        // A guest that died after the restore leaves only a refusing socket: say what ended it.
        Err(e) => match vm.ended() {
            Some(why) => {
                tracing::warn!(vm = %dir.display(), "a restored VM ended: {why}");
                Err(DaemonError::Vm(format!(
                    "the restored VM ended before its agent answered: {why}"
                )))
            }
            None => Err(e.into()),
        },
    }
}

/// The network of a new VM for sandbox `id` (or a warm VM that will be it): a sandbox network
/// with `policy` when the snapshot it is restored from has an interface (`nic`), else none.
/// Blocks (it makes a namespace and loads its rules).
pub fn vm_net(id: &str, nic: bool, policy: &NetPolicy) -> Result<VmNet, DaemonError> {
    if !nic {
        return Ok(VmNet::none());
    }
    let policy = policy.check("network").map_err(DaemonError::BadRequest)?;
    Ok(VmNet::create(id, policy)?)
}

impl Daemon {
    /// Whether a sandbox of template `name`, whose snapshot has an interface when `nic`, can
    /// have the network `policy` on this kilnd; the refusal says why not.
    pub fn check_net(&self, name: &str, nic: bool, policy: &NetPolicy) -> Result<(), DaemonError> {
        if !self.cfg.inputs.net && !policy.is_none() {
            return Err(DaemonError::BadRequest(
                "network: this kilnd runs with --no-net, so its sandboxes have no network".into(),
            ));
        }
        if nic && !self.cfg.inputs.net {
            return Err(DaemonError::BadRequest(format!(
                "template {name} was built with a network interface and this kilnd runs with \
                 --no-net, which cannot restore it: rebuild the template"
            )));
        }
        if !nic && !policy.is_none() {
            return Err(DaemonError::BadRequest(format!(
                "network: template {name} has no network interface (it was built by a kilnd \
                 running with --no-net): rebuild it to give its sandboxes a network"
            )));
        }
        Ok(())
    }

    /// The template `name` (or id): its record, spec and files.
    pub fn template_parts(&self, name: &str) -> Result<TemplateParts, DaemonError> {
        let db = self.db();
        let mut cache = self
            .template_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if cache.version != db.templates_version() {
            *cache = TemplateCache {
                version: db.templates_version(),
                parts: HashMap::new(),
            };
        }
        if let Some(parts) = cache.parts.get(name) {
            return Ok(parts.clone());
        }
        let (row, _, max) = db
            .template(name)?
            .ok_or_else(|| DaemonError::NotFound(format!("no template named {name}")))?;
        let spec: Spec = serde_json::from_str(&row.spec_json)
            .map_err(|e| DaemonError::Internal(format!("template {name}'s stored spec: {e}")))?;
        let files = TemplateFiles::in_dir(&self.cfg.templates_dir().join(&row.id));
        let parts = (row.id, row.name, Arc::new(spec), files, max);
        cache.parts.insert(name.to_string(), parts.clone());
        Ok(parts)
    }

    /// Takes a warm VM of template `id`, if one is ready.
    pub fn take_warm(&self, template_id: &str) -> Option<Warm> {
        let warm = self.warm().get_mut(template_id)?.pop_front()?;
        self.hold_refills();
        Some(warm)
    }

    /// Creates a sandbox.
    pub async fn create(self: &Arc<Self>, req: CreateSandbox) -> Result<SandboxInfo, DaemonError> {
        let (template_id, template_name, spec, files, max_sandboxes) =
            self.template_parts(&req.template)?;
        let timeout_s = req.timeout_s.unwrap_or(self.cfg.default_timeout_s);
        if timeout_s == 0 || timeout_s > MAX_TIMEOUT_S {
            return Err(DaemonError::BadRequest(format!(
                "timeout_s {timeout_s} is outside 1..={MAX_TIMEOUT_S}"
            )));
        }
        for (k, v) in &req.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(DaemonError::BadRequest(format!(
                    "env: {k:?} is not a variable name"
                )));
            }
        }
        if max_sandboxes > 0 {
            let n = self
                .all_sandboxes()
                .iter()
                .filter(|s| s.template_id == template_id)
                .count();
            if n as u32 >= max_sandboxes {
                return Err(DaemonError::Limit(format!(
                    "template {template_name} already has {n} of its {max_sandboxes} sandboxes"
                )));
            }
        }
        let env = crate::template::build::sandbox_env(&spec, &req.env);
        let has_own_env = !req.env.is_empty();
        let asked = req.network.clone().unwrap_or_default();
        asked.check_publish().map_err(DaemonError::BadRequest)?;
        let policy = asked.policy(&spec.network);
        policy.check("network").map_err(DaemonError::BadRequest)?;
        let nic = files.has_nic();
        self.check_net(&template_name, nic, &policy)?;
        let net = NetRecord {
            nic,
            policy,
            publish: asked.publish,
            ports: Vec::new(),
        };
        // Warm VMs were made with the template's default policy; another one is restored on
        // demand with its own network.
        let warm = match net.policy == spec.network {
            true => self.take_warm(&template_id),
            false => None,
        };
        let from_warm = warm.is_some();
        let warm_id = warm.as_ref().map(|w| w.id.clone());
        let starting = match warm {
            Some(_) => None,
            None => Some(self.start_vm(spec.mem_mib)?),
        };
        let vmm = self.cfg.inputs.vmm.clone();
        let sandboxes_dir = self.cfg.sandboxes_dir();
        let files2 = files.clone();
        let spec2 = spec.clone();
        let net2 = net.clone();
        let made = tokio::task::spawn_blocking(move || {
            if let Some(w) = &warm {
                w.vm.foreground();
            }
            let made = match warm {
                // The pool did the clone step with the template's environment; a sandbox with
                // variables of its own has it done again with them (its commands' default
                // environment lives in the guest's agent).
                Some(w) if !has_own_env => Ok((w.id, w.vm, w.client)),
                Some(w) => match w.client.restored_now(env) {
                    Ok(_) => Ok((w.id, w.vm, w.client)),
                    Err(e) => Err((w.vm.dir.clone(), DaemonError::from(e))),
                },
                None => {
                    let id = new_id();
                    let dir = sandboxes_dir.join(&id);
                    vm_net(&id, net2.nic, &net2.policy)
                        .and_then(|vm_net| {
                            restore_cloned(&vmm, &dir, &files2, limits(&spec2), env, vm_net)
                        })
                        .map(|(vm, client)| (id, vm, client))
                        .map_err(|e| (dir, e))
                }
            };
            // Its ports are opened once it runs; a port that cannot be had ends it.
            let published =
                made.and_then(
                    |(id, mut vm, client)| match vm.publish(&net2.publish, &[]) {
                        Ok(()) => Ok((id, vm, client)),
                        Err(e) => Err((vm.dir.clone(), DaemonError::from(e))),
                    },
                );
            published.map_err(|(dir, e)| {
                // A VM dropped here is killed with its network; its folder goes too.
                let _ = std::fs::remove_dir_all(&dir);
                e
            })
        })
        .await?;
        let (id, vm, client) = match made {
            Ok(made) => made,
            Err(e) => {
                // A warm VM that failed its handout is gone: so is its record.
                if let Some(warm_id) = &warm_id
                    && let Err(db) = self.db().remove_sandbox(warm_id)
                {
                    tracing::warn!(vm = %warm_id, "forgetting a failed warm VM: {db}");
                }
                return Err(e);
            }
        };
        let now = now_s();
        let dir: PathBuf = vm.dir.clone();
        let sb = Arc::new(Sandbox::new(
            id.clone(),
            template_id,
            template_name,
            spec,
            now,
            req.env,
            req.metadata,
            dir,
            net,
            Live {
                state: SandboxState::Running,
                vm: Some(vm),
                client: Some(client),
                expires_at: now + timeout_s,
                exec_count: 0,
                memory_from: files.dir.clone(),
                ports: Vec::new(),
            },
        ));
        self.sandboxes().insert(id.clone(), sb.clone());
        drop(starting);
        self.save(&sb)?;
        tracing::info!(sandbox = %id, template = %sb.template_name, warm = from_warm, "created");
        Ok(sb.info())
    }
}
