//! The virtio-mmio register file: every register path, the status state machine, queue setup gated
//! on status, and drivers that lie (bad sizes, rings outside memory, bits out of order).

use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::{ActivateError, Interrupt, VIRTIO_F_VERSION_1};

/// A device that records what the transport hands it.
pub(crate) struct Dummy {
    features: u64,
    pub(crate) acked: u64,
    config: [u8; 8],
    events: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    pub(crate) activated_with: Option<Vec<(u16, u64, u64, u64)>>,
    pub(crate) queues: Vec<Queue>,
    resets: usize,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn avail_features(&self) -> u64 {
        self.features
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let o = offset as usize;
        if let Some(src) = self.config.get(o..o + data.len()) {
            data.copy_from_slice(src);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        if let Some(dst) = self.config.get_mut(o..o + data.len()) {
            dst.copy_from_slice(data);
        }
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.events
    }
    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }
    fn activate(&mut self, _mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        self.activated_with = Some(
            queues
                .iter()
                .map(|q| (q.size(), q.desc_table(), q.avail_ring(), q.used_ring()))
                .collect(),
        );
        self.queues = queues;
        Ok(())
    }
    fn reset(&mut self) {
        self.activated_with = None;
        self.queues.clear();
        self.resets += 1;
    }
    fn is_activated(&self) -> bool {
        self.activated_with.is_some()
    }
    fn acked_features(&self) -> u64 {
        self.acked
    }
    fn active_queues(&self) -> &[Queue] {
        &self.queues
    }
}

pub(crate) const FEATURE_X: u64 = 1 << 3;

/// A fresh dummy device.
pub(crate) fn dummy() -> Arc<Mutex<Dummy>> {
    let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
    Arc::new(Mutex::new(Dummy {
        features: (1 << VIRTIO_F_VERSION_1) | FEATURE_X,
        acked: 0,
        config: [1, 2, 3, 4, 5, 6, 7, 8],
        events: vec![evt(), evt()],
        interrupt: Arc::new(Interrupt::new(evt())),
        activated_with: None,
        queues: Vec::new(),
        resets: 0,
    }))
}

/// One MiB of guest memory.
pub(crate) fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

pub(crate) fn transport() -> (MmioTransport, Arc<Mutex<Dummy>>) {
    let dummy = dummy();
    (MmioTransport::new(dummy.clone(), memory()), dummy)
}

fn r(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

pub(crate) fn w(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// Walks a driver through negotiation up to FEATURES_OK with `features`.
pub(crate) fn negotiate(t: &mut MmioTransport, features: u64) {
    w(t, reg::STATUS, status::ACKNOWLEDGE);
    w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(t, reg::DRIVER_FEATURES_SEL, 0);
    w(t, reg::DRIVER_FEATURES, features as u32);
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    w(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
}

pub(crate) fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
    w(t, reg::QUEUE_SEL, index);
    w(t, reg::QUEUE_NUM, size);
    w(t, reg::QUEUE_DESC_LOW, base as u32);
    w(t, reg::QUEUE_DESC_HIGH, 0);
    w(t, reg::QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
    w(t, reg::QUEUE_AVAIL_HIGH, 0);
    w(t, reg::QUEUE_USED_LOW, (base + 0x2000) as u32);
    w(t, reg::QUEUE_USED_HIGH, 0);
    w(t, reg::QUEUE_READY, 1);
}

pub(crate) const ALL: u32 =
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

#[test]
fn identity_registers() {
    let (mut t, _) = transport();
    assert_eq!(r(&mut t, reg::MAGIC), 0x7472_6976);
    assert_eq!(r(&mut t, reg::VERSION), 2);
    assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
    assert_eq!(r(&mut t, reg::VENDOR_ID), VENDOR_ID);
    assert_eq!(r(&mut t, 0x0f0), 0, "unknown register reads 0");
}

#[test]
fn features_are_offered_by_page_and_acked_at_features_ok() {
    let (mut t, dev) = transport();
    w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), FEATURE_X as u32);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
    w(&mut t, reg::DEVICE_FEATURES_SEL, 7);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
    negotiate(&mut t, (1 << VIRTIO_F_VERSION_1) | FEATURE_X);
    assert_eq!(
        t.status(),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
    );
    assert_eq!(
        dev.lock().unwrap().acked,
        (1 << VIRTIO_F_VERSION_1) | FEATURE_X
    );
}

#[test]
fn features_ok_is_refused_for_unoffered_features_or_a_legacy_driver() {
    for bad in [(1 << VIRTIO_F_VERSION_1) | (1 << 7), FEATURE_X] {
        let (mut t, dev) = transport();
        negotiate(&mut t, bad);
        assert_eq!(t.status() & status::FEATURES_OK, 0, "features {bad:#x}");
        assert_eq!(dev.lock().unwrap().acked, 0);
    }
}

#[test]
fn driver_features_before_driver_status_are_ignored() {
    let (mut t, dev) = transport();
    w(&mut t, reg::DRIVER_FEATURES, FEATURE_X as u32);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    w(&mut t, reg::DRIVER_FEATURES, 1);
    w(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(
        dev.lock().unwrap().acked,
        1 << VIRTIO_F_VERSION_1,
        "FEATURE_X written too early"
    );
}

#[test]
fn queues_are_handed_over_at_driver_ok() {
    let (mut t, dev) = transport();
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    w(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 16);
    w(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 8);
    w(&mut t, reg::QUEUE_SEL, 2);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0, "no third queue");
    setup_queue(&mut t, 0, 16, 0x1_0000);
    setup_queue(&mut t, 1, 4, 0x2_0000_0000 >> 20);
    setup_queue(&mut t, 1, 4, 0x4_0000);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    w(&mut t, reg::STATUS, ALL);
    assert_eq!(t.status(), ALL);
    assert_eq!(
        dev.lock().unwrap().activated_with,
        Some(vec![
            (16, 0x1_0000, 0x1_1000, 0x1_2000),
            (4, 0x4_0000, 0x4_1000, 0x4_2000)
        ])
    );
    // Live queues cannot be reconfigured.
    w(&mut t, reg::QUEUE_SEL, 0);
    w(&mut t, reg::QUEUE_NUM, 2);
    w(&mut t, reg::QUEUE_DESC_LOW, 0x8_0000);
    assert_eq!(t.queues[0].size(), 16);
    assert_eq!(t.queues[0].desc_table(), 0x1_0000);
}

#[test]
fn queue_writes_before_features_ok_are_ignored() {
    let (mut t, _) = transport();
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    setup_queue(&mut t, 0, 4, 0x1_0000);
    assert_eq!(t.queues[0].size(), 16);
    assert!(!t.queues[0].ready());
}

#[test]
fn a_queue_size_that_is_not_a_power_of_two_needs_reset() {
    for size in [3, 0, 32, 0x1_0004] {
        let (mut t, dev) = transport();
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, size, 0x1_0000);
        setup_queue(&mut t, 1, 8, 0x4_0000);
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0, "size {size}");
        w(&mut t, reg::STATUS, ALL);
        assert!(
            dev.lock().unwrap().activated_with.is_none(),
            "size {size}: not activated"
        );
    }
}

#[test]
fn rings_outside_guest_memory_or_unready_queues_need_reset() {
    let (mut t, dev) = transport();
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 16, 0xf_f000); // the used ring lands past the end of memory
    setup_queue(&mut t, 1, 8, 0x4_0000);
    w(&mut t, reg::STATUS, ALL);
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    assert!(dev.lock().unwrap().activated_with.is_none());
    assert_ne!(
        dev.lock().unwrap().interrupt.status() & interrupt_status_config(),
        0
    );

    let (mut t, dev) = transport();
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 16, 0x1_0000); // queue 1 never made ready
    w(&mut t, reg::STATUS, ALL);
    assert!(dev.lock().unwrap().activated_with.is_none());
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
}

fn interrupt_status_config() -> u32 {
    crate::virtio::interrupt_status::CONFIG_CHANGED
}

#[test]
fn status_bits_out_of_order_or_cleared_need_reset() {
    let (mut t, _) = transport();
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER_OK);
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    let (mut t, _) = transport();
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn writing_zero_resets_transport_and_device() {
    let (mut t, dev) = transport();
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 16, 0x1_0000);
    setup_queue(&mut t, 1, 8, 0x4_0000);
    w(&mut t, reg::STATUS, ALL);
    w(&mut t, reg::STATUS, 0);
    assert_eq!(t.status(), 0);
    assert!(!t.queues[0].ready());
    let d = dev.lock().unwrap();
    assert_eq!(d.resets, 1);
    assert!(d.activated_with.is_none());
}

#[test]
fn failed_status_sticks() {
    let (mut t, _) = transport();
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::FAILED);
    assert_eq!(t.status(), status::ACKNOWLEDGE | status::FAILED);
}

#[test]
fn interrupts_are_read_and_acknowledged() {
    let (mut t, dev) = transport();
    dev.lock().unwrap().interrupt.signal_used();
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);
    w(&mut t, reg::INTERRUPT_ACK, 1);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn config_space_goes_to_the_device_and_bumps_the_generation() {
    let (mut t, dev) = transport();
    let mut b = [0u8; 2];
    t.read(0x102, &mut b);
    assert_eq!(b, [3, 4]);
    let gen0 = r(&mut t, reg::CONFIG_GENERATION);
    t.write(0x100, &[9]);
    assert_eq!(dev.lock().unwrap().config[0], 9);
    assert_eq!(r(&mut t, reg::CONFIG_GENERATION), gen0 + 1);
}

#[test]
fn odd_widths_and_offsets_are_ignored_without_panic() {
    let (mut t, _) = transport();
    let mut two = [0xffu8; 2];
    t.read(reg::MAGIC, &mut two);
    assert_eq!(two, [0, 0]);
    t.write(reg::STATUS, &[1]);
    t.write(reg::STATUS + 1, &1u32.to_le_bytes());
    assert_eq!(t.status(), 0);
    t.write(0xffc, &[]);
}

#[test]
fn notifications_that_reach_the_vmm_are_forwarded_to_the_queue_event() {
    let (mut t, dev) = transport();
    w(&mut t, reg::QUEUE_NOTIFY, 1);
    assert!(
        dev.lock().unwrap().events[1].read().is_err(),
        "not before DRIVER_OK"
    );
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 16, 0x1_0000);
    setup_queue(&mut t, 1, 8, 0x4_0000);
    w(&mut t, reg::STATUS, ALL);
    w(&mut t, reg::QUEUE_NOTIFY, 1);
    w(&mut t, reg::QUEUE_NOTIFY, 9);
    assert_eq!(dev.lock().unwrap().events[1].read().unwrap(), 1);
}

#[test]
fn a_driver_looping_on_bad_writes_logs_one_warning_per_kind() {
    let (mut t, _) = transport();
    for _ in 0..1000 {
        // A status that clears bits, a status bit out of order, a queue size lie, refused
        // features, and a reset storm between them.
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER_OK);
        setup_queue(&mut t, 0, 3, 0x1_0000);
        w(&mut t, reg::STATUS, 0);
        negotiate(&mut t, 1 << 40 | 1 << VIRTIO_F_VERSION_1);
        w(&mut t, reg::STATUS, 0);
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0x1_0004, 0x1_0000);
        w(&mut t, reg::STATUS, 0);
    }
    assert_eq!(
        t.warnings(),
        3,
        "status, queue size and features, once each"
    );
}
