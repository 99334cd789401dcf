//! The MMDS's own end of the guest's network: Ethernet frames in (what the guest sends to the
//! MMDS address, taken off the network device's transmit path), Ethernet frames out (answers
//! for the guest's receive path), and a TCP/IP stack in between (smoltcp) that answers ARP for
//! the MMDS address and serves HTTP on port 80 through [`crate::respond`].
//!
//! No host networking is involved: the guest reaches 169.254.169.254 even on a NIC whose TAP
//! leads nowhere. The address is on-link for any guest address (its network is `/0`), so answers
//! go straight back to the MAC that asked, whatever the guest's own address is; and a packet for
//! it is taken whether the guest ARPed for the MMDS (a route on the interface, as Firecracker's
//! guides set) or sent it to its gateway's MAC (the default route).
//!
//! Bounds: [`CONNECTIONS`] TCP connections at once (more wait in the guest's SYN retries), each
//! one request and its answer, then closed; at most [`MAX_FRAMES`] frames queued each way. An
//! answer larger than a connection's send buffer goes out as the guest acknowledges it.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as NetInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};

use crate::{Mmds, request_len, respond};

/// The HTTP port.
pub const PORT: u16 = 80;
/// TCP connections served at once.
pub const CONNECTIONS: usize = 8;
/// Frames queued each way; past this, frames from the guest are dropped (TCP resends them).
pub const MAX_FRAMES: usize = 256;
/// Receive and send buffer of each connection (a request head is at most a few KiB).
const SOCKET_BUFFER: usize = 16 * 1024;
/// The largest Ethernet frame (no VLAN tag, no FCS).
const MAX_FRAME: usize = 1514;

/// Frames waiting to go into the stack and out of it.
#[derive(Default)]
struct Frames {
    from_guest: VecDeque<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        self.0.push_back(frame);
        r
    }
}

impl Device for Frames {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: NetInstant) -> Option<(Rx, Tx<'_>)> {
        if self.to_guest.len() >= MAX_FRAMES {
            return None;
        }
        let frame = self.from_guest.pop_front()?;
        Some((Rx(frame), Tx(&mut self.to_guest)))
    }

    fn transmit(&mut self, _: NetInstant) -> Option<Tx<'_>> {
        (self.to_guest.len() < MAX_FRAMES).then_some(Tx(&mut self.to_guest))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        // A guest with checksum offload (virtio-net's CSUM) sends TCP segments whose checksum
        // is only the pseudo-header's: not checked on the way in, computed on the way out.
        caps.checksum.tcp = Checksum::Tx;
        caps
    }
}

/// One connection slot: its socket, the request bytes read so far, and the answer's bytes not
/// yet taken by the socket.
struct Slot {
    handle: SocketHandle,
    request: Vec<u8>,
    answer: Option<(Vec<u8>, usize)>,
}

/// The MMDS's network stack for one VM.
pub struct MmdsStack {
    iface: Interface,
    sockets: SocketSet<'static>,
    frames: Frames,
    slots: Vec<Slot>,
    address: Ipv4Addr,
    started: std::time::Instant,
}

impl MmdsStack {
    /// A stack answering at `address` with the MAC `mac` (the guest learns it by ARP).
    pub fn new(address: Ipv4Addr, mac: [u8; 6]) -> Self {
        let mut frames = Frames::default();
        let started = std::time::Instant::now();
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        let mut iface = Interface::new(config, &mut frames, NetInstant::ZERO);
        iface.update_ip_addrs(|addrs| {
            // A /0 network: every guest address is on-link, so answers go back to its MAC.
            let _ = addrs.push(IpCidr::new(address.into(), 0));
        });
        let mut sockets = SocketSet::new(Vec::new());
        let slots = (0..CONNECTIONS)
            .map(|_| {
                let socket = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
                    tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
                );
                Slot {
                    handle: sockets.add(socket),
                    request: Vec::new(),
                    answer: None,
                }
            })
            .collect();
        Self {
            iface,
            sockets,
            frames,
            slots,
            address,
            started,
        }
    }

    /// The address the stack answers at.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// Takes a frame the guest sent to the MMDS, runs the stack and serves what became ready.
    /// An IPv4 frame is taken whatever its destination MAC: a guest without a route for the
    /// MMDS address sends it to its gateway's MAC, and it is still the MMDS's to answer.
    pub fn guest_frame(&mut self, frame: &[u8], mmds: &Mmds) {
        if self.frames.from_guest.len() < MAX_FRAMES {
            let mut frame = frame.to_vec();
            if frame.len() >= 14 && frame[12..14] == [0x08, 0x00] {
                frame[..6].copy_from_slice(self.iface.hardware_addr().as_bytes());
            }
            self.frames.from_guest.push_back(frame);
        }
        self.run(mmds);
    }

    /// Runs the stack (timers included) and serves requests; call it after frames go out too,
    /// so that a send buffer that drained is refilled.
    pub fn run(&mut self, mmds: &Mmds) {
        for _ in 0..4 {
            let now = NetInstant::from_micros(self.started.elapsed().as_micros() as i64);
            self.listen();
            self.iface.poll(now, &mut self.frames, &mut self.sockets);
            if !self.serve(mmds) {
                break;
            }
        }
    }

    /// Whether a frame for the guest is waiting.
    pub fn has_frame_for_guest(&self) -> bool {
        !self.frames.to_guest.is_empty()
    }

    /// The next frame for the guest.
    pub fn frame_for_guest(&mut self) -> Option<Vec<u8>> {
        self.frames.to_guest.pop_front()
    }

    /// Puts every idle slot back to listening on [`PORT`].
    fn listen(&mut self) {
        for slot in &mut self.slots {
            let socket = self.sockets.get_mut::<tcp::Socket>(slot.handle);
            if !socket.is_open() {
                slot.request.clear();
                slot.answer = None;
                if let Err(e) = socket.listen(PORT) {
                    log::warn!("mmds: cannot listen on port {PORT}: {e}");
                }
            }
        }
    }

    /// Reads requests, answers the complete ones and feeds answers to their sockets as their
    /// send buffers drain (an answer larger than a buffer goes out in turns); returns whether
    /// anything moved.
    fn serve(&mut self, mmds: &Mmds) -> bool {
        let mut moved = false;
        for slot in &mut self.slots {
            let socket = self.sockets.get_mut::<tcp::Socket>(slot.handle);
            if slot.answer.is_none() {
                while socket.can_recv() {
                    let mut chunk = [0u8; 4096];
                    match socket.recv_slice(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            slot.request.extend_from_slice(&chunk[..n]);
                            moved = true;
                        }
                    }
                }
                let answer = match request_len(&slot.request) {
                    Ok(None) => continue,
                    Ok(Some(len)) => respond(mmds, &slot.request[..len], std::time::Instant::now()),
                    Err(why) => crate::HttpResponse::text(400, why),
                };
                slot.answer = Some((answer.to_bytes(), 0));
            }
            if let Some((bytes, sent)) = &mut slot.answer
                && *sent < bytes.len()
            {
                let n = socket.send_slice(&bytes[*sent..]).unwrap_or(0);
                *sent += n;
                moved |= n > 0;
                if *sent == bytes.len() {
                    // One request per connection, as HTTP/1.0 or `Connection: close`.
                    socket.close();
                }
            }
        }
        moved
    }
}

#[cfg(test)]
#[path = "stack_tests.rs"]
mod tests;
