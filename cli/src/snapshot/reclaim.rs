//! `kiln snapshot create --reclaim UDS`: before the VM is paused, its guest drops its clean caches
//! and compacts its free memory (through the agent behind the vsock socket UDS), and free page
//! reporting hands what that freed back to the host, so the snapshot leaves it out.
//!
//! What it costs: the guest's page cache is gone (files are read from the disk again after the
//! restore) and compaction moves pages (a few hundred ms in a small guest under the lab's
//! emulation); then [`REPORTING_WAIT`], since the guest reports free memory at most every 2 s.
//! What it buys depends on how much cache the guest held: a guest that just ran a workload and
//! freed its memory has little left to drop.

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_agent::client::wait_ready;
use kiln_agent::protocol::{ExecSpec, ExitStatus};

/// How long to wait after compaction for the guest's reports (Linux reports free memory 2 s
/// after it was freed, `PAGE_REPORTING_DELAY`) to reach the host.
pub const REPORTING_WAIT: Duration = Duration::from_millis(3000);
/// How long the agent may take to answer and the guest to drop and compact.
const AGENT_LIMIT: Duration = Duration::from_secs(60);
/// Writes back dirty pages (so the cache can go), drops clean caches, compacts where the kernel
/// can (Kiln's can; others may lack `compact_memory`).
const SCRIPT: &str = "sync && echo 3 > /proc/sys/vm/drop_caches && \
    if [ -w /proc/sys/vm/compact_memory ]; then echo 1 > /proc/sys/vm/compact_memory; fi";

/// Asks the guest behind `uds` to drop its caches and compact, then waits for its reports;
/// returns how long the guest took (without the wait).
pub fn reclaim(uds: &Path) -> Result<Duration, String> {
    let start = Instant::now();
    let client = wait_ready(uds, start + AGENT_LIMIT).map_err(|e| {
        format!(
            "--reclaim: the agent at {} did not answer: {e}",
            uds.display()
        )
    })?;
    let out = client
        .run(ExecSpec::new(["sh", "-c", SCRIPT]))
        .map_err(|e| format!("--reclaim: dropping the guest's caches: {e}"))?;
    if out.status != ExitStatus::Exited(0) {
        return Err(format!(
            "--reclaim: dropping the guest's caches ended with {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let took = start.elapsed();
    std::thread::sleep(REPORTING_WAIT);
    Ok(took)
}
