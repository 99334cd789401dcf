//! The balloon driven through real descriptor chains: features and queues per configuration, the
//! configuration space, inflate and deflate, free page reports, statistics, the host's controls,
//! the per-call budget, and what a hostile guest gets.

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Address, Bytes, GuestAddress};

use super::*;
use crate::virtio::balloon::test_utils::{HIGH_LEN, HIGH_START, Recorder, TestGuest, config};
use crate::virtio::balloon::{
    CHAINS_PER_CALL, MAX_PFN_BYTES, Misbehaviour, PAGE_SIZE, RANGES_PER_CALL, features,
};
use crate::virtio::interrupt_status;

const P: u64 = PAGE_SIZE;

fn bit(b: u32) -> u64 {
    1 << b
}

#[test]
fn features_and_queues_follow_the_configuration() {
    let plain = TestGuest::new(config(0, false, 0, false));
    assert_eq!(plain.dev().queue_max_sizes(), &[256, 256]);
    assert_eq!(
        plain.dev().avail_features(),
        bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX)
    );
    assert!(plain.dev().stats().is_none());

    let full = TestGuest::new(config(0, true, 1, true));
    assert_eq!(full.dev().queue_max_sizes(), &[256; 4]);
    let f = full.dev().avail_features();
    for b in [
        features::DEFLATE_ON_OOM,
        features::STATS_VQ,
        features::REPORTING,
    ] {
        assert_ne!(f & bit(b), 0, "feature {b} offered");
    }
    for b in [
        features::MUST_TELL_HOST,
        features::FREE_PAGE_HINT,
        features::PAGE_POISON,
    ] {
        assert_eq!(f & bit(b), 0, "feature {b} never offered");
    }
    // Reporting without stats takes queue 2: the driver numbers its queues without gaps.
    let reporting = TestGuest::new(config(0, false, 0, true));
    assert_eq!(reporting.dev().index.reporting, Some(2));
    assert_eq!(reporting.dev().index.stats, None);
}

#[test]
fn the_target_and_the_guests_actual_size_live_in_the_config_space() {
    let mut g = TestGuest::new(config(3, false, 0, false));
    let read = |g: &TestGuest, off| {
        let mut b = [0u8; 4];
        g.dev().read_config(off, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(read(&g, 0), 3 * 256, "num_pages");
    g.dev().write_config(4, &500u32.to_le_bytes());
    assert_eq!((read(&g, 4), g.dev().actual_pages()), (500, 500));
    g.dev().write_config(6, &[1]);
    assert_eq!(
        g.dev().actual_pages(),
        500 + (1 << 16),
        "a one-byte write of actual"
    );

    // num_pages is the host's; a guest write is ignored and logged.
    g.dev().write_config(0, &9u32.to_le_bytes());
    g.dev().write_config(6, &[0; 4]);
    assert_eq!(read(&g, 0), 3 * 256);
    assert!(g.dev().misbehaviour().seen(Misbehaviour::ConfigWrite));

    // A new target reaches an active guest as a configuration interrupt.
    let irq = g.dev().interrupt().clone();
    irq.ack(u32::MAX);
    g.dev().set_target(16).unwrap();
    assert_eq!(read(&g, 0), 16 * 256);
    assert_ne!(irq.status() & interrupt_status::CONFIG_CHANGED, 0);
    let e = g.dev().set_target(21).unwrap_err().to_string();
    assert_eq!(
        e,
        "balloon amount_mib 21 is larger than guest memory (20 MiB)"
    );
    assert_eq!(g.dev().config().amount_mib, 16);
    g.poll();
}

#[test]
fn inflated_pages_are_discarded_as_merged_ranges_and_the_chain_used() {
    let mut g = TestGuest::new(config(0, false, 0, false));
    let head = g.inflate(&[100, 101, 102, 7, 8, (HIGH_START / P) as u32]);
    assert_eq!(
        g.pages.taken(),
        vec![100 * P..103 * P, 7 * P..9 * P, HIGH_START..HIGH_START + P]
    );
    assert_eq!(g.used(0), vec![(u32::from(head), 0)]);
    let c = g.dev().counters();
    assert_eq!((c.inflated_pages, c.given_back_bytes), (6, 6 * P));
    assert!(g.healthy());
    assert_ne!(
        g.dev().interrupt().status() & interrupt_status::USED_RING,
        0
    );
}

#[test]
fn deflated_pages_are_checked_and_counted_but_not_discarded() {
    let mut g = TestGuest::new(config(0, true, 0, false));
    let head = g.deflate(&[100, 101, u32::MAX]);
    assert!(g.pages.taken().is_empty());
    assert_eq!(g.used(1), vec![(u32::from(head), 0)]);
    assert_eq!(g.dev().counters().deflated_pages, 2);
    assert!(g.dev().misbehaviour().seen(Misbehaviour::PfnOutOfRange));
}

#[test]
fn free_page_reports_are_discarded_then_used() {
    let mut g = TestGuest::new(config(0, false, 0, true));
    let q = g.dev().index.reporting.unwrap();
    let head = g.report(&[(0x40_0000, 0x20_0000), (HIGH_START, HIGH_LEN as u32)]);
    assert_eq!(
        g.pages.taken(),
        vec![0x40_0000..0x60_0000, HIGH_START..HIGH_START + HIGH_LEN]
    );
    assert_eq!(g.used(q), vec![(u32::from(head), 0)]);
    assert_eq!(
        g.dev().counters().reported_bytes,
        0x20_0000 + HIGH_LEN,
        "reported bytes"
    );
    let m = g.dev().metrics().report();
    assert_eq!(
        (
            m["free_page_report_count"].as_u64(),
            m["free_page_report_freed"].as_u64()
        ),
        (Some(1), Some(0x20_0000 + HIGH_LEN)),
        "Firecracker's metrics"
    );
    // A hostile report: outside memory, unaligned, read-only. Nothing discarded, chain used.
    let before = *g.pages.calls.lock().unwrap();
    let head = g.add_chain(
        q,
        &[
            (HIGH_START + HIGH_LEN, 0x1000, VRING_DESC_F_WRITE),
            (0x1001, 0x1000, VRING_DESC_F_WRITE),
            (0x2000, 0x1000, 0),
        ],
    );
    g.kick(q);
    assert_eq!(*g.pages.calls.lock().unwrap(), before, "nothing to discard");
    assert_eq!(g.used(q), vec![(u32::from(head), 0)]);
    assert!(g.dev().misbehaviour().seen(Misbehaviour::BadReport));
    assert!(g.dev().misbehaviour().seen(Misbehaviour::WrongDirection));
    assert!(g.healthy());
}

#[test]
fn a_failed_discard_still_gives_the_pages_back_to_the_guest() {
    let mut g = TestGuest::with_pages(
        config(0, false, 0, true),
        Recorder {
            fail: true,
            ..Recorder::default()
        },
    );
    let q = g.dev().index.reporting.unwrap();
    let head = g.report(&[(0x40_0000, 0x1000)]);
    assert_eq!(g.used(q), vec![(u32::from(head), 0)]);
    assert_eq!(g.dev().counters().given_back_bytes, 0);
    assert_eq!(g.dev().metrics().free_page_report_fails.count(), 1);
    assert!(g.healthy());
}

#[test]
fn the_stats_buffer_is_held_until_the_device_wants_new_numbers() {
    let mut g = TestGuest::new(config(0, false, 10, false));
    let q = g.dev().index.stats.unwrap();
    let head = g.send_stats(&[(4, 100 << 20), (5, 500 << 20), (6, 300 << 20), (42, 1)]);
    assert!(g.used(q).is_empty(), "the device keeps the buffer");
    assert_eq!(g.stats_head(), head);
    {
        let dev = g.dev();
        let s = dev.stats().unwrap();
        assert_eq!(
            (s.free_memory, s.total_memory, s.available_memory, s.swap_in),
            (Some(100 << 20), Some(500 << 20), Some(300 << 20), None)
        );
        assert!(dev.misbehaviour().seen(Misbehaviour::UnknownStat));
    }
    // Asking hands the buffer back; the guest refills it.
    g.dev().request_stats();
    assert_eq!(g.used(q), vec![(u32::from(head), 0)]);
    g.dev().request_stats();
    assert!(g.used(q).is_empty(), "nothing held, nothing returned");
    g.send_stats(&[(4, 50 << 20)]);
    assert_eq!(g.dev().stats().unwrap().free_memory, Some(50 << 20));
    assert_eq!(g.dev().counters().stats_updates, 2);

    // A second buffer while one is held: the older goes back.
    let older = g.stats_head();
    let newer = g.send_stats(&[(4, 1)]);
    assert_eq!(g.used(q), vec![(u32::from(older), 0)]);
    assert_eq!(g.stats_head(), newer);
    assert!(g.dev().misbehaviour().seen(Misbehaviour::ExtraStatsBuffer));
}

#[test]
fn the_stats_interval_changes_but_stats_are_not_turned_on_or_off() {
    let mut off = TestGuest::new(config(0, false, 0, false));
    assert_eq!(
        off.dev().set_stats_interval(5).unwrap_err().to_string(),
        "balloon statistics were off when the device was configured (stats_polling_interval_s 0); they cannot be turned on with stats_polling_interval_s 5 after boot"
    );
    off.dev().set_stats_interval(0).unwrap();

    let mut on = TestGuest::new(config(0, false, 10, false));
    let q = on.dev().index.stats.unwrap();
    assert!(on.dev().set_stats_interval(0).is_err());
    let head = on.send_stats(&[(4, 1)]);
    on.dev().set_stats_interval(3).unwrap();
    assert_eq!(on.dev().config().stats_polling_interval_s, 3);
    assert_eq!(
        on.used(q),
        vec![(u32::from(head), 0)],
        "a new interval asks at once"
    );
    off.poll();
    on.poll();
}

#[test]
fn the_statistics_timer_asks_for_new_numbers() {
    let mut g = TestGuest::new(config(0, false, 1, false));
    let q = g.dev().index.stats.unwrap();
    let head = g.send_stats(&[(4, 1)]);
    let start = std::time::Instant::now();
    while g.used(q).is_empty() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "the 1 s timer never fired"
        );
        g.em.run_with_timeout(100).unwrap();
    }
    assert!(g.dev().stats_desc.is_none());
    let _ = head;
}

#[test]
fn a_queue_full_of_chains_is_handled_a_budget_at_a_time() {
    let mut g = TestGuest::new(config(0, false, 0, false));
    let n = CHAINS_PER_CALL + 36;
    for i in 0..n {
        let pfns = [i as u32 * 2];
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        let addr = 0x20_0000 + i as u64 * 0x100;
        g.mem
            .write_slice(&bytes, vm_memory::GuestAddress(addr))
            .unwrap();
        g.add_chain(0, &[(addr, 4, 0)]);
    }
    g.dev().queue_events()[0].write(1).unwrap();
    g.em.run_with_timeout(0).unwrap();
    assert_eq!(g.used(0).len(), CHAINS_PER_CALL, "one budget per event");
    assert_eq!(*g.pages.calls.lock().unwrap(), 1, "one discard per batch");
    g.poll();
    assert_eq!(
        g.used(0).len(),
        n - CHAINS_PER_CALL,
        "the device woke itself up"
    );
    assert_eq!(g.pages.taken().len(), n);
}

#[test]
fn scattered_pages_are_given_back_a_bounded_number_of_ranges_at_a_time() {
    let mut g = TestGuest::new(config(0, false, 0, false));
    // Chains of 4096 pages, every other one of the first 4096 twice over: 4096 ranges each, nothing to merge.
    let per_chain = MAX_PFN_BYTES as usize / 4;
    let chains = RANGES_PER_CALL / per_chain + 1;
    for c in 0..chains {
        let pfns: Vec<u8> = (0..per_chain)
            .flat_map(|i| ((i as u32 * 2) % 4096).to_le_bytes())
            .collect();
        let addr = 0x20_0000 + c as u64 * u64::from(MAX_PFN_BYTES);
        g.mem.write_slice(&pfns, GuestAddress(addr)).unwrap();
        g.add_chain(0, &[(addr, MAX_PFN_BYTES, 0)]);
    }
    g.dev().queue_events()[0].write(1).unwrap();
    g.em.run_with_timeout(0).unwrap();
    assert_eq!(
        g.used(0).len(),
        chains - 1,
        "the event stopped once {RANGES_PER_CALL} ranges were gathered"
    );
    assert_eq!(g.pages.taken().len(), RANGES_PER_CALL);
    g.poll();
    assert_eq!(g.used(0).len(), 1, "and came back for the rest");
    assert_eq!(g.pages.taken().len(), chains * per_chain);
}

#[test]
fn a_lying_avail_index_makes_the_device_need_a_reset() {
    let mut g = TestGuest::new(config(0, false, 0, false));
    // An avail index 1000 ahead of the device's position is more chains than the queue holds.
    let avail = g.queues[0].avail_addr();
    g.mem.write_obj(1000u16, avail.unchecked_add(2)).unwrap();
    g.kick(0);
    assert!(!g.healthy());
    assert_eq!(g.dev().metrics().event_fails.count(), 1);
    assert!(g.pages.taken().is_empty());
}

#[test]
fn an_indirect_chain_needs_a_reset_after_the_chains_before_it_are_carried_out() {
    let mut g = TestGuest::new(config(0, false, 0, true));
    let q = g.dev().index.reporting.unwrap();
    let first = g.add_chain(q, &[(0x40_0000, 0x1000, VRING_DESC_F_WRITE)]);
    // INDIRECT was never offered: a table of descriptors the device does not follow.
    let bad = g.add_chain(
        q,
        &[(
            0x20_0000,
            16,
            VRING_DESC_F_WRITE | virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT,
        )],
    );
    g.kick(q);
    assert_eq!(g.pages.taken(), vec![0x40_0000..0x40_1000]);
    assert_eq!(
        g.used(q),
        vec![(u32::from(first), 0), (u32::from(bad), 0)],
        "both chains go back to the driver"
    );
    assert!(!g.healthy());
    assert_eq!(g.dev().metrics().event_fails.count(), 1);
}

#[test]
fn reset_forgets_the_queues_and_the_stats_buffer() {
    let mut g = TestGuest::new(config(0, false, 1, false));
    g.send_stats(&[(4, 1)]);
    g.dev().reset();
    assert!(!g.dev().is_activated());
    assert!(g.dev().stats_desc.is_none());
    g.dev().request_stats();
    g.inflate(&[1]);
    assert!(
        g.pages.taken().is_empty(),
        "an inactive device does nothing"
    );
}
