//! The balloon's snapshot state: its configuration (with the current target and statistics
//! interval), the size the guest reported, the latest statistics, the stats buffer the device
//! holds (so a restored device can still ask for new numbers), and the common virtio state.
//! Which pages are free is not the device's to save: freed pages are holes in the memory file.

use std::sync::Arc;

use kiln_snapshot::Persist;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::{Balloon, BalloonConfig, BalloonError, GuestPages, GuestStats};
use crate::virtio::GuestMemoryMmap;
use crate::virtio::persist::{VirtioState, restore_virtio, save_virtio};

/// The balloon as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// The configuration, with the target and statistics interval as they were.
    pub config: BalloonConfig,
    /// Guest memory, MiB (the bound on the target).
    pub mem_mib: u64,
    /// The balloon's size as the guest reported it, in pages.
    pub actual_pages: u32,
    /// The latest statistics.
    pub stats: GuestStats,
    /// The head of the stats buffer the device held.
    pub stats_desc: Option<u16>,
    /// Features, interrupt and queues.
    pub virtio: VirtioState,
}

/// What restoring the balloon needs besides its state.
pub struct BalloonRestoreArgs {
    /// Guest memory, for re-activation.
    pub mem: GuestMemoryMmap,
    /// The interrupt eventfd (registered as an irqfd by the VMM).
    pub irqfd: EventFd,
    /// Where discarded pages go.
    pub pages: Arc<dyn GuestPages>,
}

impl Persist for Balloon {
    type State = BalloonState;
    type ConstructorArgs = BalloonRestoreArgs;
    type Error = BalloonError;

    fn save(&self) -> BalloonState {
        BalloonState {
            config: self.config,
            mem_mib: self.mem_mib(),
            actual_pages: self.actual_pages,
            stats: self.stats.clone(),
            stats_desc: self.stats_desc,
            virtio: save_virtio(self),
        }
    }

    fn restore(args: BalloonRestoreArgs, state: &BalloonState) -> Result<Self, BalloonError> {
        let mut balloon = Balloon::new(state.config, state.mem_mib, args.pages, args.irqfd)?;
        if state.stats_desc.is_some() && balloon.index.stats.is_none() {
            return Err(BalloonError::Restore(
                "the snapshot holds a stats buffer but statistics are off".into(),
            ));
        }
        restore_virtio(&mut balloon, &args.mem, &state.virtio)
            .map_err(|e| BalloonError::Restore(e.to_string()))?;
        if let (Some(head), Some(q)) = (state.stats_desc, balloon.index.stats) {
            let size = balloon.active.as_ref().map(|a| {
                use virtio_queue::QueueT;
                a.queues[q].size()
            });
            if size.is_none_or(|size| head >= size) {
                return Err(BalloonError::Restore(format!(
                    "the held stats buffer {head} is not in the stats queue"
                )));
            }
        }
        balloon.actual_pages = state.actual_pages;
        balloon.stats = state.stats.clone();
        balloon.stats_desc = state.stats_desc;
        Ok(balloon)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::VirtioDevice;
    use crate::virtio::balloon::test_utils::{Recorder, TestGuest, config};
    use virtio_queue::QueueT;

    #[test]
    fn a_held_stats_buffer_and_the_target_survive_a_restore() {
        let mut g = TestGuest::new(config(12, true, 5, true));
        g.send_stats(&[(4, 1 << 20), (5, 2 << 20)]);
        g.dev().write_config(4, &77u32.to_le_bytes());
        let state = g.dev().save();
        assert_eq!(state.stats_desc, Some(g.stats_head()));
        assert_eq!(state.stats.free_memory, Some(1 << 20));
        assert_eq!(state.actual_pages, 77);

        let recorder = Arc::new(Recorder::default());
        let args = || BalloonRestoreArgs {
            mem: g.mem.clone(),
            irqfd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            pages: recorder.clone(),
        };
        let restored = Balloon::restore(args(), &state).unwrap();
        assert_eq!(restored.save(), state);
        assert_eq!(restored.target_pages(), 12 * 256);
        assert_eq!(restored.actual_pages(), 77);
        assert_eq!(restored.active_queues().len(), 4);
        assert_eq!(
            restored.active_queues()[2].next_avail(),
            1,
            "the stats buffer was taken"
        );

        let mut bad = state.clone();
        bad.stats_desc = Some(4000);
        let e = Balloon::restore(args(), &bad).err().unwrap().to_string();
        assert!(
            e.contains("stats buffer 4000 is not in the stats queue"),
            "{e}"
        );
        let mut bad = state.clone();
        bad.config.amount_mib = 1 << 20;
        let e = Balloon::restore(args(), &bad).err().unwrap().to_string();
        assert!(
            e.contains("amount_mib 1048576 is larger than guest memory"),
            "{e}"
        );
    }
}
