//! Host memory of a VM's process, as the balloon tests and `kiln-lab-bench memory` measure it:
//! its resident set from `/proc/PID/status` and, for kiln-vmm, the blocks its guest memory memfd
//! holds (a booted Kiln VM's guest memory is shared memfd memory: it shows as `RssShmem`, and only
//! holes punched in the memfd give it back).

use std::time::{Duration, Instant};

/// One look at a process's memory, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    /// VmRSS: everything resident.
    pub rss: u64,
    /// RssAnon: private anonymous memory (a restored VM's copies of the pages its guest wrote).
    pub anon: u64,
    /// RssFile: file pages mapped (a restored VM's pages still read from the memory file).
    pub file: u64,
    /// RssShmem: shared memory mapped (a booted Kiln VM's guest memory memfd).
    pub shmem: u64,
    /// Bytes allocated to kiln-vmm's guest memory memfd, when it has one.
    pub memfd: Option<u64>,
}

impl HostMemory {
    /// MiB, for messages.
    pub fn mib(bytes: u64) -> f64 {
        bytes as f64 / f64::from(1 << 20)
    }
}

impl std::fmt::Display for HostMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RSS {:.1} MiB (anon {:.1}, file {:.1}, shmem {:.1})",
            Self::mib(self.rss),
            Self::mib(self.anon),
            Self::mib(self.file),
            Self::mib(self.shmem)
        )?;
        if let Some(m) = self.memfd {
            write!(f, ", memfd {:.1} MiB", Self::mib(m))?;
        }
        Ok(())
    }
}

/// The name kiln-vmm gives its guest memory memfd (`/proc/PID/fd` shows `/memfd:NAME (deleted)`).
const MEMFD_NAME: &str = "/memfd:kiln-guest-mem";

/// Reads process `pid`'s memory.
pub fn host_memory(pid: u32) -> Result<HostMemory, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let field = |name: &str| -> Result<u64, String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .ok_or_else(|| format!("{path} has no {name} line"))
    };
    Ok(HostMemory {
        rss: field("VmRSS:")?,
        anon: field("RssAnon:")?,
        file: field("RssFile:")?,
        shmem: field("RssShmem:")?,
        memfd: memfd_bytes(pid),
    })
}

/// Bytes allocated to process `pid`'s guest memory memfd, if it has one.
fn memfd_bytes(pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    dir.flatten().find_map(|e| {
        let link = std::fs::read_link(e.path()).ok()?;
        link.to_string_lossy()
            .starts_with(MEMFD_NAME)
            .then(|| std::fs::metadata(e.path()).ok().map(|m| m.blocks() * 512))
            .flatten()
    })
}

/// Reads process `pid`'s memory until `done` holds or `limit` passes; returns the last reading
/// and how long it took (`None` if it never held).
pub fn wait_for_memory(
    pid: u32,
    limit: Duration,
    done: impl Fn(&HostMemory) -> bool,
) -> Result<(HostMemory, Option<Duration>), String> {
    let start = Instant::now();
    loop {
        let m = host_memory(pid)?;
        if done(&m) {
            return Ok((m, Some(start.elapsed())));
        }
        if start.elapsed() > limit {
            return Ok((m, None));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Reads process `pid`'s memory every 250 ms until two readings `window` apart differ by less
/// than `tolerance` bytes of `measure`, or `limit` passes: the guest has finished booting (or
/// reporting) and the host side is settled. Returns the last reading.
pub fn settled_memory(
    pid: u32,
    measure: impl Fn(&HostMemory) -> u64,
    window: Duration,
    tolerance: u64,
    limit: Duration,
) -> Result<HostMemory, String> {
    let start = Instant::now();
    let mut last = host_memory(pid)?;
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = host_memory(pid)?;
        if measure(&now).abs_diff(measure(&last)) > tolerance {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= window || start.elapsed() > limit {
            return Ok(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_measured() {
        let m = host_memory(std::process::id()).unwrap();
        assert!(m.rss > 0 && m.anon > 0, "{m}");
        assert_eq!(m.memfd, None, "no guest memory here");
        let (_, took) =
            wait_for_memory(std::process::id(), Duration::from_secs(1), |m| m.rss > 0).unwrap();
        assert!(took.is_some());
        assert!(host_memory(u32::MAX).is_err());
    }
}
