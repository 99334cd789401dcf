//! The connection table: routes the guest's packets to connections by (local port, peer port),
//! opens connections both ways, and decides what goes into each rx buffer.
//!
//! The muxer never touches epoll itself. It says what each host socket should be watched for
//! ([`Connection::interest`]) and [`Muxer::sync_epoll`] makes the event loop agree, removing a
//! socket before the socket is closed (sockets of dropped connections wait in a graveyard until
//! then), so the event manager never holds a stale descriptor.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Instant;
use vm_memory::bitmap::BitmapSlice;

use event_manager::EventSet;

use super::connection::{Connection, Fill, Verdict};
use super::host_socket::{connect_nonblocking, reconcile};
use super::packet::{self, Header, Packet, Refusal};
use super::{
    CONNECT_LINE_MAX, FIRST_HOST_PORT, HANDSHAKE_TIMEOUT, HOST_CID, LogOnce, MAX_CONNECTIONS,
    MAX_GUEST_CONNECTIONS, MAX_PENDING_RST, Misbehaviour, op,
};

/// A connection's address: the host side's port and the guest side's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The host side's port (the guest's `dst_port`).
    pub local_port: u32,
    /// The guest side's port (the guest's `src_port`).
    pub peer_port: u32,
}

/// The event loop as the muxer sees it: watch, re-watch or forget a host socket.
pub trait Poller {
    /// Starts watching `fd` for `set`; false if that failed.
    fn add(&mut self, fd: RawFd, set: EventSet) -> bool;
    /// Watches `fd` for `set` instead; false if that failed.
    fn modify(&mut self, fd: RawFd, set: EventSet) -> bool;
    /// Stops watching `fd` (registered for `set`).
    fn remove(&mut self, fd: RawFd, set: EventSet);
}

/// A host socket that has not finished its `CONNECT <port>\n` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
    registered: Option<EventSet>,
}

/// Parses a complete `CONNECT <port>\n` line (decimal port, nothing else).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.strip_suffix('\n')?;
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// All of the device's connections.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Connections with something for the guest, served round-robin.
    rx_ready: VecDeque<ConnKey>,
    /// RSTs for the guest: the CID they come from and the ports.
    rst_queue: VecDeque<(u64, ConnKey)>,
    graveyard: Vec<(UnixStream, Option<EventSet>)>,
    next_port: u32,
    /// Most host-initiated connections and handshakes at once ([`MAX_CONNECTIONS`]; tests lower
    /// it).
    limit: usize,
    /// Guest-initiated connections open now, and the most at once ([`MAX_GUEST_CONNECTIONS`]).
    guest_conns: usize,
    guest_limit: usize,
    log: LogOnce,
}

impl Muxer {
    /// A muxer for the guest `guest_cid`, accepting host connections on `listener` (bound at
    /// `uds_path`, non-blocking).
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener) -> Self {
        Self {
            guest_cid,
            uds_path,
            listener,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            rx_ready: VecDeque::new(),
            rst_queue: VecDeque::new(),
            graveyard: Vec::new(),
            next_port: FIRST_HOST_PORT,
            limit: MAX_CONNECTIONS,
            guest_conns: 0,
            guest_limit: MAX_GUEST_CONNECTIONS,
            log: LogOnce::default(),
        }
    }

    /// The listening socket (the event loop watches it).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The connection at `key`.
    pub fn connection(&self, key: ConnKey) -> Option<&Connection> {
        self.conns.get(&key)
    }

    /// Established or opening connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Host sockets still sending their CONNECT line.
    pub fn handshake_count(&self) -> usize {
        self.handshakes.len()
    }

    /// Guest-initiated connections open now.
    pub fn guest_connection_count(&self) -> usize {
        self.guest_conns
    }

    fn full(&self) -> bool {
        self.conns.len() - self.guest_conns + self.handshakes.len() >= self.limit
    }

    #[cfg(test)]
    pub(super) fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    #[cfg(test)]
    pub(super) fn set_guest_limit(&mut self, limit: usize) {
        self.guest_limit = limit;
    }

    /// Accepts the host connections waiting on the listener (a bounded batch per call).
    pub fn accept(&mut self, now: Instant) {
        for _ in 0..64 {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!(
                        "virtio-vsock {}: accept failed: {e}",
                        self.uds_path.display()
                    );
                    return;
                }
            };
            if self.full() {
                log::debug!(
                    "virtio-vsock: {} connections open; host connection refused",
                    self.limit
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let line = Vec::with_capacity(CONNECT_LINE_MAX);
            let deadline = now + HANDSHAKE_TIMEOUT;
            let hs = Handshake {
                stream,
                line,
                deadline,
                registered: None,
            };
            self.handshakes.insert(hs.stream.as_raw_fd(), hs);
        }
    }

    /// Something happened on host socket `fd`.
    pub fn on_host_event(&mut self, fd: RawFd, set: EventSet, now: Instant) {
        if self.handshakes.contains_key(&fd) {
            self.on_handshake_event(fd, set, now);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let mut verdict = Verdict::Keep;
        if set.contains(EventSet::ERROR) {
            verdict = Verdict::Reset;
        }
        if verdict == Verdict::Keep && set.contains(EventSet::OUT) {
            verdict = conn.on_writable(now);
        }
        if set.contains(EventSet::IN) {
            conn.on_readable();
        }
        if verdict == Verdict::Keep && set.contains(EventSet::HANG_UP) {
            verdict = conn.on_hup();
        }
        self.apply(key, verdict);
    }

    fn on_handshake_event(&mut self, fd: RawFd, set: EventSet, now: Instant) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        // One byte at a time, so that payload after the newline stays in the socket for the guest.
        let done = loop {
            match (&hs.stream).read(&mut byte) {
                Ok(1) => {
                    hs.line.push(byte[0]);
                    if byte[0] == b'\n' {
                        break parse_connect(&hs.line);
                    }
                    if hs.line.len() >= CONNECT_LINE_MAX {
                        break None;
                    }
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock && !set.contains(EventSet::ERROR) =>
                {
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => break None,
            }
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let Some(peer_port) = done else {
            log::debug!(
                "virtio-vsock: bad CONNECT line {:?}; closing",
                String::from_utf8_lossy(&hs.line)
            );
            self.graveyard.push((hs.stream, hs.registered));
            return;
        };
        let Some(local_port) = self.alloc_port(peer_port) else {
            self.graveyard.push((hs.stream, hs.registered));
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let mut conn = Connection::local_init(hs.stream, local_port, peer_port, now);
        conn.registered = hs.registered;
        self.insert(key, conn);
    }

    /// A host port not used with `peer_port` yet. At most `MAX_CONNECTIONS +
    /// MAX_GUEST_CONNECTIONS` keys exist, so one of that many + 1 consecutive ports is free.
    fn alloc_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS + MAX_GUEST_CONNECTIONS {
            let port = self.next_port;
            self.next_port = port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.contains_key(&ConnKey {
                local_port: port,
                peer_port,
            }) {
                return Some(port);
            }
        }
        None
    }

    fn insert(&mut self, key: ConnKey, conn: Connection) {
        if conn.guest_initiated() {
            self.guest_conns += 1;
        }
        self.by_fd.insert(conn.stream().as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.schedule(key);
    }

    /// Puts a connection in the rx queue if it has something for the guest.
    fn schedule(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key)
            && !conn.queued
            && conn.wants_rx()
        {
            conn.queued = true;
            self.rx_ready.push_back(key);
        }
    }

    fn apply(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => self.schedule(key),
            Verdict::Close => self.kill(key, false),
            Verdict::Reset => self.kill(key, true),
            Verdict::Violation(kind) => {
                self.log.warn(
                    kind,
                    format_args!("{kind:?} on connection {key:?}; resetting it"),
                );
                self.kill(key, true);
            }
        }
    }

    /// Drops a connection (its socket closes once the event loop forgot it), maybe telling the
    /// guest with an RST.
    fn kill(&mut self, key: ConnKey, rst: bool) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        if conn.guest_initiated() {
            self.guest_conns -= 1;
        }
        self.by_fd.remove(&conn.stream().as_raw_fd());
        if conn.queued {
            self.rx_ready.retain(|k| *k != key);
        }
        let registered = conn.registered;
        self.graveyard.push((conn.into_stream(), registered));
        if rst {
            self.push_rst(HOST_CID, key);
        }
    }

    fn push_rst(&mut self, src_cid: u64, key: ConnKey) {
        if self.rst_queue.len() < MAX_PENDING_RST {
            self.rst_queue.push_back((src_cid, key));
        } else {
            log::debug!("virtio-vsock: RST queue full; RST for {key:?} dropped");
        }
    }

    /// Routes a packet the guest sent.
    pub fn recv_tx<B: BitmapSlice>(&mut self, pkt: &Packet<'_, B>, now: Instant) {
        let key = ConnKey {
            local_port: pkt.dst_port(),
            peer_port: pkt.src_port(),
        };
        match packet::check_tx(pkt, self.guest_cid) {
            Ok(()) => {}
            Err(Refusal::WrongSrcCid(cid)) => {
                let msg = format_args!(
                    "packet from CID {cid}, not the guest's {}; dropped",
                    self.guest_cid
                );
                self.log.warn(Misbehaviour::WrongSrcCid, msg);
                return;
            }
            Err(Refusal::WrongDstCid(cid)) => {
                self.log.warn(
                    Misbehaviour::WrongDstCid,
                    format_args!("packet for CID {cid}; refused"),
                );
                if pkt.op() != op::RST {
                    self.push_rst(cid, key);
                }
                return;
            }
            Err(Refusal::WrongType(t)) => {
                self.log.warn(
                    Misbehaviour::WrongType,
                    format_args!("packet of socket type {t}; dropped"),
                );
                return;
            }
        }
        if self.conns.contains_key(&key) && pkt.op() == op::REQUEST {
            // The guest reuses the ports of a live connection: it forgot that one.
            self.log.warn(
                Misbehaviour::BadOp,
                format_args!("REQUEST on live connection {key:?}"),
            );
            self.kill(key, true);
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            let verdict = conn.recv(pkt, now);
            self.apply(key, verdict);
            return;
        }
        match pkt.op() {
            op::REQUEST => self.connect_to_host(key, pkt),
            op::RST => {}
            _ => self.push_rst(HOST_CID, key),
        }
    }

    /// The path a guest connection to host port `port` goes to: `<uds_path>_<port>`.
    pub fn host_path(&self, port: u32) -> PathBuf {
        let mut p = self.uds_path.clone().into_os_string();
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }

    fn connect_to_host<B: BitmapSlice>(&mut self, key: ConnKey, pkt: &Packet<'_, B>) {
        if self.guest_conns >= self.guest_limit {
            log::debug!(
                "virtio-vsock: {} guest connections open; guest REQUEST {key:?} refused",
                self.guest_limit
            );
            self.push_rst(HOST_CID, key);
            return;
        }
        let path = self.host_path(key.local_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let conn = Connection::peer_init(stream, key.local_port, key.peer_port, pkt);
                self.insert(key, conn);
            }
            Err(e) => {
                log::debug!(
                    "virtio-vsock: guest connection to {}: {e}; RST",
                    path.display()
                );
                self.push_rst(HOST_CID, key);
            }
        }
    }

    /// Whether a packet waits for an rx buffer.
    pub fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_ready.is_empty()
    }

    /// Writes the next packet for the guest into the rx buffer `pkt`; `None` (and the buffer
    /// untouched) if there is nothing to send. Returns the payload length.
    pub fn fill_rx<B: BitmapSlice>(
        &mut self,
        pkt: &mut Packet<'_, B>,
        now: Instant,
    ) -> Option<u32> {
        if let Some((src_cid, key)) = self.rst_queue.pop_front() {
            self.write_rst(pkt, src_cid, key);
            return Some(0);
        }
        let room = packet::rx_capacity(pkt);
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            match conn.fill_rx(pkt, room, now) {
                Fill::Nothing => {}
                Fill::Packet(h) => {
                    packet::write_header(pkt, self.guest_cid, &h);
                    self.schedule(key);
                    return Some(h.len);
                }
                Fill::Reset => {
                    self.kill(key, false);
                    self.write_rst(pkt, HOST_CID, key);
                    return Some(0);
                }
            }
        }
        None
    }

    fn write_rst<B: BitmapSlice>(&self, pkt: &mut Packet<'_, B>, src_cid: u64, key: ConnKey) {
        let h = Header {
            src_port: key.local_port,
            dst_port: key.peer_port,
            op: op::RST,
            ..Default::default()
        };
        packet::write_header(pkt, self.guest_cid, &h);
        pkt.set_src_cid(src_cid);
    }

    /// Closes host sockets and resets connections whose deadlines passed.
    pub fn on_timer(&mut self, now: Instant) {
        let late: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in late {
            if let Some(hs) = self.handshakes.remove(&fd) {
                log::debug!("virtio-vsock: no CONNECT line in time; closing");
                self.graveyard.push((hs.stream, hs.registered));
            }
        }
        let expired: Vec<(ConnKey, Verdict)> = self
            .conns
            .iter_mut()
            .map(|(k, c)| (*k, c.on_timer(now)))
            .filter(|(_, v)| *v != Verdict::Keep)
            .collect();
        for (key, verdict) in expired {
            log::debug!("virtio-vsock: connection {key:?} timed out");
            self.apply(key, verdict);
        }
    }

    /// The earliest deadline of a handshake or connection.
    pub fn next_deadline(&self) -> Option<Instant> {
        let hs = self.handshakes.values().map(|h| h.deadline);
        hs.chain(self.conns.values().filter_map(Connection::expiry))
            .min()
    }

    /// Drops every connection without telling the guest (it reset its side, or will).
    pub fn drop_all(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.kill(key, false);
        }
        for (_, hs) in self.handshakes.drain() {
            self.graveyard.push((hs.stream, hs.registered));
        }
        self.rst_queue.clear();
    }

    /// Makes the event loop watch what each host socket needs, and closes dropped sockets after
    /// it stopped watching them.
    pub fn sync_epoll(&mut self, poller: &mut dyn Poller) {
        let mut failed = Vec::new();
        for (fd, hs) in &mut self.handshakes {
            if !reconcile(poller, *fd, &mut hs.registered, Some(EventSet::IN)) {
                failed.push(*fd);
            }
        }
        for fd in failed {
            if let Some(hs) = self.handshakes.remove(&fd) {
                self.graveyard.push((hs.stream, hs.registered));
            }
        }
        let mut failed = Vec::new();
        for (key, conn) in &mut self.conns {
            let want = conn.interest();
            let fd = conn.stream().as_raw_fd();
            if !reconcile(poller, fd, &mut conn.registered, want) {
                failed.push(*key);
            }
        }
        for key in failed {
            log::warn!("virtio-vsock: cannot watch the host socket of {key:?}; resetting it");
            self.kill(key, true);
        }
        for (stream, registered) in self.graveyard.drain(..) {
            if let Some(set) = registered {
                poller.remove(stream.as_raw_fd(), set);
            }
        }
    }
}

#[cfg(test)]
#[path = "muxer_tests.rs"]
mod tests;
