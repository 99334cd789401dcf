//! Warm pools: for each template with `min_ready` > 0, VMs restored ahead, resumed, their agent
//! connected and their clone step done (fresh entropy, the host's clock, the template's
//! environment: each is unique from then on, and a VM's clock keeps time while it waits),
//! waiting for a create to hand them out without another round trip to the guest. A filler
//! tops each pool up in the background, a bounded number of restores at a time, within the host
//! limits (a full host leaves pools short rather than refusing sandboxes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::create::{restore_cloned, vm_net};
use super::{Daemon, Warm, new_id};
use crate::template::spec::Spec;

/// How often the filler looks at the pools.
const FILL_EVERY: Duration = Duration::from_millis(250);
/// How long after a warm VM is handed out the filler waits before it restores another: the
/// sandbox's first command gets the host's CPU, not a restore that starts the same moment
/// (on a small host, one whose CPUs the refill takes, that doubled or tripled create -> first
/// result). A streak of creates holds the filler at most this long from its first.
const REFILL_HOLD: Duration = Duration::from_secs(1);

pub use crate::types::{WARM_UP, WARM_UP_RUNS};
/// How long the warm-up may take.
const WARM_UP_LIMIT: Duration = Duration::from_secs(30);

/// Until when the filler starts no restore: [`REFILL_HOLD`] from a hand-out, not extended by
/// the hand-outs within it.
#[derive(Debug, Default)]
pub(super) struct RefillHold(Option<Instant>);

impl RefillHold {
    /// A warm VM was handed out at `now`.
    fn hold(&mut self, now: Instant) {
        if self.0.is_none_or(|until| until <= now) {
            self.0 = Some(now + REFILL_HOLD);
        }
    }

    /// Whether the filler waits at `now`.
    fn held(&self, now: Instant) -> bool {
        self.0.is_some_and(|until| now < until)
    }
}

impl Daemon {
    /// Templates whose pool is short: (template id, memory, how many more to start).
    fn short_pools(&self) -> Vec<(String, u32, usize)> {
        let templates = match self.db().templates() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("pool filler: {e}");
                return Vec::new();
            }
        };
        let filling = self.filling.lock().unwrap_or_else(|p| p.into_inner());
        templates
            .into_iter()
            .filter(|t| t.min_ready > 0)
            .filter_map(|t| {
                let have = self.warm_count(&t.id) + filling.get(&t.id).copied().unwrap_or(0);
                let want = t.min_ready as usize;
                (have < want).then(|| (t.id, t.mem_mib, want - have))
            })
            .collect()
    }

    /// Holds the filler (a warm VM was just handed out).
    pub(super) fn hold_refills(&self) {
        let mut hold = self.refill_hold.lock().unwrap_or_else(|p| p.into_inner());
        hold.hold(Instant::now());
    }

    fn refills_held(&self) -> bool {
        let hold = self.refill_hold.lock().unwrap_or_else(|p| p.into_inner());
        hold.held(Instant::now())
    }

    fn filling_total(&self) -> usize {
        self.filling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }

    /// Starts one warm VM of template `id` in the background, if the host has room.
    fn start_warm(self: &Arc<Self>, template_id: String, mem_mib: u32) -> bool {
        let Ok(starting) = self.start_vm(mem_mib) else {
            return false;
        };
        *self
            .filling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(template_id.clone())
            .or_default() += 1;
        let d = self.clone();
        tokio::spawn(async move {
            let (spec, files) = match d.template_parts(&template_id) {
                Ok((_, _, spec, files, _)) => (spec, files),
                Err(e) => {
                    tracing::warn!(template = %template_id, "pool: {e}");
                    d.done_filling(&template_id);
                    return;
                }
            };
            let limits = crate::jail::Limits {
                background: true,
                ..crate::template::build::limits(&spec)
            };
            let env = crate::template::build::sandbox_env(&spec, &Default::default());
            let policy = spec.network.clone();
            // A template this kilnd cannot restore (one with an interface under --no-net) gets
            // no warm VMs; its creates say why.
            if let Err(e) = d.check_net(&template_id, files.has_nic(), &policy) {
                tracing::debug!(template = %template_id, "pool: {e}");
                d.done_filling(&template_id);
                return;
            }
            let id = new_id();
            let (vmm, dir) = (d.cfg.inputs.vmm.clone(), d.cfg.sandboxes_dir().join(&id));
            let id2 = id.clone();
            let made = tokio::task::spawn_blocking(move || {
                // A warm VM has the template's default network policy (a create asking for
                // another is restored on demand instead).
                let made = vm_net(&id2, files.has_nic(), &policy)
                    .and_then(|net| restore_cloned(&vmm, &dir, &files, limits, env, net));
                match &made {
                    Ok((_, client)) => warm_up(client, &spec),
                    Err(_) => {
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                }
                made
            })
            .await;
            match made {
                Ok(Ok((vm, client))) => {
                    let pid = vm.pid();
                    d.record_warm(&id, &template_id, pid);
                    d.warm()
                        .entry(template_id.clone())
                        .or_default()
                        .push_back(Warm { id, vm, client });
                }
                Ok(Err(e)) => {
                    tracing::warn!(template = %template_id, "pool: a warm VM failed: {e}")
                }
                Err(e) => tracing::warn!(template = %template_id, "pool: {e}"),
            }
            drop(starting);
            d.done_filling(&template_id);
        });
        true
    }

    fn done_filling(&self, template_id: &str) {
        let mut f = self.filling.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = f.get_mut(template_id) {
            *n = n.saturating_sub(1);
        }
    }

    /// Records a warm VM, so a daemon killed before handing it out cleans it up on restart.
    fn record_warm(&self, id: &str, template_id: &str, pid: u32) {
        let row = crate::db::SandboxRow {
            id: id.into(),
            template_id: template_id.into(),
            template_name: String::new(),
            state: "warm".into(),
            created_at: super::now_s(),
            expires_at: 0,
            env_json: "{}".into(),
            metadata_json: "{}".into(),
            vcpus: 0,
            mem_mib: 0,
            exec_count: 0,
            vmm_pid: Some(pid),
            vmm_start: crate::vm::start_ticks(pid),
            dir: self.cfg.sandboxes_dir().join(id).display().to_string(),
            memory_from: String::new(),
            network_json: String::new(),
        };
        if let Err(e) = self.db().put_sandbox(&row) {
            tracing::warn!("pool: recording a warm VM: {e}");
        }
    }

    /// Stops every warm VM and forgets it (the daemon is stopping; its sandboxes end as it drops
    /// them).
    pub async fn stop_warm(self: &Arc<Self>) {
        let all: Vec<Warm> = self.warm().drain().flat_map(|(_, v)| v).collect();
        let d = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for mut w in all {
                w.vm.kill();
                let _ = std::fs::remove_dir_all(&w.vm.dir);
                let _ = d.db().remove_sandbox(&w.id);
            }
        })
        .await;
    }

    /// Tops the pools up, forever; each pass starts at most the free share of
    /// `refill_concurrency` restores, and none while a hand-out holds the filler.
    pub async fn fill_pools(self: Arc<Self>) {
        loop {
            let pools = match self.refills_held() {
                true => Vec::new(),
                false => self.short_pools(),
            };
            for (template_id, mem, missing) in pools {
                for _ in 0..missing {
                    if self.filling_total() >= self.cfg.refill_concurrency.max(1) {
                        break;
                    }
                    if !self.start_warm(template_id.clone(), mem) {
                        break;
                    }
                }
            }
            tokio::time::sleep(FILL_EVERY).await;
        }
    }
}

/// Runs [`WARM_UP`] [`WARM_UP_RUNS`] times in a warm VM of `spec`, in its working directory and
/// as its user, as a sandbox's commands run; a failure only means the first command will not
/// have all of it.
pub(crate) fn warm_up(client: &kiln_agent::client::Client, spec: &Spec) {
    for argv in std::iter::repeat_n(WARM_UP, WARM_UP_RUNS).flatten() {
        let mut exec = kiln_agent::protocol::ExecSpec::new(argv.iter().copied());
        exec.timeout_ms = Some(WARM_UP_LIMIT.as_millis() as u64);
        exec.cwd = spec.workdir.clone();
        exec.user = spec.user.clone();
        let failed = match client.run(exec) {
            Ok(out) if out.status == kiln_agent::protocol::ExitStatus::Exited(0) => continue,
            Ok(out) => format!("ended with {:?}", out.status),
            Err(e) => format!("failed: {e}"),
        };
        tracing::debug!("pool: the warm-up {argv:?} {failed}");
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_out_holds_refills_for_a_while_and_a_streak_does_not_extend_it() {
        let t0 = Instant::now();
        let mut hold = RefillHold::default();
        assert!(!hold.held(t0), "nothing handed out yet");
        hold.hold(t0);
        assert!(hold.held(t0 + REFILL_HOLD / 2));
        hold.hold(t0 + REFILL_HOLD / 2);
        assert!(
            !hold.held(t0 + REFILL_HOLD),
            "a second hand-out within the hold does not extend it"
        );
        let later = t0 + REFILL_HOLD * 2;
        hold.hold(later);
        assert!(hold.held(later + REFILL_HOLD / 2));
        assert!(!hold.held(later + REFILL_HOLD));
    }
}
