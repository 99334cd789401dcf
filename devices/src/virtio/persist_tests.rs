//! Saving and restoring the transport and the common device state: a restored pair reads back
//! the same registers, the device is re-activated with the saved ring positions, and bad saved
//! state is refused by name.

use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;

use super::*;
use crate::bus::BusDevice;
use crate::virtio::mmio::reg;
use crate::virtio::mmio::tests::{ALL, FEATURE_X, dummy, memory, negotiate, setup_queue, w};
use crate::virtio::{VIRTIO_F_VERSION_1, status};

/// A transport whose driver set up both queues and DRIVER_OK, with ring progress on queue 0.
fn live() -> (MmioTransport, Arc<Mutex<crate::virtio::mmio::tests::Dummy>>) {
    let dev = dummy();
    let mut t = MmioTransport::new(dev.clone(), memory());
    negotiate(&mut t, (1 << VIRTIO_F_VERSION_1) | FEATURE_X);
    setup_queue(&mut t, 0, 16, 0x1_0000);
    setup_queue(&mut t, 1, 8, 0x2_0000);
    w(&mut t, reg::STATUS, ALL);
    assert_eq!(t.status(), ALL);
    {
        let mut d = dev.lock().unwrap();
        d.queues[0].set_next_avail(5);
        d.queues[0].set_next_used(4);
        d.interrupt().signal_used();
    }
    (t, dev)
}

#[test]
fn transport_and_device_round_trip() {
    let (t, dev) = live();
    let saved_t = t.save();
    let saved_v = save_virtio(&*dev.lock().unwrap());
    assert_eq!(
        saved_v.acked_features,
        (1 << VIRTIO_F_VERSION_1) | FEATURE_X
    );
    assert_eq!(saved_v.interrupt_status, 1);
    let active = saved_v.active_queues.clone().unwrap();
    assert_eq!((active[0].next_avail, active[0].next_used), (5, 4));

    let fresh = dummy();
    let mem = memory();
    restore_virtio(&mut *fresh.lock().unwrap(), &mem, &saved_v).unwrap();
    let restored = MmioTransport::restore(fresh.clone(), mem, &saved_t).unwrap();
    assert_eq!(restored.save(), saved_t);
    assert_eq!(restored.status(), ALL);
    let d = fresh.lock().unwrap();
    assert_eq!(d.acked, (1 << VIRTIO_F_VERSION_1) | FEATURE_X);
    assert_eq!(
        d.activated_with.as_deref(),
        Some(
            &[
                (16, 0x1_0000, 0x1_1000, 0x1_2000),
                (8, 0x2_0000, 0x2_1000, 0x2_2000)
            ][..]
        )
    );
    assert_eq!((d.queues[0].next_avail(), d.queues[0].next_used()), (5, 4));
    assert_eq!(
        d.interrupt().status(),
        1,
        "the unacknowledged interrupt is kept"
    );
    assert_eq!(d.interrupt().irqfd().read().unwrap(), 1, "and raised again");
}

#[test]
fn an_inactive_device_is_not_activated_on_restore() {
    let dev = dummy();
    let mut t = MmioTransport::new(dev.clone(), memory());
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    let saved_v = save_virtio(&*dev.lock().unwrap());
    assert_eq!(saved_v.active_queues, None);
    let fresh = dummy();
    restore_virtio(&mut *fresh.lock().unwrap(), &memory(), &saved_v).unwrap();
    assert!(!fresh.lock().unwrap().is_activated());
    let restored = MmioTransport::restore(fresh, memory(), &t.save()).unwrap();
    assert_eq!(
        restored.status(),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
    );
}

#[test]
fn bad_saved_state_is_refused_by_name() {
    let (t, dev) = live();
    let good = save_virtio(&*dev.lock().unwrap());

    let mut bad = good.clone();
    bad.acked_features |= 1 << 40;
    let e = restore_virtio(&mut *dummy().lock().unwrap(), &memory(), &bad).unwrap_err();
    assert!(e.to_string().contains("offers only"), "{e}");

    let mut bad = good.clone();
    bad.active_queues.as_mut().unwrap().pop();
    let e = restore_virtio(&mut *dummy().lock().unwrap(), &memory(), &bad).unwrap_err();
    assert_eq!(e.to_string(), "the snapshot has 1 queues; the device has 2");

    let mut bad = good.clone();
    bad.active_queues.as_mut().unwrap()[1].size = 3;
    let e = restore_virtio(&mut *dummy().lock().unwrap(), &memory(), &bad).unwrap_err();
    assert!(e.to_string().starts_with("queue 1: "), "{e}");

    let mut bad = good;
    bad.active_queues.as_mut().unwrap()[0].used_ring = 0xf_0000_0000;
    let e = restore_virtio(&mut *dummy().lock().unwrap(), &memory(), &bad).unwrap_err();
    assert_eq!(e.to_string(), "queue 0: its rings are outside guest memory");

    let mut bad_t = t.save();
    bad_t.queues.push(bad_t.queues[0]);
    let Err(e) = MmioTransport::restore(dummy(), memory(), &bad_t) else {
        panic!("a third queue was accepted")
    };
    assert_eq!(e.to_string(), "the snapshot has 3 queues; the device has 2");
}

#[test]
fn a_restored_transport_keeps_serving_the_driver() {
    let (t, dev) = live();
    let saved_v = save_virtio(&*dev.lock().unwrap());
    let fresh = dummy();
    restore_virtio(&mut *fresh.lock().unwrap(), &memory(), &saved_v).unwrap();
    let mut restored = MmioTransport::restore(fresh.clone(), memory(), &t.save()).unwrap();
    // The driver acknowledges the interrupt and resets the device, as after any restore.
    w(&mut restored, reg::INTERRUPT_ACK, 1);
    assert_eq!(fresh.lock().unwrap().interrupt().status(), 0);
    let mut b = [0u8; 4];
    restored.read(reg::QUEUE_NUM_MAX, &mut b);
    w(&mut restored, reg::STATUS, 0);
    assert!(!fresh.lock().unwrap().is_activated());
}
