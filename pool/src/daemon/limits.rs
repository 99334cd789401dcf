//! Host-wide limits on VMs and guest memory. What is in use is counted from the daemon's state
//! (running sandboxes and warm VMs) plus the VMs being started right now, which hold a
//! [`Starting`] guard until they are registered or have failed. A start that would go over a
//! limit is refused with a 429 that says which limit, never overcommitted silently.

use std::sync::Arc;

use super::Daemon;
use super::error::DaemonError;

/// VMs being started and their memory.
#[derive(Debug, Default)]
pub struct Reserved {
    vms: u32,
    mib: u64,
}

/// A VM being started: counted against the limits until dropped.
pub struct Starting {
    daemon: Arc<Daemon>,
    mib: u64,
}

impl Drop for Starting {
    fn drop(&mut self) {
        let mut r = self
            .daemon
            .reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        r.vms = r.vms.saturating_sub(1);
        r.mib = r.mib.saturating_sub(self.mib);
    }
}

impl Daemon {
    /// VMs alive now (running sandboxes and warm VMs) and their memory, MiB.
    pub fn in_use(&self) -> (u32, u64) {
        let mut vms = 0;
        let mut mib = 0;
        for sb in self.sandboxes().values() {
            if sb.live().vm.is_some() {
                vms += 1;
                mib += u64::from(sb.spec.mem_mib);
            }
        }
        // Warm VMs: each template's memory times its count.
        let warm = self.warm();
        for (template, list) in warm.iter() {
            let mem = list
                .front()
                .map(|_| self.template_mem(template))
                .unwrap_or(0);
            vms += list.len() as u32;
            mib += mem * list.len() as u64;
        }
        (vms, mib)
    }

    fn template_mem(&self, template_id: &str) -> u64 {
        self.db()
            .template(template_id)
            .ok()
            .flatten()
            .and_then(|(t, _, _)| serde_json::from_str::<serde_json::Value>(&t.spec_json).ok())
            .and_then(|v| v["mem_mib"].as_u64())
            .unwrap_or(0)
    }

    /// Counts one more VM of `mib` MiB, or refuses when a host limit would be exceeded.
    pub fn start_vm(self: &Arc<Self>, mib: u32) -> Result<Starting, DaemonError> {
        let (vms, used) = self.in_use();
        let mut r = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let (vms, used) = (vms + r.vms, used + r.mib);
        let max_vms = self.cfg.max_vms;
        if max_vms > 0 && vms >= max_vms {
            return Err(DaemonError::Limit(format!(
                "host limit reached: {vms} of {max_vms} VMs are running (kilnd --max-vms)"
            )));
        }
        let max_mib = self.cfg.max_memory_mib;
        if max_mib > 0 && used + u64::from(mib) > max_mib {
            return Err(DaemonError::Limit(format!(
                "host limit reached: {used} MiB of {max_mib} MiB of guest memory are in use and \
                 this sandbox needs {mib} MiB (kilnd --max-memory-mib)"
            )));
        }
        r.vms += 1;
        r.mib += u64::from(mib);
        Ok(Starting {
            daemon: self.clone(),
            mib: u64::from(mib),
        })
    }
}
