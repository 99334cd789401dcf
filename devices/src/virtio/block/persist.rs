//! The block device's snapshot state: which file backs it, and its copy-on-write overlay if it
//! has one (the base is checked to be the same size on restore, so a swapped disk is noticed),
//! and the common virtio state. A restore may point the drive at other files (each clone of a
//! snapshot needs its own overlay); the overlay's own data is its state, so nothing else is
//! saved for it. The I/O engine comes from the drive's configuration (saved with the snapshot);
//! requests in flight on an `Async` drive are finished before it is saved
//! ([`Block::complete_in_flight`]), so none is lost.

use std::path::PathBuf;

use kiln_snapshot::Persist;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::device::Block;
use super::{BlockConfig, BlockError};
use crate::virtio::GuestMemoryMmap;
use crate::virtio::persist::{VirtioState, restore_virtio, save_virtio};

/// A drive as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The drive id.
    pub id: String,
    /// The backing file (with an overlay, the read-only base).
    pub path: PathBuf,
    /// The copy-on-write overlay over `path`, if the drive has one.
    pub cow_overlay_path: Option<PathBuf>,
    /// The drive refused writes.
    pub read_only: bool,
    /// The usable size of the backing file, in bytes.
    pub disk_size: u64,
    /// Features, interrupt and queues.
    pub virtio: VirtioState,
}

/// What restoring a drive needs besides its state.
pub struct BlockRestoreArgs {
    /// Guest memory, for re-activation.
    pub mem: GuestMemoryMmap,
    /// The interrupt eventfd (registered as an irqfd by the VMM).
    pub irqfd: EventFd,
    /// The drive's rate limits (from its configuration; buckets start full).
    pub rate_limiter: crate::rate_limiter::RateLimiterConfig,
    /// Use this backing file (or base) instead of the saved one.
    pub path_override: Option<PathBuf>,
    /// Use this overlay instead of the saved one (only for a drive saved with an overlay).
    pub cow_overlay_override: Option<PathBuf>,
    /// The drive's I/O engine (from its configuration, saved beside the state).
    pub io_engine: super::IoEngine,
}

impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = BlockRestoreArgs;
    type Error = BlockError;

    fn save(&self) -> BlockState {
        BlockState {
            id: self.config.id.clone(),
            path: self.config.path.clone(),
            cow_overlay_path: self.config.cow_overlay.clone(),
            read_only: self.config.read_only,
            disk_size: self.disk.size,
            virtio: save_virtio(self),
        }
    }

    fn restore(args: BlockRestoreArgs, state: &BlockState) -> Result<Self, BlockError> {
        if let (Some(o), None) = (&args.cow_overlay_override, &state.cow_overlay_path) {
            return Err(BlockError::Restore {
                id: state.id.clone(),
                why: format!(
                    "cow_overlay_path {}: the drive was saved without a copy-on-write overlay",
                    o.display()
                ),
            });
        }
        let path = args.path_override.unwrap_or_else(|| state.path.clone());
        let config = BlockConfig {
            id: state.id.clone(),
            path: path.clone(),
            cow_overlay: args
                .cow_overlay_override
                .or_else(|| state.cow_overlay_path.clone()),
            read_only: state.read_only,
            rate_limiter: args.rate_limiter,
            io_engine: args.io_engine,
        };
        let mut block = Block::new(config, args.irqfd)?;
        if block.disk.size != state.disk_size {
            return Err(BlockError::Restore {
                id: state.id.clone(),
                why: format!(
                    "{} is {} bytes; the snapshot was taken with {} bytes",
                    path.display(),
                    block.disk.size,
                    state.disk_size
                ),
            });
        }
        restore_virtio(&mut block, &args.mem, &state.virtio).map_err(|e| BlockError::Restore {
            id: state.id.clone(),
            why: e.to_string(),
        })?;
        Ok(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::VirtioDevice;
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    fn disk(name: &str, len: u64) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("kiln-blk-persist-{}-{name}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        path
    }

    fn evt() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn an_active_drive_round_trips_and_a_resized_disk_is_refused() {
        let path = disk("rt", 4096);
        let cfg = BlockConfig {
            id: "data".into(),
            path: path.clone(),
            cow_overlay: None,
            read_only: true,
            rate_limiter: Default::default(),
            io_engine: Default::default(),
        };
        let mut block = Block::new(cfg, evt()).unwrap();
        block.set_acked_features(block.avail_features());
        let mut q = crate::virtio::Queue::new(256).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        q.set_ready(true);
        q.set_next_avail(7);
        q.set_next_used(7);
        block.activate(mem(), vec![q]).unwrap();
        let state = block.save();
        assert!(state.read_only);
        assert_eq!(state.disk_size, 4096);

        let args = || BlockRestoreArgs {
            mem: mem(),
            irqfd: evt(),
            rate_limiter: Default::default(),
            path_override: None,
            cow_overlay_override: None,
            io_engine: Default::default(),
        };
        let restored = Block::restore(args(), &state).unwrap();
        assert_eq!(restored.save(), state);
        assert_eq!(restored.active_queues()[0].next_avail(), 7);

        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(8192)
            .unwrap();
        let e = Block::restore(args(), &state).err().unwrap();
        assert!(
            e.to_string().starts_with("drive data: cannot restore: ")
                && e.to_string()
                    .contains("is 8192 bytes; the snapshot was taken with 4096"),
            "{e}"
        );
        std::fs::remove_file(&path).unwrap();
        let e = Block::restore(args(), &state).err().unwrap();
        assert!(e.to_string().contains("cannot open"), "{e}");
    }
}
