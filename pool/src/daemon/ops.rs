//! What is done with a sandbox: run a command (streamed), move files, change its lifetime, pause
//! it to disk and resume it, fork it, kill it. Its network goes with its VM (pause and kill end
//! it) and is made again, with the policy it was created with, for each VM it gets (resume, and
//! each fork's).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use kiln_agent::client::{ExecOutput, WriteOptions};
use kiln_agent::protocol::{ExecSpec, ExitStatus};
use tokio::sync::mpsc;

use super::create::MAX_TIMEOUT_S;
use super::error::DaemonError;
use super::sandbox::Sandbox;
use super::{Daemon, now_s};
use crate::net::NetRecord;
use crate::template::TemplateFiles;
use crate::types::{DirEntryInfo, ExecEvent, ExecRequest, PortRequest, SandboxInfo, SandboxState};

/// How long past its own timeout a command may take to report before the sandbox is judged
/// stuck.
const EXEC_GRACE: Duration = Duration::from_secs(10);

/// The exec spec for `req` in `sb`: the template's working directory and user unless the request
/// names its own.
fn exec_spec(sb: &Sandbox, req: &ExecRequest) -> Result<ExecSpec, DaemonError> {
    if req.argv.is_empty() {
        return Err(DaemonError::BadRequest(
            "argv: give the program to run".into(),
        ));
    }
    let mut spec = ExecSpec::new(req.argv.iter().cloned());
    spec.env = req.env.clone();
    spec.cwd = req.cwd.clone().or_else(|| sb.spec.workdir.clone());
    spec.user = req.user.clone().or_else(|| sb.spec.user.clone());
    spec.timeout_ms = req.timeout_ms;
    spec.stdin = req.stdin_b64.is_some();
    Ok(spec)
}

fn send(tx: &mpsc::Sender<ExecEvent>, ev: ExecEvent) -> bool {
    tx.blocking_send(ev).is_ok()
}

impl Daemon {
    /// Starts `req` in sandbox `id`; its events arrive on the returned channel, the last one
    /// `Exit` or `Error`.
    pub fn exec(
        self: &Arc<Self>,
        id: &str,
        req: ExecRequest,
    ) -> Result<mpsc::Receiver<ExecEvent>, DaemonError> {
        let sb = self.sandbox(id)?;
        let client = sb.client()?;
        let spec = exec_spec(&sb, &req)?;
        let stdin = match &req.stdin_b64 {
            Some(text) => Some(
                B64.decode(text)
                    .map_err(|e| DaemonError::BadRequest(format!("stdin_b64: {e}")))?,
            ),
            None => None,
        };
        let deadline = req
            .timeout_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms) + EXEC_GRACE);
        sb.live().exec_count += 1;
        let _ = self.save(&sb);
        let (tx, rx) = mpsc::channel(64);
        tokio::task::spawn_blocking(move || {
            let mut exec = match client.exec(spec) {
                Ok(e) => e,
                Err(e) => {
                    let could_not_start =
                        matches!(e, kiln_agent::client::Error::CouldNotStart { .. });
                    // A VM that died as the command started loses it the same way.
                    let message = match could_not_start {
                        true => e.to_string(),
                        false => match sb.why_ended(Duration::from_secs(1)) {
                            Some(why) => format!("the command was lost: its VM ended: {why}"),
                            None => e.to_string(),
                        },
                    };
                    send(
                        &tx,
                        ExecEvent::Error {
                            message,
                            could_not_start,
                        },
                    );
                    return;
                }
            };
            if !send(&tx, ExecEvent::Started { pid: exec.pid() }) {
                exec.control().cancel().ok();
                return;
            }
            if let (Some(bytes), Some(mut input)) = (stdin, exec.take_stdin()) {
                std::thread::spawn(move || {
                    let _ = input.write_all(&bytes);
                    input.close();
                });
            }
            loop {
                let next = match deadline {
                    Some(d) => exec.next_output_until(d),
                    None => exec.next_output(),
                };
                let ev = match next {
                    Ok(Some(ExecOutput::Stdout(b))) => ExecEvent::Stdout {
                        data_b64: B64.encode(b),
                    },
                    Ok(Some(ExecOutput::Stderr(b))) => ExecEvent::Stderr {
                        data_b64: B64.encode(b),
                    },
                    Ok(Some(ExecOutput::Exit(status))) => {
                        let (exit_code, signal, timed_out) = match status {
                            ExitStatus::Exited(c) => (Some(c), None, false),
                            ExitStatus::Signaled(s) => (None, Some(s), false),
                            ExitStatus::TimedOut => (None, None, true),
                        };
                        send(
                            &tx,
                            ExecEvent::Exit {
                                exit_code,
                                signal,
                                timed_out,
                            },
                        );
                        return;
                    }
                    Ok(None) => ExecEvent::Error {
                        message: "the command ended without a status".into(),
                        could_not_start: false,
                    },
                    Err(e) => ExecEvent::Error {
                        message: match sb.why_ended(Duration::from_secs(1)) {
                            Some(why) => format!("lost the command: its VM ended: {why}"),
                            None => format!("lost the command: {e}"),
                        },
                        could_not_start: false,
                    },
                };
                let last = matches!(ev, ExecEvent::Error { .. });
                // A client that went away cancels the command.
                if !send(&tx, ev) {
                    exec.control().cancel().ok();
                    return;
                }
                if last {
                    return;
                }
            }
        });
        Ok(rx)
    }

    /// Reads file `path` of sandbox `id` (whole; at most `limit` bytes).
    pub async fn read_file(
        self: &Arc<Self>,
        id: &str,
        path: String,
        limit: u64,
    ) -> Result<Vec<u8>, DaemonError> {
        let client = self.sandbox(id)?.client()?;
        tokio::task::spawn_blocking(move || {
            let stat = client.stat(&path)?;
            if stat.size > limit {
                return Err(DaemonError::BadRequest(format!(
                    "{path} is {} bytes; reads are limited to {limit}",
                    stat.size
                )));
            }
            let mut out = Vec::with_capacity(stat.size as usize);
            client.read_file(&path, &mut out)?;
            Ok(out)
        })
        .await?
    }

    /// Writes `data` to file `path` of sandbox `id` (parents made, mode 0644 for a new file).
    pub async fn write_file(
        self: &Arc<Self>,
        id: &str,
        path: String,
        data: Vec<u8>,
        mode: Option<u32>,
    ) -> Result<u64, DaemonError> {
        let client = self.sandbox(id)?.client()?;
        tokio::task::spawn_blocking(move || {
            let options = WriteOptions {
                mode,
                ..WriteOptions::default()
            };
            Ok(client.write_file(&path, &data[..], options)?)
        })
        .await?
    }

    /// Lists folder `path` of sandbox `id`.
    pub async fn list_dir(
        self: &Arc<Self>,
        id: &str,
        path: String,
    ) -> Result<Vec<DirEntryInfo>, DaemonError> {
        let client = self.sandbox(id)?.client()?;
        tokio::task::spawn_blocking(move || {
            Ok(client
                .list_dir(&path)?
                .into_iter()
                .map(|e| DirEntryInfo {
                    name: e.name,
                    kind: format!("{:?}", e.stat.kind).to_lowercase(),
                    size: e.stat.size,
                    mode: e.stat.mode,
                    uid: e.stat.uid,
                    gid: e.stat.gid,
                })
                .collect())
        })
        .await?
    }

    /// Removes `path` of sandbox `id` (folders with `recursive`).
    pub async fn remove_path(
        self: &Arc<Self>,
        id: &str,
        path: String,
        recursive: bool,
    ) -> Result<(), DaemonError> {
        let client = self.sandbox(id)?.client()?;
        tokio::task::spawn_blocking(move || Ok(client.remove(&path, recursive)?)).await?
    }

    /// Sets sandbox `id` to be killed `timeout_s` from now.
    pub fn set_timeout(&self, id: &str, timeout_s: u64) -> Result<SandboxInfo, DaemonError> {
        if timeout_s == 0 || timeout_s > MAX_TIMEOUT_S {
            return Err(DaemonError::BadRequest(format!(
                "timeout_s {timeout_s} is outside 1..={MAX_TIMEOUT_S}"
            )));
        }
        let sb = self.sandbox(id)?;
        sb.live().expires_at = now_s() + timeout_s;
        self.save(&sb)?;
        Ok(sb.info())
    }

    /// Kills sandbox `id`: its VM ends, its folder and record go.
    pub async fn kill(self: &Arc<Self>, id: &str) -> Result<(), DaemonError> {
        let sb = self.sandbox(id)?;
        let (vm, memory_from) = {
            let mut live = sb.live();
            live.client = None;
            (live.vm.take(), live.memory_from.clone())
        };
        let dir = sb.dir.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(mut vm) = vm {
                vm.kill();
            }
            let _ = std::fs::remove_dir_all(&dir);
        })
        .await?;
        // Gone from the API only once its VM is: whoever sees it gone (after DELETE, or by
        // polling an expiry) finds no VMM left either.
        self.sandboxes().remove(id);
        self.db().remove_sandbox(id)?;
        self.release_memory_source(&memory_from)?;
        self.release_unnamed_snapshot(&sb.template_id)?;
        tracing::info!(sandbox = %id, "killed");
        Ok(())
    }

    /// Removes a fork snapshot once no sandbox maps its memory any more.
    pub fn release_memory_source(&self, dir: &Path) -> Result<(), DaemonError> {
        if !dir.starts_with(self.cfg.forks_dir()) {
            return Ok(());
        }
        if self.db().memory_users(&dir.display().to_string())? == 0 {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(())
    }

    /// Kills every sandbox past its lifetime; returns their ids.
    pub async fn sweep_expired(self: &Arc<Self>) -> Vec<String> {
        let now = now_s();
        let expired: Vec<String> = self
            .all_sandboxes()
            .into_iter()
            // A paused sandbox's clock stands still (see `pause`): only running ones expire.
            .filter(|s| {
                let live = s.live();
                live.state == SandboxState::Running && live.expires_at <= now
            })
            .map(|s| s.id.clone())
            .collect();
        for id in &expired {
            if let Err(e) = self.kill(id).await {
                tracing::warn!(sandbox = %id, "killing it at its expiry failed: {e}");
            }
        }
        expired
    }

    /// Pauses sandbox `id` to disk: a Full snapshot in its folder, then its VM ends and its
    /// memory is freed.
    pub async fn pause(self: &Arc<Self>, id: &str) -> Result<SandboxInfo, DaemonError> {
        let sb = self.sandbox(id)?;
        let vm = {
            let mut live = sb.live();
            if live.state == SandboxState::Paused {
                return Ok(drop_live(live, &sb));
            }
            live.client = None;
            live.vm.take()
        };
        let Some(mut vm) = vm else {
            return Err(DaemonError::Conflict(format!("sandbox {id} has no VM")));
        };
        // Its ports close with its VM (and its network); resume opens them on these again.
        sb.live().ports = vm.net().published().to_vec();
        let snap = TemplateFiles::in_dir(&sb.dir.join("paused"));
        let result = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&snap.dir).map_err(|e| DaemonError::Internal(e.to_string()))?;
            vm.pause()?;
            vm.snapshot(&snap)?;
            vm.kill();
            Ok::<_, DaemonError>(snap.dir)
        })
        .await?;
        let old_source = sb.live().memory_from.clone();
        match result {
            Ok(dir) => {
                {
                    // While paused, `expires_at` holds the lifetime left (resume adds it to now).
                    let mut live = sb.live();
                    live.state = SandboxState::Paused;
                    live.memory_from = dir;
                    live.expires_at = live.expires_at.saturating_sub(now_s()).max(1);
                }
                self.save(&sb)?;
                self.release_memory_source(&old_source)?;
                tracing::info!(sandbox = %id, "paused to disk");
                Ok(sb.info())
            }
            Err(e) => {
                // The VM was told to pause and may be gone: the sandbox cannot go on.
                let _ = self.kill(id).await;
                Err(DaemonError::Vm(format!(
                    "pausing sandbox {id} failed, so it was killed: {e}"
                )))
            }
        }
    }

    /// Resumes a paused sandbox: its snapshot is restored into a new VM, with the clone step
    /// (the clock is the host's again).
    pub async fn resume(self: &Arc<Self>, id: &str) -> Result<SandboxInfo, DaemonError> {
        let sb = self.sandbox(id)?;
        if sb.live().state == SandboxState::Running {
            return Ok(sb.info());
        }
        let starting = self.start_vm(sb.spec.mem_mib)?;
        let from = TemplateFiles::in_dir(&sb.live().memory_from.clone());
        let (vmm, dir, env) = (self.cfg.inputs.vmm.clone(), sb.dir.clone(), sb.full_env());
        let limits = crate::template::build::limits(&sb.spec);
        self.check_net(&sb.template_name, sb.net.nic, &sb.net.policy)?;
        let (sb2, id2) = (sb.clone(), id.to_string());
        let ports = sb.live().ports.clone();
        // The folder holds the paused snapshot: it stays whatever happens. The sandbox gets a
        // new network with its policy, and its ports on the host ports they had where free.
        let (vm, client) = tokio::task::spawn_blocking(move || {
            let net = super::create::vm_net(&id2, sb2.net.nic, &sb2.net.policy)?;
            let (mut vm, client) =
                super::create::restore_cloned(&vmm, &dir, &from, limits, env, net)?;
            vm.publish(&sb2.net.publish, &ports)?;
            Ok::<_, DaemonError>((vm, client))
        })
        .await??;
        {
            let mut live = sb.live();
            live.vm = Some(vm);
            live.client = Some(client);
            live.state = SandboxState::Running;
            live.expires_at += now_s();
        }
        drop(starting);
        self.save(&sb)?;
        tracing::info!(sandbox = %id, "resumed");
        Ok(sb.info())
    }

    /// Forks sandbox `id` into `count` new sandboxes: its vCPUs pause, its memory and state go
    /// to a fork snapshot, it runs on, and each fork is restored from the snapshot with its own
    /// clone step (its own entropy), the original's environment and labels.
    pub async fn fork(
        self: &Arc<Self>,
        id: &str,
        count: u32,
    ) -> Result<Vec<SandboxInfo>, DaemonError> {
        if !(1..=16).contains(&count) {
            return Err(DaemonError::BadRequest(format!(
                "count {count} is outside 1..=16"
            )));
        }
        let sb = self.sandbox(id)?;
        self.check_net(&sb.template_name, sb.net.nic, &sb.net.policy)?;
        let mut guards = Vec::new();
        for _ in 0..count {
            guards.push(self.start_vm(sb.spec.mem_mib)?);
        }
        let snap = TemplateFiles::in_dir(&self.cfg.forks_dir().join(super::new_id()));
        let vm = sb.live().vm.take().ok_or_else(|| {
            DaemonError::Conflict(format!("sandbox {id} is paused; resume it first"))
        })?;
        let snap2 = snap.clone();
        let (vm, taken) =
            tokio::task::spawn_blocking(move || super::snapshot::checkpoint(vm, &snap2)).await?;
        sb.live().vm = Some(vm);
        match taken {
            Ok(client) => sb.live().client = Some(client),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&snap.dir);
                return Err(e);
            }
        }
        // The forks restore side by side: each is a process of its own waiting on its guest, and
        // one after another they took count times as long.
        // Each fork has a network of its own with the original's policy, and publishes the same
        // guest ports on host ports of its own (the original keeps the ones it asked for).
        let fork_net = NetRecord {
            publish: sb
                .net
                .publish
                .iter()
                .map(|p| PortRequest {
                    host_port: None,
                    ..*p
                })
                .collect(),
            ports: Vec::new(),
            ..sb.net.clone()
        };
        let restores: Vec<_> = (0..count)
            .map(|_| {
                let fork_id = super::new_id();
                let (vmm, dir, env, from) = (
                    self.cfg.inputs.vmm.clone(),
                    self.cfg.sandboxes_dir().join(&fork_id),
                    sb.full_env(),
                    snap.clone(),
                );
                let limits = crate::template::build::limits(&sb.spec);
                let (net, id) = (fork_net.clone(), fork_id.clone());
                tokio::task::spawn_blocking(move || {
                    let made = super::create::vm_net(&id, net.nic, &net.policy)
                        .and_then(|vm_net| {
                            super::create::restore_cloned(&vmm, &dir, &from, limits, env, vm_net)
                        })
                        .and_then(|(mut vm, client)| {
                            vm.publish(&net.publish, &[])?;
                            Ok((vm, client))
                        });
                    if made.is_err() {
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                    (fork_id, dir, made)
                })
            })
            .collect();
        let mut made = Vec::new();
        let mut failed = None;
        for r in restores {
            match r.await {
                Ok((fork_id, dir, Ok(v))) => made.push((fork_id, dir, v)),
                Ok((_, _, Err(e))) => failed = failed.or(Some(e)),
                Err(e) => failed = failed.or(Some(e.into())),
            }
        }
        if let Some(e) = failed {
            // All or none: the forks that did come up are killed with their folders.
            for (_, dir, vm) in made {
                drop(vm);
                let _ = std::fs::remove_dir_all(&dir);
            }
            self.release_memory_source(&snap.dir)?;
            return Err(e);
        }
        let mut forks = Vec::new();
        for (fork_id, _, (vm, client)) in made {
            let now = now_s();
            let expires = sb.live().expires_at;
            let f = Arc::new(Sandbox::new(
                fork_id.clone(),
                sb.template_id.clone(),
                sb.template_name.clone(),
                sb.spec.clone(),
                now,
                sb.env.clone(),
                sb.metadata.clone(),
                vm.dir.clone(),
                fork_net.clone(),
                super::sandbox::Live {
                    state: SandboxState::Running,
                    vm: Some(vm),
                    client: Some(client),
                    expires_at: expires,
                    exec_count: 0,
                    memory_from: snap.dir.clone(),
                    ports: Vec::new(),
                },
            ));
            self.sandboxes().insert(fork_id.clone(), f.clone());
            self.save(&f)?;
            forks.push(f.info());
        }
        drop(guards);
        tracing::info!(sandbox = %id, count, "forked");
        Ok(forks)
    }
}

fn drop_live(live: std::sync::MutexGuard<'_, super::sandbox::Live>, sb: &Sandbox) -> SandboxInfo {
    drop(live);
    sb.info()
}
