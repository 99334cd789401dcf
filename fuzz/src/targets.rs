//! The targets themselves. Each takes the fuzzer's bytes and returns nothing: errors are
//! expected answers to bad input; only a panic, a hang or unbounded memory is a finding.

use std::io::Read;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use kiln_agent::protocol::{Message, Request, read_frame};
use kiln_api::http::{Parsed, RequestReader};
use kiln_devices::BusDevice;
use kiln_devices::rate_limiter::{BucketConfig, MonotonicClock, RateLimiterConfig};
use kiln_devices::virtio::balloon::{Balloon, BalloonConfig, DiscardError, GuestPages};
use kiln_devices::virtio::block::{Block, BlockConfig};
use kiln_devices::virtio::net::{Net, NetConfig, Tap};
use kiln_devices::virtio::vsock::Vsock;
use kiln_devices::virtio::{MmioTransport, VirtioDevice};
use kiln_net::link;
use kiln_net::netns::NetNs;
use vmm_sys_util::eventfd::EventFd;

use crate::guest::{Memory, activate_and_drive, drive, queue_size};

/// A scratch file or socket path unique to this process.
fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kiln-fuzz-{}-{name}", std::process::id()))
}

/// A 64-sector disk image made once per process.
fn disk() -> &'static PathBuf {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = scratch("disk.img");
        std::fs::write(&path, vec![0x5au8; 64 * 512]).expect("the fuzz disk image");
        path
    })
}

fn irq() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd")
}

/// A block device on the scratch disk; `throttled` puts a small rate limiter in front of it so
/// the throttle-and-requeue path is fuzzed too; `cow` (for a writable drive) puts a fresh
/// copy-on-write overlay over the disk.
fn block(read_only: bool, throttled: bool, cow: bool) -> Block {
    let bucket = |size| BucketConfig {
        size,
        one_time_burst: 0,
        refill_time_ms: 1,
    };
    let rate_limiter = if throttled {
        RateLimiterConfig {
            bandwidth: Some(bucket(4096)),
            ops: Some(bucket(4)),
        }
    } else {
        RateLimiterConfig::default()
    };
    let cow_overlay = (cow && !read_only).then(|| {
        let overlay = scratch("overlay.img");
        std::fs::File::create(&overlay).expect("the fuzz overlay");
        overlay
    });
    let cfg = BlockConfig {
        id: "fuzz".into(),
        path: disk().clone(),
        cow_overlay,
        read_only,
        rate_limiter,
        io_engine: Default::default(),
    };
    Block::new(cfg, irq()).expect("the fuzz block device")
}

/// virtio-blk's queue: byte 0 picks the queue size, read-only, a rate limiter and a
/// copy-on-write overlay, the rest fills guest memory
/// (descriptor table, rings, request headers and buffers alike).
pub fn blk_queue(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mem = Memory::new(rest);
    let mut dev = block(first & 0x80 != 0, first & 0x40 != 0, first & 0x20 != 0);
    dev.set_acked_features(dev.avail_features());
    if dev
        .activate(mem.0.clone(), mem.queues(1, queue_size(first)))
        .is_err()
    {
        return;
    }
    drive(Arc::new(Mutex::new(dev)), 64);
}

/// virtio-vsock's three queues, laid out by the input as in [`blk_queue`]; the device has no
/// host connections, so what the guest sends is routed, refused or answered with RSTs.
pub fn vsock_queue(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let uds = scratch("vsock.sock");
    let _ = std::fs::remove_file(&uds);
    let Ok(mut dev) = Vsock::new(3, uds.clone(), irq()) else {
        return;
    };
    dev.set_acked_features(dev.avail_features());
    activate_and_drive(dev, &Memory::new(rest), 3, queue_size(first));
    let _ = std::fs::remove_file(&uds);
}

/// Guest memory as the balloon target's device sees it: what the guest gives up is counted,
/// never freed (the pages are the input's).
struct CountedPages;

impl GuestPages for CountedPages {
    fn discard(&self, ranges: &[Range<u64>]) -> Result<u64, DiscardError> {
        Ok(ranges.iter().map(|r| r.end - r.start).sum())
    }
}

/// virtio-balloon's queues, laid out by the input as in [`blk_queue`]: inflate and deflate, plus
/// the statistics queue (byte 0 bit 6) and the free page reporting queue (bit 5); bit 7 offers
/// deflate-on-OOM, the low bits pick the queue size. Page frame numbers, reported ranges and
/// statistics all come from the guest's bytes.
pub fn balloon_queue(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let (stats, reporting) = (first & 0x40 != 0, first & 0x20 != 0);
    let config = BalloonConfig {
        amount_mib: 0,
        deflate_on_oom: first & 0x80 != 0,
        stats_polling_interval_s: u16::from(stats),
        free_page_reporting: reporting,
    };
    let Ok(mut dev) = Balloon::new(config, 1, Arc::new(CountedPages), irq()) else {
        return;
    };
    dev.set_acked_features(dev.avail_features());
    let count = 2 + usize::from(stats) + usize::from(reporting);
    activate_and_drive(dev, &Memory::new(rest), count, queue_size(first));
}

/// The name of the net target's TAP.
const FUZZ_TAP: &str = "kfuzz0";

/// The TAP the net target's devices attach, up, in a network namespace of its own made once per
/// process (so frames the guest sends reach no real network). Needs root (CAP_NET_ADMIN): the
/// target panics without it rather than fuzz nothing.
fn fuzz_tap_ns() -> &'static NetNs {
    static NS: OnceLock<NetNs> = OnceLock::new();
    NS.get_or_init(|| {
        let made = NetNs::new().map_err(|e| e.to_string()).and_then(|ns| {
            ns.run(|| {
                link::create_tap(FUZZ_TAP, [2, 0, 0, 0, 0, 1]).and_then(|()| link::up(FUZZ_TAP))
            })
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            Ok(ns)
        });
        made.unwrap_or_else(|e| panic!("net_queue needs root for its TAP {FUZZ_TAP}: {e}"))
    })
}

/// virtio-net's receive and transmit queues, laid out by the input as in [`blk_queue`], on a TAP
/// that is up in an empty namespace: transmitted chains (virtio-net headers, GSO and checksum
/// requests, frames split anyhow) are parsed and written to it. Byte 0: bit 7 gives the device a
/// MAC, bit 6 leaves mergeable receive buffers unacked, the low bits pick the queue size.
pub fn net_queue(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(Ok(tap)) = fuzz_tap_ns().run(|| Tap::open(FUZZ_TAP)) else {
        return;
    };
    let config = NetConfig {
        id: "fuzz".into(),
        host_dev_name: FUZZ_TAP.into(),
        guest_mac: (first & 0x80 != 0).then_some([6, 0, 0xac, 0x10, 0, 2]),
        rx_rate_limiter: RateLimiterConfig::default(),
        tx_rate_limiter: RateLimiterConfig::default(),
    };
    let clock = Arc::new(MonotonicClock::default());
    let Ok(mut dev) = Net::with_tap(config, tap, irq(), clock) else {
        return;
    };
    let mut features = dev.avail_features();
    if first & 0x40 != 0 {
        features &= !(1 << kiln_devices::virtio::net::features::MRG_RXBUF);
    }
    dev.set_acked_features(features);
    activate_and_drive(dev, &Memory::new(rest), 2, queue_size(first));
}

/// Register accesses on a virtio-mmio transport in front of a block device: 7-byte records
/// (offset u16, value u32, flags u8: bit 0 write, bits 1-2 access width 1/2/4/8), with guest
/// memory filled from the input too, so a driver that activates gets rings made of its bytes.
pub fn mmio(data: &[u8]) {
    let mem = Memory::new(data);
    let dev = Arc::new(Mutex::new(block(false, false, false)));
    let mut t = MmioTransport::new(dev.clone(), mem.0.clone());
    for rec in data.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([rec[0], rec[1]])) % 0x1100;
        let value = u64::from(u32::from_le_bytes([rec[2], rec[3], rec[4], rec[5]]));
        let width = [1usize, 2, 4, 8][usize::from((rec[6] >> 1) & 3)];
        if rec[6] & 1 == 1 {
            t.write(offset, &value.to_le_bytes()[..width]);
        } else {
            let mut buf = [0u8; 8];
            t.read(offset, &mut buf[..width]);
        }
    }
    // Whatever the driver activated runs once.
    if dev.lock().map(|d| d.is_activated()).unwrap_or(false) {
        drive(dev, 16);
    }
}

/// A reader that hands out the input in pieces whose sizes come from the input itself.
struct Pieces<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    turn: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let size = self
            .sizes
            .get(self.turn % self.sizes.len().max(1))
            .map_or(4096, |&s| usize::from(s) + 1);
        self.turn += 1;
        let n = size.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// The API's HTTP reader: byte 0 says how many of the following bytes give the sizes of the
/// reads the rest arrives in; every request parsed goes through the router and body parsers.
pub fn http_request(data: &[u8]) {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let (sizes, body) = rest.split_at(usize::from(k % 16).min(rest.len()));
    let mut src = Pieces {
        data: body,
        sizes,
        turn: 0,
    };
    let mut reader = RequestReader::new();
    for _ in 0..4096 {
        match reader.fill(&mut src) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            match reader.parse() {
                Ok(Parsed::Request(req)) => {
                    let _ = kiln_api::parse_request(&req.method, &req.target, &req.body);
                }
                Ok(Parsed::Incomplete { .. }) => break,
                Err(_) => return,
            }
        }
    }
}

/// Every API body on every route: byte 0 picks the route (its `{drive_id}` filled from byte 1),
/// the rest is the body.
pub fn api_body(data: &[u8]) {
    let [pick, id, body @ ..] = data else {
        return;
    };
    let routes = kiln_api::ROUTES;
    let route = &routes[usize::from(*pick) % routes.len()];
    let id = ["rootfs", "d", "", "x/../y", "é"][usize::from(*id) % 5];
    let path = route.path.replace("{drive_id}", id);
    let _ = kiln_api::parse_request(route.method, &path, body);
}

/// A snapshot state file whose payload is the input, with a right header and CRC: decoding and
/// the restore path's validation.
pub fn snapshot_state(data: &[u8]) {
    let _ = kiln_vmm::persist::validate::check_payload(data);
}

/// The agent protocol: the input as a stream of frames, each decoded as either end would.
pub fn agent_frames(data: &[u8]) {
    let mut r = data;
    while let Ok(Some(frame)) = read_frame(&mut r) {
        if let Ok(Message::Request(_, Request::Restored(spec))) = Message::decode(frame) {
            let _ = spec.validate();
        }
    }
}

/// The post-restore request as JSON (the input follows `{"op":"restored",`), through the
/// request decoder and the step's rules.
pub fn agent_restore(data: &[u8]) {
    let data = &data[..data.len().min(64 * 1024)];
    let frame = kiln_agent::protocol::frame::encode_frame(
        kiln_agent::protocol::message::KIND_REQUEST,
        1,
        &[br#"{"op":"restored","#, data],
    );
    if let Ok(Some(raw)) = read_frame(&mut &frame[..])
        && let Ok(Message::Request(_, Request::Restored(spec))) = Message::decode(raw)
    {
        let _ = spec.validate();
    }
}
