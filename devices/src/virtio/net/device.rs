//! The network device: its features, configuration space (MAC and link status), activation, and
//! what the VMM may change while it runs (rate limiters, a frame hook).

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::hook::FrameHook;
use super::tap::Tap;
use super::{
    HDR_LEN, LogOnce, MAX_GSO_FRAME, MAX_PLAIN_FRAME, NET_QUEUE_SIZES, NetCounters, NetError,
    features,
};
use crate::metrics::NetMetrics;
use crate::rate_limiter::{
    BucketUpdate, Clock, MonotonicClock, RateLimiter, RateLimiterConfig, RateLimiterState,
};
use crate::virtio::device::read_config_space;
use crate::virtio::{
    ActivateError, GuestMemoryMmap, Interrupt, Queue, TYPE_NET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice,
};

/// What the VMM knows about a network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The interface id (Firecracker's `iface_id`).
    pub id: String,
    /// The TAP on the host.
    pub host_dev_name: String,
    /// The guest's MAC address; without one the guest picks its own (no VIRTIO_NET_F_MAC).
    pub guest_mac: Option<[u8; 6]>,
    /// Limits on what the guest receives.
    pub rx_rate_limiter: RateLimiterConfig,
    /// Limits on what the guest sends.
    pub tx_rate_limiter: RateLimiterConfig,
}

/// The queues handed over by the driver, with the memory they live in.
pub(super) struct Active {
    pub(super) mem: GuestMemoryMmap,
    pub(super) queues: Vec<Queue>,
}

/// A virtio-net device on a TAP.
pub struct Net {
    pub(super) config: NetConfig,
    pub(super) tap: Tap,
    avail_features: u64,
    acked_features: u64,
    pub(super) queue_events: Vec<EventFd>,
    /// Wakes the event handler: after activation or reset, a limiter update, or a budget
    /// running out with work left.
    pub(super) wake_evt: EventFd,
    pub(super) rx_timer: TimerFd,
    pub(super) tx_timer: TimerFd,
    pub(super) rx_limiter: RateLimiter,
    pub(super) tx_limiter: RateLimiter,
    interrupt: Arc<Interrupt>,
    pub(super) active: Option<Active>,
    /// The queue eventfds and the TAP are registered with the event loop (done once).
    pub(super) registered: bool,
    /// The TAP is in the event loop (until it is found dead).
    pub(super) tap_in_loop: bool,
    /// The TAP is watched for frames (not while the guest has no buffers or the limiter holds).
    pub(super) tap_watched: bool,
    /// The TAP reported an error or hang-up and is no longer watched.
    pub(super) tap_dead: bool,
    pub(super) hook: Option<Box<dyn FrameHook>>,
    pub(super) log: LogOnce,
    /// Frames the guest sent that the hook took (no Firecracker metric has them).
    pub(super) tx_hooked: u64,
    pub(super) metrics: Arc<NetMetrics>,
}

impl Net {
    /// Attaches the TAP `config.host_dev_name`; `irqfd` is the interrupt's eventfd (an irqfd in
    /// KVM).
    pub fn new(config: NetConfig, irqfd: EventFd) -> Result<Self, NetError> {
        let tap = Tap::open(&config.host_dev_name).map_err(|err| NetError::Tap {
            id: config.id.clone(),
            err,
        })?;
        Self::with_tap(config, tap, irqfd, Arc::new(MonotonicClock::default()))
    }

    /// A device on an attached `tap`, its rate limiters reading `clock`.
    pub fn with_tap(
        config: NetConfig,
        tap: Tap,
        irqfd: EventFd,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, NetError> {
        let id = config.id.clone();
        for (what, limiter) in [
            ("rx_rate_limiter", &config.rx_rate_limiter),
            ("tx_rate_limiter", &config.tx_rate_limiter),
        ] {
            limiter.check(what).map_err(|err| NetError::RateLimiter {
                id: id.clone(),
                err,
            })?;
        }
        let fd_err = |what, err| NetError::Fd {
            id: id.clone(),
            what,
            err,
        };
        let evt = |what| EventFd::new(libc::EFD_NONBLOCK).map_err(|e| fd_err(what, e));
        let timer = |what| TimerFd::new().map_err(|e| fd_err(what, e.into()));
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << features::CSUM)
            | (1 << features::GUEST_CSUM)
            | (1 << features::GUEST_TSO4)
            | (1 << features::GUEST_TSO6)
            | (1 << features::HOST_TSO4)
            | (1 << features::HOST_TSO6)
            | (1 << features::MRG_RXBUF)
            | (1 << features::STATUS);
        if config.guest_mac.is_some() {
            avail_features |= 1 << features::MAC;
        }
        Ok(Self {
            queue_events: vec![evt("rx queue eventfd")?, evt("tx queue eventfd")?],
            wake_evt: evt("wake-up eventfd")?,
            rx_timer: timer("rx rate limiter timer")?,
            tx_timer: timer("tx rate limiter timer")?,
            rx_limiter: RateLimiter::new(&config.rx_rate_limiter, clock.clone()),
            tx_limiter: RateLimiter::new(&config.tx_rate_limiter, clock),
            interrupt: Arc::new(Interrupt::new(irqfd)),
            avail_features,
            acked_features: 0,
            active: None,
            registered: false,
            tap_in_loop: false,
            tap_watched: false,
            tap_dead: false,
            hook: None,
            log: LogOnce::default(),
            tx_hooked: 0,
            metrics: Arc::new(NetMetrics::new()),
            tap,
            config,
        })
    }

    /// The interface's configuration (rate limiters as last set).
    pub fn config(&self) -> NetConfig {
        NetConfig {
            rx_rate_limiter: self.rx_limiter.config(),
            tx_rate_limiter: self.tx_limiter.config(),
            ..self.config.clone()
        }
    }

    /// The interface id.
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// The TAP.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The counters of the metrics file (Firecracker's `net` group).
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// What the device has moved and dropped so far.
    pub fn counters(&self) -> NetCounters {
        let m = &self.metrics;
        NetCounters {
            tx_frames: m.tx_packets_count.count(),
            tx_bytes: m.tx_bytes_count.count(),
            tx_hooked: self.tx_hooked,
            tx_dropped: m.tx_fails.count(),
            rx_frames: m.rx_packets_count.count(),
            rx_bytes: m.rx_bytes_count.count(),
            rx_dropped: m.rx_fails.count(),
        }
    }

    /// Lets `hook` take the guest's frames it claims and answer them (see [`FrameHook`]).
    pub fn set_frame_hook(&mut self, hook: Box<dyn FrameHook>) {
        self.hook = Some(hook);
        self.wake();
    }

    /// Changes the rate limiters of a running device (`PATCH /network-interfaces/{id}`).
    pub fn update_rate_limiters(&mut self, rx: [BucketUpdate; 2], tx: [BucketUpdate; 2]) {
        self.rx_limiter.update(rx[0], rx[1]);
        self.tx_limiter.update(tx[0], tx[1]);
        // A device held back by the old limits may go now.
        self.wake();
    }

    /// The limiters' state, for snapshots: (rx, tx).
    pub(super) fn limiter_state(&self) -> (RateLimiterState, RateLimiterState) {
        (self.rx_limiter.save(), self.tx_limiter.save())
    }

    pub(super) fn wake(&self) {
        if let Err(e) = self.wake_evt.write(1) {
            log::error!(
                "virtio-net {}: cannot wake the event handler: {e}",
                self.config.id
            );
        }
    }

    /// Whether the driver accepted `feature`.
    pub(super) fn acked(&self, feature: u32) -> bool {
        self.acked_features & (1 << feature) != 0
    }

    /// The `TUN_F_*` offloads matching what the driver accepted for its receive path. TSO
    /// needs checksum offload (the spec ties them, and so does the TAP).
    pub(super) fn tap_offloads(&self) -> u32 {
        let mut flags = 0;
        if self.acked(features::GUEST_CSUM) {
            flags |= libc::TUN_F_CSUM;
            if self.acked(features::GUEST_TSO4) {
                flags |= libc::TUN_F_TSO4;
            }
            if self.acked(features::GUEST_TSO6) {
                flags |= libc::TUN_F_TSO6;
            }
        }
        flags
    }

    /// The most bytes one received frame may need, header included: with TSO the TAP may hand
    /// over 64 KiB segments.
    pub(super) fn max_rx_len(&self) -> usize {
        let gso = libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        HDR_LEN
            + if self.tap_offloads() & gso != 0 {
                MAX_GSO_FRAME
            } else {
                MAX_PLAIN_FRAME
            }
    }

    /// The configuration space: `mac` then `status` (link up).
    fn config_space(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        if let Some(mac) = self.config.guest_mac {
            c[..6].copy_from_slice(&mac);
        }
        let status = virtio_bindings::bindings::virtio_net::VIRTIO_NET_S_LINK_UP as u16;
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        NET_QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only in legacy devices; virtio 1.x drivers use the control queue,
        // which this device does not have.
        log::debug!(
            "virtio-net {}: write to read-only config space at {offset:#x} ignored",
            self.config.id
        );
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        if self.active.is_some() {
            self.metrics.activate_fails.inc();
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != NET_QUEUE_SIZES.len() {
            self.metrics.activate_fails.inc();
            return Err(ActivateError::QueueCount {
                want: NET_QUEUE_SIZES.len(),
                got: queues.len(),
            });
        }
        self.active = Some(Active { mem, queues });
        // The event handler, on the VMM thread, sets the TAP's offloads and starts watching it.
        self.wake_evt.write(1).map_err(ActivateError::Signal)
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        // The event handler stops watching the TAP when woken.
        self.wake();
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn active_queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| a.queues.as_slice())
    }
}
