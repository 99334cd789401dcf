//! The network device end to end through its queues: frames both ways with their offload
//! headers, mergeable buffers, waiting for room without stranding a burst, offloads passed to
//! the TAP, hostile chains, the work budget, the rate limiters, and the frame hook.

use std::time::Duration;

use super::test_utils::{MAC, MEM_SIZE, TestNet, VnetHdr, frame, without_mrg};
use super::*;
use crate::rate_limiter::{BucketConfig, BucketUpdate, RateLimiterConfig};
use crate::virtio::{VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use vm_memory::{Bytes, GuestAddress};

const GSO_TCPV4: u8 = 1;
const NEEDS_CSUM: u8 = 1;

fn tso_header() -> VnetHdr {
    VnetHdr {
        flags: NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    }
}

fn limits(size: u64, refill_ms: u64, ops: bool) -> RateLimiterConfig {
    let b = BucketConfig {
        size,
        one_time_burst: 0,
        refill_time_ms: refill_ms,
    };
    if ops {
        RateLimiterConfig {
            bandwidth: None,
            ops: Some(b),
        }
    } else {
        RateLimiterConfig {
            bandwidth: Some(b),
            ops: None,
        }
    }
}

#[test]
fn config_space_has_the_mac_and_link_up_and_features_follow_it() {
    let t = TestNet::new();
    let mut c = [0u8; 8];
    t.dev().read_config(0, &mut c);
    assert_eq!(c[..6], MAC);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "VIRTIO_NET_S_LINK_UP");
    assert_ne!(t.dev().avail_features() & (1 << features::MAC), 0);
    let t = TestNet::new_with(None, Default::default(), Default::default());
    assert_eq!(
        t.dev().avail_features() & (1 << features::MAC),
        0,
        "no MAC offered: the guest picks its own"
    );
}

#[test]
fn guest_frames_reach_the_tap_with_their_offload_header() {
    let mut t = TestNet::new();
    let f = frame(9000, 7);
    let hdr = tso_header();
    // Header alone, then the frame in two pieces, as Linux lays out a GSO skb.
    t.queue_tx_split(hdr, &f, &[12, 12 + 54]);
    t.kick_tx();
    t.run();
    let got = t.host_receives();
    assert_eq!(got.len(), 1);
    assert_eq!(
        VnetHdr::parse(&got[0]),
        hdr,
        "the header passes through as the guest wrote it"
    );
    assert_eq!(got[0][HDR_LEN..], f[..]);
    assert_eq!(t.tx_used(), 1);
    assert!(t.interrupts() > 0);
    let c = t.dev().counters();
    assert_eq!((c.tx_frames, c.tx_bytes), (1, 9000));
}

#[test]
fn a_gso_frame_spans_mergeable_buffers_with_num_buffers_set() {
    let mut t = TestNet::new();
    t.give_rx(64, 4096);
    let f = frame(60_000, 3);
    let hdr = tso_header();
    t.host_sends(hdr, &f);
    t.run();
    let got = t.guest_receives();
    assert_eq!(got.len(), 1);
    let (h, bytes) = &got[0];
    assert_eq!(
        usize::from(h.num_buffers),
        (HDR_LEN + 60_000).div_ceil(4096)
    );
    assert_eq!(
        VnetHdr {
            num_buffers: 0,
            ..*h
        },
        hdr,
        "the TAP's header reaches the guest, num_buffers added"
    );
    assert_eq!(bytes.len(), f.len());
    assert!(*bytes == f, "frame bytes intact across buffers");
    let c = t.dev().counters();
    assert_eq!((c.rx_frames, c.rx_bytes, c.rx_dropped), (1, 60_000, 0));
}

#[test]
fn a_burst_waits_for_room_and_then_arrives_whole_and_in_order() {
    let mut t = TestNet::new();
    // 10 x 4 KiB is less than a 64 KiB GSO frame could need: the device must not read yet.
    t.give_rx(10, 4096);
    for i in 0..20 {
        t.host_sends(VnetHdr::default(), &frame(100 + i, i as u8));
    }
    t.run();
    assert!(
        t.guest_receives().is_empty(),
        "nothing read without room for any frame"
    );
    assert!(t.rx_used().is_empty());
    // The TAP is not watched meanwhile: the loop is quiet although frames wait.
    assert_eq!(t.run(), 0);
    t.give_rx(100, 4096);
    let got = t.guest_receives();
    assert_eq!(got.len(), 20, "the whole burst, none stranded");
    for (i, (h, bytes)) in got.iter().enumerate() {
        assert_eq!(h.num_buffers, 1);
        assert_eq!(*bytes, frame(100 + i, i as u8), "frame {i} in order");
    }
}

#[test]
fn chains_a_walk_took_but_no_frame_filled_are_the_next_walks_first() {
    let mut t = TestNet::new();
    // Each walk takes room for a 64 KiB frame (17 buffers) and small frames fill one each.
    t.give_rx(40, 4096);
    for i in 0..3 {
        t.host_sends(VnetHdr::default(), &frame(100, i));
    }
    t.run();
    let first = t.rx_used();
    for i in 3..6 {
        t.host_sends(VnetHdr::default(), &frame(200, i));
    }
    t.run();
    let second = t.rx_used();
    let ids: Vec<u16> = first.iter().chain(&second).map(|&(id, _)| id).collect();
    assert_eq!(
        ids,
        [0, 1, 2, 3, 4, 5],
        "buffers used in ring order, none skipped"
    );
    let lens: Vec<u32> = first.iter().chain(&second).map(|&(_, len)| len).collect();
    let (small, large) = ((HDR_LEN + 100) as u32, (HDR_LEN + 200) as u32);
    assert_eq!(lens, [small, small, small, large, large, large]);
    // And the 34 left are all still the guest's: a 64 KiB frame fits in them.
    t.host_sends(tso_header(), &frame(60_000, 9));
    t.run();
    let got = t.guest_receives();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, frame(60_000, 9));
}

#[test]
fn with_the_event_index_a_short_ring_asks_to_hear_of_the_next_buffer() {
    let mut t = TestNet::build(
        Some(MAC),
        Default::default(),
        Default::default(),
        |f| f,
        true,
    );
    t.give_rx(5, 4096);
    t.host_sends(VnetHdr::default(), &frame(60, 1));
    t.run();
    assert!(t.guest_receives().is_empty());
    // avail_event (after the used ring) is the driver's index: its next buffer notifies.
    assert_eq!(t.rx_avail_event(), 5);
    t.give_rx(20, 4096);
    assert_eq!(t.guest_receives().len(), 1);
}

#[test]
fn without_mergeable_buffers_each_frame_takes_one_chain() {
    let mut t = TestNet::build(
        Some(MAC),
        Default::default(),
        Default::default(),
        |f| without_mrg(f) & !(1 << features::GUEST_TSO4) & !(1 << features::GUEST_TSO6),
        false,
    );
    t.give_rx(4, 1600);
    t.host_sends(VnetHdr::default(), &frame(1514, 1));
    t.host_sends(VnetHdr::default(), &frame(2000, 2)); // larger than any buffer
    t.host_sends(VnetHdr::default(), &frame(64, 3));
    t.run();
    let got = t.guest_receives();
    assert_eq!(
        got.len(),
        2,
        "the frame that fits no buffer is dropped, not the others"
    );
    assert_eq!(got[0].0.num_buffers, 1);
    assert_eq!(got[0].1, frame(1514, 1));
    assert_eq!(got[1].1, frame(64, 3));
    assert_eq!(t.dev().counters().rx_dropped, 1);
    let m = t.dev().metrics();
    assert_eq!(
        (
            m.rx_packets_count.count(),
            m.rx_bytes_count.count(),
            m.rx_fails.count()
        ),
        (2, 1514 + 64, 1)
    );
    assert!(m.rx_tap_event_count.count() >= 1);
    assert!(t.healthy());
}

#[test]
fn the_guests_receive_offloads_are_set_on_the_tap() {
    let t = TestNet::new();
    let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    assert_eq!(t.dev().tap().offload(), all);
    assert_eq!(t.dev().max_rx_len(), HDR_LEN + MAX_GSO_FRAME);
    let only_csum = |f: u64| f & !(1 << features::GUEST_TSO4) & !(1 << features::GUEST_TSO6);
    let t = TestNet::build(
        Some(MAC),
        Default::default(),
        Default::default(),
        only_csum,
        false,
    );
    assert_eq!(t.dev().tap().offload(), libc::TUN_F_CSUM);
    assert_eq!(t.dev().max_rx_len(), HDR_LEN + MAX_PLAIN_FRAME);
    // TSO without checksum offload is not something the TAP can do.
    let no_csum = |f: u64| f & !(1 << features::GUEST_CSUM);
    let t = TestNet::build(
        Some(MAC),
        Default::default(),
        Default::default(),
        no_csum,
        false,
    );
    assert_eq!(t.dev().tap().offload(), 0);
}

#[test]
fn frames_in_indirect_tables_are_sent_whole() {
    let mut t = TestNet::new();
    assert_ne!(
        t.dev().acked_features() & (1 << VIRTIO_RING_F_INDIRECT_DESC),
        0,
        "offered, so a GSO frame of many pieces takes one ring slot"
    );
    let f = frame(20_000, 3);
    t.queue_tx_indirect(tso_header(), &f, &[12, 12 + 54, 4096, 8192, 12288]);
    t.queue_tx_indirect(VnetHdr::default(), &frame(60, 5), &[]);
    t.kick_tx();
    t.run();
    let got = t.host_receives();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0][HDR_LEN..], f[..]);
    assert_eq!(got[1][HDR_LEN..], frame(60, 5)[..]);
    assert_eq!(t.tx_used(), 2);
    // A table whose descriptor points back at itself ends at the table's size, a table that
    // is not whole descriptors is dropped: the device goes on.
    let loop_table = 0x200_0000;
    t.mem
        .write_obj(
            RawDescriptor::from(SplitDescriptor::new(
                0x200_1000,
                100,
                VRING_DESC_F_NEXT as u16,
                0,
            )),
            GuestAddress(loop_table),
        )
        .unwrap();
    t.queue_tx_raw(&[(loop_table, 16, VRING_DESC_F_INDIRECT)]);
    t.queue_tx_raw(&[(loop_table, 15, VRING_DESC_F_INDIRECT)]);
    t.queue_tx_indirect(VnetHdr::default(), &frame(70, 1), &[30]);
    t.kick_tx();
    t.run();
    assert_eq!(t.tx_used(), 5, "every chain is given back");
    let got = t.host_receives();
    assert_eq!(got.last().map(|g| &g[HDR_LEN..]), Some(&frame(70, 1)[..]));
    assert!(t.healthy());
}

#[test]
fn hostile_transmit_chains_are_dropped_and_the_device_goes_on() {
    let mut t = TestNet::new();
    let w = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    t.queue_tx_raw(&[(0x200_0000, 12, 0), (0x200_0100, 100, w)]); // writable data
    t.queue_tx_raw(&[(0x200_0000, 20, 0)]); // shorter than a header and an Ethernet header
    t.queue_tx_raw(&[(MEM_SIZE as u64 - 16, 200, 0)]); // off the end of guest memory
    t.queue_tx_raw(&[(0x200_0000, 70_000, 0)]); // longer than any frame
    t.queue_tx_split(VnetHdr::default(), &frame(60, 9), &[]);
    t.kick_tx();
    t.run();
    assert_eq!(t.tx_used(), 5, "every chain is given back");
    let got = t.host_receives();
    assert_eq!(got.len(), 1, "only the good frame reaches the TAP");
    assert_eq!(got[0][HDR_LEN..], frame(60, 9)[..]);
    assert_eq!(t.dev().counters().tx_dropped, 4);
    assert!(t.healthy());
    let m = t.dev().metrics();
    assert_eq!(
        (
            m.tx_packets_count.count(),
            m.tx_bytes_count.count(),
            m.tx_fails.count(),
            m.tx_malformed_frames.count()
        ),
        (1, 60, 4, 4),
        "the metrics file counts what the device did"
    );
    assert!(m.tx_queue_event_count.count() >= 1);
    let report = m.report();
    assert_eq!(report["tx_packets_count"], 1, "{report:?}");
    assert_eq!(
        m.report()["tx_packets_count"],
        0,
        "a report gives what happened since the previous one"
    );
}

#[test]
fn a_hostile_receive_chain_is_given_back_empty() {
    let mut t = TestNet::new();
    t.give_rx_raw(&[(0x10_0000, 4096, 0)]); // readable: the device may not write there
    t.give_rx_raw(&[(
        0x10_0000,
        8,
        virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE,
    )]); // smaller than a header
    t.give_rx(20, 4096);
    t.host_sends(VnetHdr::default(), &frame(80, 4));
    t.run();
    let used = t.rx_used();
    assert_eq!(used[0].1, 0);
    assert_eq!(used[1].1, 0);
    assert_eq!(
        used[2].1 as usize,
        HDR_LEN + 80,
        "the frame lands in the next good buffer"
    );
    assert!(t.healthy());
}

#[test]
fn a_bad_receive_chain_behind_good_ones_ends_their_room() {
    // Two good buffers (too little for a 64 KiB frame), then a readable one: the chains behind it
    // can never join the two, so the walk uses what it has. It once waited for more room instead,
    // and since the chains behind the bad one never joined, no frame came in again.
    let mut t = TestNet::new();
    t.give_rx(2, 4096); // heads 0 and 1
    t.give_rx_raw(&[(0x10_0000, 4096, 0)]); // head 2
    t.give_rx(20, 4096); // heads 3 on
    let mut used = Vec::new();
    for i in 0..3 {
        t.host_sends(VnetHdr::default(), &frame(80, i));
        t.run();
        used.extend(t.rx_used());
    }
    let full = (HDR_LEN + 80) as u32;
    assert_eq!(
        used,
        [(0, full), (1, full), (2, 0), (3, full)],
        "each frame in the next good buffer, the bad one given back empty when it comes first"
    );
    assert!(t.healthy());
}

#[test]
fn a_lying_avail_index_marks_the_device_for_reset() {
    let mut t = TestNet::new();
    t.txq.avail().idx().store(1000);
    t.kick_tx();
    t.run();
    assert!(!t.healthy());
    // And it stays quiet afterwards, frames from the host or not.
    t.host_sends(VnetHdr::default(), &frame(60, 0));
    assert!(t.run() <= 2);
}

#[test]
fn one_call_moves_at_most_its_budget_then_comes_back() {
    let mut t = TestNet::new();
    for i in 0..300 {
        t.host_sends(VnetHdr::default(), &frame(60, i as u8));
    }
    // Room for every frame: the budget, not the guest, is what stops the walk.
    // 4 KiB buffers: the device takes 17 of them at a time for a frame that might be 64 KiB.
    t.add_rx(300 + 17, 4096);
    t.kick_rx();
    t.run_once();
    assert_eq!(t.rx_used().len(), RX_BUDGET, "one call, one budget");
    t.run();
    assert_eq!(
        t.rx_used().len(),
        300 - RX_BUDGET,
        "the rest on the next turn"
    );
}

#[test]
fn the_transmit_limiter_holds_frames_until_its_bucket_refills() {
    // 3000 bytes a second.
    let mut t = TestNet::new_with(Some(MAC), Default::default(), limits(3000, 1000, false));
    for i in 0..5 {
        t.queue_tx_split(VnetHdr::default(), &frame(1000, i), &[]);
    }
    t.kick_tx();
    t.run();
    assert_eq!(t.host_receives().len(), 3);
    assert_eq!(t.tx_used(), 3);
    t.clock.advance(Duration::from_secs(1));
    // The device set a (real) timer for the refill; let it fire.
    std::thread::sleep(Duration::from_millis(5));
    t.run();
    assert_eq!(t.host_receives().len(), 2);
    assert_eq!(t.tx_used(), 5);
}

#[test]
fn the_receive_limiter_holds_frames_in_the_tap() {
    // Two frames a second.
    let mut t = TestNet::new_with(Some(MAC), limits(2, 1000, true), Default::default());
    t.give_rx(50, 4096);
    for i in 0..4 {
        t.host_sends(VnetHdr::default(), &frame(200, i));
    }
    t.run();
    assert_eq!(t.guest_receives().len(), 2);
    // The device set its timer for the next token, half a second away.
    let wait = t.rx_timer_left();
    assert!(
        wait > Duration::from_millis(490) && wait <= Duration::from_millis(500),
        "{wait:?}"
    );
    t.clock.advance(Duration::from_secs(1));
    t.expire_timers();
    t.run();
    let rest = t.guest_receives();
    assert_eq!(rest.len(), 2);
    assert_eq!(rest[1].1, frame(200, 3));
}

#[test]
fn lifting_a_limit_lets_held_frames_go_at_once() {
    let mut t = TestNet::new_with(Some(MAC), Default::default(), limits(1000, 60_000, false));
    for i in 0..4 {
        t.queue_tx_split(VnetHdr::default(), &frame(1000, i), &[]);
    }
    t.kick_tx();
    t.run();
    assert_eq!(t.host_receives().len(), 1);
    let off = BucketUpdate::Set(BucketConfig {
        size: 0,
        one_time_burst: 0,
        refill_time_ms: 0,
    });
    t.dev()
        .update_rate_limiters([BucketUpdate::Keep; 2], [off, BucketUpdate::Keep]);
    t.run();
    assert_eq!(t.host_receives().len(), 3);
    assert_eq!(
        t.dev().config().tx_rate_limiter,
        RateLimiterConfig::default()
    );
}

/// Answers ARP requests for 169.254.169.254 with a fixed frame, as an MMDS stack would.
struct ArpHook {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    answers: Vec<Vec<u8>>,
}

impl FrameHook for ArpHook {
    fn claims(&self, head: &[u8]) -> bool {
        hook::frame_targets_ipv4(head, [169, 254, 169, 254])
    }
    fn guest_frame(&mut self, frame: &[u8]) {
        self.seen.lock().unwrap().push(frame.to_vec());
        self.answers.push(vec![0xab; 42]);
    }
    fn has_frame_for_guest(&self) -> bool {
        !self.answers.is_empty()
    }
    fn frame_for_guest(&mut self, buf: &mut [u8]) -> Option<usize> {
        let f = self.answers.pop()?;
        buf[..f.len()].copy_from_slice(&f);
        Some(f.len())
    }
}

#[test]
fn a_frame_hook_takes_its_frames_and_answers_before_the_tap() {
    let mut t = TestNet::new();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    t.dev().set_frame_hook(Box::new(ArpHook {
        seen: seen.clone(),
        answers: Vec::new(),
    }));
    let mut arp = vec![0xffu8; 12];
    arp.extend_from_slice(&[0x08, 0x06]);
    let mut body = vec![0u8; 28];
    body[24..28].copy_from_slice(&[169, 254, 169, 254]);
    arp.extend_from_slice(&body);
    // No receive buffers yet: a frame from the TAP and the hook's answer both wait.
    t.host_sends(VnetHdr::default(), &frame(70, 5));
    t.queue_tx_split(VnetHdr::default(), &arp, &[]);
    t.queue_tx_split(VnetHdr::default(), &frame(60, 1), &[]);
    t.kick_tx();
    t.run();
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [arp.clone()],
        "the hook got the ARP request"
    );
    let to_tap = t.host_receives();
    assert_eq!(to_tap.len(), 1, "the TAP got only the other frame");
    assert_eq!(to_tap[0][HDR_LEN..], frame(60, 1)[..]);
    t.give_rx(20, 4096);
    let got = t.guest_receives();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].1, vec![0xab; 42], "the hook's answer first");
    assert_eq!(
        got[0].0,
        VnetHdr {
            num_buffers: 1,
            ..Default::default()
        }
    );
    assert_eq!(got[1].1, frame(70, 5));
    assert_eq!(t.dev().counters().tx_hooked, 1);
}

#[test]
fn a_reset_device_stops_reading_the_tap() {
    let mut t = TestNet::new();
    t.give_rx(10, 4096);
    t.dev().reset();
    t.run();
    t.host_sends(VnetHdr::default(), &frame(60, 0));
    assert_eq!(t.run(), 0, "nothing watches the TAP after a reset");
    assert!(t.rx_used().is_empty());
    assert_eq!(t.dev().acked_features(), 0);
}
