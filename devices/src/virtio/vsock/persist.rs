//! The vsock device's snapshot state. Connections are not saved: like Firecracker, Kiln sends the
//! guest a transport reset before saving ([`Vsock::send_transport_reset`]), so the guest drops its
//! connections and only its listening sockets survive. A restored device listens on the saved
//! socket path or, for clones running side by side, on an override path.

use std::path::PathBuf;

use kiln_snapshot::Persist;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::{Vsock, VsockError};
use crate::virtio::GuestMemoryMmap;
use crate::virtio::persist::{VirtioState, restore_virtio, save_virtio};

/// The vsock device as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's context id.
    pub guest_cid: u64,
    /// The host socket the device listened on.
    pub uds_path: PathBuf,
    /// Features, interrupt and queues.
    pub virtio: VirtioState,
}

/// What restoring the vsock device needs besides its state.
pub struct VsockRestoreArgs {
    /// Guest memory, for re-activation.
    pub mem: GuestMemoryMmap,
    /// The interrupt eventfd (registered as an irqfd by the VMM).
    pub irqfd: EventFd,
    /// Listen here instead of the saved path.
    pub uds_override: Option<PathBuf>,
}

impl Persist for Vsock {
    type State = VsockState;
    type ConstructorArgs = VsockRestoreArgs;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid(),
            uds_path: self.uds_path().to_path_buf(),
            virtio: save_virtio(self),
        }
    }

    fn restore(args: VsockRestoreArgs, state: &VsockState) -> Result<Self, VsockError> {
        let path = args.uds_override.unwrap_or_else(|| state.uds_path.clone());
        let mut vsock = Vsock::new(state.guest_cid, path.clone(), args.irqfd)?;
        restore_virtio(&mut vsock, &args.mem, &state.virtio).map_err(|e| VsockError::Restore {
            path,
            why: e.to_string(),
        })?;
        Ok(vsock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::VirtioDevice;
    use crate::virtio::vsock::test_utils::TestGuest;
    use virtio_queue::QueueT;

    #[test]
    fn reset_then_save_then_restore_elsewhere() {
        let mut g = TestGuest::new();
        let _host = g.host_connect();
        g.give_event_buffer(4);
        assert!(g.dev().send_transport_reset());
        let state = g.dev().save();
        assert_eq!(state.uds_path, g.uds());
        let queues = state.virtio.active_queues.clone().unwrap();
        assert_eq!(queues[2].next_used, 1, "the reset event was used");

        let elsewhere = g.dir.0.join("clone.sock");
        let args = |path: Option<PathBuf>| VsockRestoreArgs {
            mem: g.mem.clone(),
            irqfd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            uds_override: path,
        };
        let e = Vsock::restore(args(None), &state).err().unwrap();
        assert!(
            e.to_string().starts_with("cannot listen on vsock socket"),
            "the original is still listening: {e}"
        );
        let restored = Vsock::restore(args(Some(elsewhere.clone())), &state).unwrap();
        assert_eq!(restored.uds_path(), elsewhere);
        assert_eq!(restored.guest_cid(), state.guest_cid);
        assert_eq!(restored.active_queues()[2].next_used(), 1);
        assert_eq!(restored.muxer().connection_count(), 0);
        assert!(std::os::unix::net::UnixStream::connect(&elsewhere).is_ok());
    }
}
