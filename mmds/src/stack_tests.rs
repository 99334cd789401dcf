//! The stack against a second smoltcp interface playing the guest: frames go back and forth
//! by hand, as the network device would carry them.

use std::net::Ipv4Addr;

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as NetInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use super::*;

const MMDS_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);

/// The guest: an interface on 172.16.0.2/30 with a default route through the MMDS address's
/// link (as a guest with `ip route add 169.254.169.254 dev eth0` has), and its frames.
struct Guest {
    iface: Interface,
    frames: Frames,
    sockets: SocketSet<'static>,
}

impl Guest {
    fn new() -> Self {
        let mut frames = Frames::default();
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress([
            6, 0, 0xac, 0x10, 0, 2,
        ])));
        let mut iface = Interface::new(config, &mut frames, NetInstant::ZERO);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(GUEST_ADDR.into(), 0));
        });
        Guest {
            iface,
            frames,
            sockets: SocketSet::new(Vec::new()),
        }
    }
}

/// Runs both ends until nothing moves; `t` is the guest's clock in ms.
fn shuttle(guest: &mut Guest, mmds: &mut MmdsStack, store: &Mmds, t: &mut i64) {
    for _ in 0..200 {
        *t += 1;
        guest.iface.poll(
            NetInstant::from_millis(*t),
            &mut guest.frames,
            &mut guest.sockets,
        );
        let mut moved = false;
        while let Some(frame) = guest.frames.to_guest.pop_front() {
            mmds.guest_frame(&frame, store);
            moved = true;
        }
        mmds.run(store);
        while let Some(frame) = mmds.frame_for_guest() {
            guest.frames.from_guest.push_back(frame);
            moved = true;
        }
        if !moved && *t > 50 {
            break;
        }
    }
}

/// One connection from guest port `port`: sends `request`, returns what came back, then closes
/// its end as a client does.
fn fetch(store: &Mmds, mmds: &mut MmdsStack, port: u16, request: &str) -> String {
    let mut guest = Guest::new();
    let socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 65536]),
        tcp::SocketBuffer::new(vec![0; 65536]),
    );
    let handle = guest.sockets.add(socket);
    let mut t = 0;
    guest
        .sockets
        .get_mut::<tcp::Socket>(handle)
        .connect(
            guest.iface.context(),
            (IpAddress::from(MMDS_ADDR), 80),
            port,
        )
        .unwrap();
    shuttle(&mut guest, mmds, store, &mut t);
    let socket = guest.sockets.get_mut::<tcp::Socket>(handle);
    assert!(socket.may_send(), "connected: {}", socket.state());
    socket.send_slice(request.as_bytes()).unwrap();
    shuttle(&mut guest, mmds, store, &mut t);
    // Read as it comes (an answer may be larger than the guest's window), until the MMDS closes.
    let mut answer = Vec::new();
    for _ in 0..100 {
        let socket = guest.sockets.get_mut::<tcp::Socket>(handle);
        let mut chunk = vec![0u8; 65536];
        let n = socket.recv_slice(&mut chunk).unwrap_or(0);
        answer.extend_from_slice(&chunk[..n]);
        if n == 0 && !socket.may_recv() {
            break;
        }
        shuttle(&mut guest, mmds, store, &mut t);
    }
    guest.sockets.get_mut::<tcp::Socket>(handle).close();
    shuttle(&mut guest, mmds, store, &mut t);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn a_guest_connects_over_tcp_and_reads_the_metadata() {
    let mut store = Mmds::new(51200);
    store
        .put(serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-12345678"}}}))
        .unwrap();
    let mut mmds = MmdsStack::new(MMDS_ADDR, [6, 1, 2, 3, 4, 5]);
    let answer = fetch(
        &store,
        &mut mmds,
        49152,
        "GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: 169.254.169.254\r\nAccept: application/json\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.ends_with("\"ami-12345678\""), "{answer:?}");
    // The slot is free again: a second connection is served too.
    let again = fetch(
        &store,
        &mut mmds,
        49153,
        "GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n",
    );
    assert!(again.starts_with("HTTP/1.1 200"), "{again:?}");
}

#[test]
fn an_answer_larger_than_the_send_buffer_arrives_whole() {
    let mut store = Mmds::new(200_000);
    let big = "k".repeat(100_000);
    store.put(serde_json::json!({ "big": big })).unwrap();
    let mut mmds = MmdsStack::new(MMDS_ADDR, [6, 1, 2, 3, 4, 5]);
    let answer = fetch(
        &store,
        &mut mmds,
        49200,
        "GET /big HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n",
    );
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{}",
        &answer[..80.min(answer.len())]
    );
    assert!(
        answer.ends_with(&format!("\"{big}\"")),
        "{} bytes",
        answer.len()
    );
}

#[test]
fn a_malformed_request_gets_400_and_the_connection_ends() {
    let store = Mmds::new(51200);
    let mut mmds = MmdsStack::new(MMDS_ADDR, [6, 1, 2, 3, 4, 5]);
    let answer = fetch(&store, &mut mmds, 49152, "NOT HTTP AT ALL\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
}
