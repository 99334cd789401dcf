//! What [`super::Program::BlkFlood`]'s reads brought in, read from a full snapshot's memory file.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{ApiVmm, FLOOD_BUF, FLOOD_READ, FLOOD_STATUSES, FLOOD_USED_IDX};

/// Pauses, snapshots to `dir/name.*` (Full) and reads back what the guest's reads brought in.
pub fn pause_and_look(vmm: &ApiVmm, dir: &Path, name: &str) -> (PathBuf, PathBuf, Served) {
    vmm.success("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (state, mem) = vmm.snapshot(dir, name, "Full");
    let served = Served::from(&mem);
    (state, mem, served)
}

/// Lets the flood guest run 300 ms at a time and looks again (`dir/clone<N>.*`) until its
/// buffer holds only `byte`: a round of reads served from the disk it now has (the guest re-reads
/// the same 4 MiB forever). Panics with `what` if that takes longer than `limit`; returns what the
/// last look saw, the VM paused.
pub fn wait_for_reads_of(
    vmm: &ApiVmm,
    dir: &Path,
    byte: u8,
    limit: Duration,
    what: &str,
) -> Served {
    let start = Instant::now();
    for round in 0.. {
        std::thread::sleep(Duration::from_millis(300));
        let (_, _, served) = pause_and_look(vmm, dir, &format!("clone{round}"));
        if served.buffer.iter().all(|&b| b == byte) {
            return served;
        }
        assert!(start.elapsed() < limit, "{what}");
        vmm.success("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    }
    unreachable!("the rounds never end")
}

/// What a snapshot's memory shows of the flood guest's reads.
pub struct Served {
    /// The used ring's index: requests the device finished.
    pub used: u16,
    /// The 64 requests' status bytes.
    pub statuses: Vec<u8>,
    /// The buffer every request reads into.
    pub buffer: Vec<u8>,
}

impl Served {
    /// Reads them from the memory file `mem`.
    pub fn from(mem: &Path) -> Self {
        let f = std::fs::File::open(mem).unwrap();
        let read = |addr: u64, len: usize| {
            let mut b = vec![0u8; len];
            f.read_exact_at(&mut b, addr).unwrap();
            b
        };
        Served {
            used: u16::from_le_bytes(read(u64::from(FLOOD_USED_IDX), 2).try_into().unwrap()),
            statuses: read(u64::from(FLOOD_STATUSES), 64),
            buffer: read(u64::from(FLOOD_BUF), FLOOD_READ as usize),
        }
    }
}
