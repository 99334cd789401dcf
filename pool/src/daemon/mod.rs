//! The daemon's state and operations: templates ([`templates`]), sandboxes created from them
//! ([`create`]) and what is done with them ([`ops`]), snapshots kept as templates
//! ([`snapshot`]), warm pools ([`pool`]), host limits ([`limits`]), and recovery after a restart
//! ([`recover`]). Everything that drives a VM or the agent blocks, so it runs on tokio's
//! blocking threads; the locks here are held only briefly.

pub mod create;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod ops;
pub mod pool;
pub mod recover;
pub mod sandbox;
pub mod snapshot;
pub mod templates;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use error::DaemonError;
use sandbox::Sandbox;

use crate::db::Db;
use crate::template::Inputs;

/// How kilnd runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Everything kilnd keeps: the database, templates, sandboxes' folders.
    pub state_dir: PathBuf,
    /// The VMM, kernel, agent and image folders builds and sandboxes use.
    pub inputs: Inputs,
    /// A sandbox's lifetime when its request names none, seconds.
    pub default_timeout_s: u64,
    /// Most VMs at once (sandboxes and warm ones); 0: no limit.
    pub max_vms: u32,
    /// Most guest memory at once, MiB, summed over VMs; 0: no limit.
    pub max_memory_mib: u64,
    /// Warm VMs restored at once by the pool fillers.
    pub refill_concurrency: usize,
}

impl Config {
    /// The database file.
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("kilnd.db")
    }

    /// Where templates are stored.
    pub fn templates_dir(&self) -> PathBuf {
        self.state_dir.join("templates")
    }

    /// Where sandboxes (and warm VMs) have their folders.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.state_dir.join("sandboxes")
    }

    /// Where fork snapshots are kept while their clones run.
    pub fn forks_dir(&self) -> PathBuf {
        self.state_dir.join("forks")
    }
}

/// A warm VM: restored from a template, resumed, its agent connected, its clone step done with
/// the template's environment.
pub struct Warm {
    /// The id it will have as a sandbox (its folder is named by it).
    pub id: String,
    /// The VM.
    pub vm: crate::vm::VmProcess,
    /// Its agent.
    pub client: kiln_agent::client::Client,
}

/// The daemon.
pub struct Daemon {
    /// Its configuration.
    pub cfg: Config,
    db: Mutex<Db>,
    /// Template lookups, valid while the database's templates version stays.
    template_cache: Mutex<create::TemplateCache>,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    warm: Mutex<HashMap<String, VecDeque<Warm>>>,
    /// Warm VMs being made, per template id.
    filling: Mutex<HashMap<String, usize>>,
    /// Whether a hand-out holds the pools' filler.
    refill_hold: Mutex<pool::RefillHold>,
    /// VMs and memory handed out or being started (see [`limits`]).
    reserved: Mutex<limits::Reserved>,
    /// One build at a time per template key.
    builds: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Seconds since the epoch.
pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A new sandbox id: 20 lowercase letters and digits from the host's RNG.
pub fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let bytes = kiln_agent::client::host_entropy(20).unwrap_or_else(|_| {
        // getrandom cannot fail once the host's RNG is seeded; the clock is a last resort.
        let n = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        n.to_le_bytes().iter().cycle().take(20).copied().collect()
    });
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

impl Daemon {
    /// Opens the state folder and the database. Call [`Daemon::recover`] before serving.
    pub fn open(cfg: Config) -> Result<Arc<Daemon>, DaemonError> {
        for dir in [
            cfg.state_dir.clone(),
            cfg.templates_dir(),
            cfg.sandboxes_dir(),
            cfg.forks_dir(),
        ] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| DaemonError::Internal(format!("{}: {e}", dir.display())))?;
        }
        let db = Db::open(&cfg.db_path())?;
        Ok(Arc::new(Daemon {
            cfg,
            db: Mutex::new(db),
            template_cache: Mutex::new(create::TemplateCache::default()),
            sandboxes: Mutex::new(HashMap::new()),
            warm: Mutex::new(HashMap::new()),
            filling: Mutex::new(HashMap::new()),
            refill_hold: Mutex::new(pool::RefillHold::default()),
            reserved: Mutex::new(limits::Reserved::default()),
            builds: Mutex::new(HashMap::new()),
        }))
    }

    /// The database, locked (queries are quick; never hold this across a VM operation).
    pub fn db(&self) -> MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sandboxes(&self) -> MutexGuard<'_, HashMap<String, Arc<Sandbox>>> {
        self.sandboxes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn warm(&self) -> MutexGuard<'_, HashMap<String, VecDeque<Warm>>> {
        self.warm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sandbox `id`.
    pub fn sandbox(&self, id: &str) -> Result<Arc<Sandbox>, DaemonError> {
        self.sandboxes()
            .get(id)
            .cloned()
            .ok_or_else(|| DaemonError::NotFound(format!("no sandbox {id}")))
    }

    /// Every sandbox.
    pub fn all_sandboxes(&self) -> Vec<Arc<Sandbox>> {
        let mut all: Vec<Arc<Sandbox>> = self.sandboxes().values().cloned().collect();
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        all
    }

    /// Warm VMs ready for template `id`.
    pub fn warm_count(&self, template_id: &str) -> usize {
        self.warm().get(template_id).map_or(0, VecDeque::len)
    }

    /// Saves a sandbox's record.
    pub fn save(&self, sb: &Sandbox) -> Result<(), DaemonError> {
        let row = sb.row();
        self.db().put_sandbox(&row)?;
        Ok(())
    }
}
