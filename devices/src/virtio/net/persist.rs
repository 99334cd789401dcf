//! The network device's snapshot state: the interface's settings, what is left in its rate
//! limiters, and the common virtio state. Frames are never held in the device, so none are
//! saved; frames waiting in the TAP stay with the TAP. A restored device attaches the saved TAP
//! name or, for clones running side by side, an override (`network_overrides`).

use std::sync::Arc;

use kiln_snapshot::Persist;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::device::Net;
use super::{NetConfig, NetError, Tap};
use crate::rate_limiter::{MonotonicClock, RateLimiter, RateLimiterState};
use crate::virtio::GuestMemoryMmap;
use crate::virtio::persist::{VirtioState, restore_virtio, save_virtio};

/// A network interface as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The interface id.
    pub id: String,
    /// The TAP it was attached to.
    pub host_dev_name: String,
    /// The guest's MAC address, if the device gave one.
    pub guest_mac: Option<[u8; 6]>,
    /// The receive limiter, with what is left in its buckets.
    pub rx_rate_limiter: RateLimiterState,
    /// The transmit limiter.
    pub tx_rate_limiter: RateLimiterState,
    /// Features, interrupt and queues.
    pub virtio: VirtioState,
}

/// What restoring a network interface needs besides its state.
pub struct NetRestoreArgs {
    /// Guest memory, for re-activation.
    pub mem: GuestMemoryMmap,
    /// The interrupt eventfd (registered as an irqfd by the VMM).
    pub irqfd: EventFd,
    /// Attach this TAP instead of the saved one.
    pub host_dev_name: Option<String>,
}

impl Persist for Net {
    type State = NetState;
    type ConstructorArgs = NetRestoreArgs;
    type Error = NetError;

    fn save(&self) -> NetState {
        let (rx, tx) = self.limiter_state();
        NetState {
            id: self.config.id.clone(),
            host_dev_name: self.config.host_dev_name.clone(),
            guest_mac: self.config.guest_mac,
            rx_rate_limiter: rx,
            tx_rate_limiter: tx,
            virtio: save_virtio(self),
        }
    }

    fn restore(args: NetRestoreArgs, state: &NetState) -> Result<Self, NetError> {
        let host_dev_name = args
            .host_dev_name
            .unwrap_or_else(|| state.host_dev_name.clone());
        let tap = Tap::open(&host_dev_name).map_err(|err| NetError::Tap {
            id: state.id.clone(),
            err,
        })?;
        restore_with_tap(args.mem, args.irqfd, tap, state)
    }
}

/// [`Net::restore`] onto an attached `tap`.
pub(super) fn restore_with_tap(
    mem: GuestMemoryMmap,
    irqfd: EventFd,
    tap: Tap,
    state: &NetState,
) -> Result<Net, NetError> {
    let clock = Arc::new(MonotonicClock::default());
    let config = NetConfig {
        id: state.id.clone(),
        host_dev_name: tap.name().to_string(),
        guest_mac: state.guest_mac,
        rx_rate_limiter: RateLimiter::restore(&state.rx_rate_limiter, clock.clone()).config(),
        tx_rate_limiter: RateLimiter::restore(&state.tx_rate_limiter, clock.clone()).config(),
    };
    let mut net = Net::with_tap(config, tap, irqfd, clock.clone())?;
    net.rx_limiter = RateLimiter::restore(&state.rx_rate_limiter, clock.clone());
    net.tx_limiter = RateLimiter::restore(&state.tx_rate_limiter, clock);
    restore_virtio(&mut net, &mem, &state.virtio).map_err(|e| NetError::Restore {
        id: state.id.clone(),
        why: e.to_string(),
    })?;
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limiter::{BucketConfig, RateLimiterConfig};
    use crate::virtio::VirtioDevice;
    use crate::virtio::net::test_utils::TestNet;
    use virtio_queue::QueueT;

    #[test]
    fn an_active_interface_round_trips_with_its_limiter_debt() {
        let bucket = BucketConfig {
            size: 1000,
            one_time_burst: 0,
            refill_time_ms: 1000,
        };
        let limits = RateLimiterConfig {
            bandwidth: Some(bucket),
            ops: None,
        };
        let mut t = TestNet::new_with(Some([6, 0, 0xac, 0x10, 0, 2]), limits, limits);
        t.guest_sends(&[0x11; 1500]);
        t.run();
        assert_eq!(t.host_receives().len(), 1);
        let state = t.dev().save();
        assert_eq!(state.tx_rate_limiter.bandwidth.unwrap().budget, -500);
        assert_eq!(state.guest_mac, Some([6, 0, 0xac, 0x10, 0, 2]));
        let queues = state.virtio.active_queues.clone().unwrap();
        assert_eq!(queues[1].next_used, 1, "the sent frame was used");

        let (tap, _host) = TestNet::tap_pair();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let restored = restore_with_tap(t.mem.clone(), irq, tap, &state).unwrap();
        let mut again = restored.save();
        again.host_dev_name = state.host_dev_name.clone();
        assert_eq!(again, state);
        assert_eq!(restored.active_queues()[1].next_used(), 1);
        assert_eq!(restored.config().tx_rate_limiter, limits);
    }

    #[test]
    fn a_missing_tap_is_named_on_restore() {
        let t = TestNet::new();
        let state = t.dev().save();
        let args = NetRestoreArgs {
            mem: t.mem.clone(),
            irqfd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            host_dev_name: Some("kiln-gone0".into()),
        };
        let e = Net::restore(args, &state).err().unwrap();
        assert!(
            e.to_string()
                .starts_with("network interface eth0: TAP kiln-gone0 does not exist"),
            "{e}"
        );
    }
}
