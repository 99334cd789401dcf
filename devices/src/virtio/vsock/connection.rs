//! One connection between a guest stream socket and a host Unix stream: its state machine and
//! its credit accounting in both directions.
//!
//! Guest to host: the device advertises `buf_alloc` = [`CONN_BUF_SIZE`] and counts the bytes it
//! wrote to the host stream in `fwd_cnt`. Bytes the host stream does not take at once wait in a
//! buffer that, because the guest may only have `buf_alloc` bytes unacknowledged, never holds more
//! than [`CONN_BUF_SIZE`]; a guest that sends beyond its credit is reset, not buffered. The guest
//! learns about consumed bytes from every packet header and from CREDIT_UPDATE, sent once
//! [`CREDIT_UPDATE_THRESHOLD`] bytes were forwarded since it last heard.
//!
//! Host to guest: the device reads the host stream only into an rx buffer the guest provided, and
//! never more than the guest's credit (`peer_buf_alloc - (sent_cnt - peer_fwd_cnt)`). While the
//! guest has no credit or no buffers the stream is left unread, so the host writer blocks.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;
use vm_memory::bitmap::BitmapSlice;

use event_manager::EventSet;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::packet::{Header, Packet};
use super::{
    CONN_BUF_SIZE, CONNECT_TIMEOUT, GUEST_CONN_BUF_SIZE, Misbehaviour, SHUTDOWN_TIMEOUT, op,
    shutdown,
};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: the REQUEST is (to be) sent, the guest has not answered.
    LocalInit,
    /// Guest-initiated: the host socket is connected, the RESPONSE is not sent yet.
    PeerInit,
    /// Data may flow (in the directions neither side has shut down).
    Established,
}

/// What the muxer does with a connection after handing it an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It lives on.
    Keep,
    /// Drop it quietly (the guest already forgot it).
    Close,
    /// Drop it and send the guest an RST.
    Reset,
    /// The guest broke the protocol: log it, drop the connection, send an RST.
    Violation(Misbehaviour),
}

/// What a connection put into an rx buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Nothing to send (the buffer stays with the guest).
    Nothing,
    /// A packet with this header; its payload, if any, is already in the buffer.
    Packet(Header),
    /// The host stream failed: drop the connection and use the buffer for an RST.
    Reset,
}

/// One connection, keyed in the muxer by (local port, peer port).
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    local_port: u32,
    peer_port: u32,
    state: State,
    /// Guest bytes forwarded to the host, and last reported forwarded to the guest.
    fwd_cnt: Wrapping<u32>,
    fwd_cnt_told: Wrapping<u32>,
    /// Guest bytes the host stream has not taken yet (at most `CONN_BUF_SIZE`).
    to_host: VecDeque<u8>,
    /// The guest's receive buffer and what it consumed, from its latest packet; bytes sent to it.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    sent_cnt: Wrapping<u32>,
    request_pending: bool,
    credit_update_pending: bool,
    /// SHUTDOWN flags to send, already sent, and received from the guest.
    shutdown_pending: u32,
    shutdown_sent: u32,
    peer_shutdown: u32,
    /// The host stream was reported readable and not read to `WouldBlock` since.
    readable: bool,
    host_eof: bool,
    host_hup: bool,
    host_write_shut: bool,
    expiry: Option<Instant>,
    /// What the event loop watches on the stream (`None`: not registered); kept by the muxer.
    pub(super) registered: Option<EventSet>,
    /// The connection is in the muxer's rx queue.
    pub(super) queued: bool,
    /// The buffer for guest bytes the host has not read, advertised as `buf_alloc`.
    buf_size: u32,
    /// The guest opened it (it counts against [`super::MAX_GUEST_CONNECTIONS`]).
    guest_initiated: bool,
}

impl Connection {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            to_host: VecDeque::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            sent_cnt: Wrapping(0),
            request_pending: false,
            credit_update_pending: false,
            shutdown_pending: 0,
            shutdown_sent: 0,
            peer_shutdown: 0,
            readable: false,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            expiry: None,
            registered: None,
            queued: false,
            buf_size: CONN_BUF_SIZE,
            guest_initiated: false,
        }
    }

    /// A host-initiated connection to the guest's `peer_port`: a REQUEST waits to be sent and the
    /// guest has until [`CONNECT_TIMEOUT`] to answer.
    pub fn local_init(stream: UnixStream, local_port: u32, peer_port: u32, now: Instant) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, State::LocalInit);
        c.request_pending = true;
        c.expiry = Some(now + CONNECT_TIMEOUT);
        c
    }

    /// A guest-initiated connection whose REQUEST (`pkt`) reached a listening host socket; the
    /// RESPONSE waits to be sent.
    pub fn peer_init<B: BitmapSlice>(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        pkt: &Packet<'_, B>,
    ) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, State::PeerInit);
        c.update_peer_credit(pkt);
        c.buf_size = GUEST_CONN_BUF_SIZE;
        c.guest_initiated = true;
        c
    }

    /// Whether the guest opened this connection.
    pub fn guest_initiated(&self) -> bool {
        self.guest_initiated
    }

    /// The buffer the device advertises to the guest (`buf_alloc`).
    pub fn buf_size(&self) -> u32 {
        self.buf_size
    }

    /// The connection's state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The host stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Gives up the host stream (to close it once the event loop stopped watching it).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Guest bytes waiting for the host to read them.
    pub fn buffered(&self) -> usize {
        self.to_host.len()
    }

    /// Bytes the device may still send to the guest before it reports consuming some.
    pub fn peer_credit(&self) -> u32 {
        // A guest claiming to have consumed more than it was sent makes this wrap to a huge
        // number, which leaves no credit rather than unlimited credit.
        self.peer_buf_alloc
            .saturating_sub((self.sent_cnt - self.peer_fwd_cnt).0)
    }

    /// Bytes sent to the guest so far (wrapping).
    pub fn sent_cnt(&self) -> u32 {
        self.sent_cnt.0
    }

    /// Guest bytes written to the host stream so far (wrapping).
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt.0
    }

    /// When the connection is reset if nothing happens first.
    pub fn expiry(&self) -> Option<Instant> {
        self.expiry
    }

    fn update_peer_credit<B: BitmapSlice>(&mut self, pkt: &Packet<'_, B>) {
        self.peer_buf_alloc = pkt.buf_alloc();
        self.peer_fwd_cnt = Wrapping(pkt.fwd_cnt());
    }

    /// Handles a packet the guest sent on this connection.
    pub fn recv<B: BitmapSlice>(&mut self, pkt: &Packet<'_, B>, now: Instant) -> Verdict {
        if pkt.op() == op::RST {
            return Verdict::Close;
        }
        self.update_peer_credit(pkt);
        match (self.state, pkt.op()) {
            (State::LocalInit, op::RESPONSE) => {
                self.state = State::Established;
                self.expiry = None;
                let line = format!("OK {}\n", self.local_port);
                // A fresh socket's send buffer has room for one short line; anything else means
                // the host side is already gone.
                match (&self.stream).write(line.as_bytes()) {
                    Ok(n) if n == line.len() => Verdict::Keep,
                    _ => Verdict::Reset,
                }
            }
            (State::LocalInit, _) => Verdict::Violation(Misbehaviour::BadOp),
            (_, op::CREDIT_UPDATE) => Verdict::Keep,
            (_, op::CREDIT_REQUEST) => {
                self.credit_update_pending = true;
                Verdict::Keep
            }
            (_, op::SHUTDOWN) => {
                self.peer_shutdown |= pkt.flags() & shutdown::BOTH;
                if pkt.flags() & shutdown::RCV != 0 {
                    // The guest reads no more: the host's writes should fail rather than pile up.
                    let _ = self.stream.shutdown(Shutdown::Read);
                }
                self.after_flush(now)
            }
            (State::Established, op::RW) => self.recv_data(pkt),
            _ => Verdict::Violation(Misbehaviour::BadOp),
        }
    }

    fn recv_data<B: BitmapSlice>(&mut self, pkt: &Packet<'_, B>) -> Verdict {
        if self.peer_shutdown & shutdown::SEND != 0 {
            return Verdict::Violation(Misbehaviour::BadOp);
        }
        let len = pkt.len();
        let data = match pkt.data_slice().map(|s| s.subslice(0, len as usize)) {
            None if len == 0 => return Verdict::Keep,
            Some(Ok(data)) => data,
            _ => return Verdict::Violation(Misbehaviour::BadTxChain),
        };
        if self.to_host.len() as u64 + u64::from(len) > u64::from(self.buf_size) {
            return Verdict::Violation(Misbehaviour::CreditOverrun);
        }
        if self.host_write_shut || self.host_hup {
            return Verdict::Reset;
        }
        let mut written = 0;
        if self.to_host.is_empty() {
            match (&self.stream).write_volatile(&data) {
                Ok(n) => written = n,
                Err(e) if would_block(&e) => {}
                Err(_) => return Verdict::Reset,
            }
        }
        self.fwd_cnt += written as u32;
        self.hold(&data, written);
        self.note_forwarded();
        Verdict::Keep
    }

    /// Copies the part of `data` from `from` on into the buffer for the host.
    fn hold<B: BitmapSlice>(&mut self, data: &VolatileSlice<'_, B>, from: usize) {
        let mut chunk = [0u8; 4096];
        let mut off = from;
        while off < data.len() {
            let n = (data.len() - off).min(chunk.len());
            let got = data
                .subslice(off, n)
                .map_or(0, |s| s.copy_to(&mut chunk[..n]));
            if got == 0 {
                break;
            }
            self.to_host.extend(&chunk[..got]);
            off += got;
        }
    }

    fn note_forwarded(&mut self) {
        // A quarter of the buffer (CREDIT_UPDATE_THRESHOLD for a host-initiated connection).
        if (self.fwd_cnt - self.fwd_cnt_told).0 >= self.buf_size / 4 {
            self.credit_update_pending = true;
        }
    }

    /// The host stream can take data: writes what the guest sent.
    pub fn on_writable(&mut self, now: Instant) -> Verdict {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match (&self.stream).write(front) {
                Ok(0) => return Verdict::Reset,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Verdict::Reset,
            }
        }
        if self.to_host.is_empty() {
            // Give back what a slow reader made us hold.
            self.to_host = VecDeque::new();
        }
        self.note_forwarded();
        self.after_flush(now)
    }

    /// Applies the guest's SHUTDOWN flags once everything it sent reached the host.
    fn after_flush(&mut self, now: Instant) -> Verdict {
        if !self.to_host.is_empty() {
            if self.peer_shutdown == shutdown::BOTH && self.expiry.is_none() {
                self.expiry = Some(now + SHUTDOWN_TIMEOUT);
            }
            return Verdict::Keep;
        }
        if self.peer_shutdown == shutdown::BOTH {
            // The guest closed and waits for our RST.
            return Verdict::Reset;
        }
        if self.peer_shutdown & shutdown::SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Verdict::Keep
    }

    /// The host stream has data (or end-of-file) to read.
    pub fn on_readable(&mut self) {
        self.readable = true;
    }

    /// The host side closed the stream (or both directions are shut).
    pub fn on_hup(&mut self) -> Verdict {
        self.host_hup = true;
        if self.state == State::LocalInit || !self.to_host.is_empty() {
            return Verdict::Reset;
        }
        if self.host_eof || self.peer_shutdown & shutdown::RCV != 0 {
            self.queue_shutdown(shutdown::BOTH);
        } else {
            // Pass on what the host wrote before closing; end-of-file then sends the SHUTDOWN.
            self.readable = true;
        }
        Verdict::Keep
    }

    fn queue_shutdown(&mut self, flags: u32) {
        self.shutdown_pending |= flags & !self.shutdown_sent;
    }

    /// Resets a connection whose deadline passed.
    pub fn on_timer(&mut self, now: Instant) -> Verdict {
        match self.expiry {
            Some(t) if t <= now => Verdict::Reset,
            _ => Verdict::Keep,
        }
    }

    fn can_read(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.peer_shutdown & shutdown::RCV == 0
            && self.shutdown_sent & shutdown::SEND == 0
            && self.peer_credit() > 0
    }

    /// Whether the connection has a packet for the guest (control, or data it may send).
    pub fn wants_rx(&self) -> bool {
        match self.state {
            State::LocalInit => self.request_pending,
            State::PeerInit => true,
            State::Established => {
                self.shutdown_pending != 0
                    || self.credit_update_pending
                    || (self.readable && self.can_read())
            }
        }
    }

    /// What the event loop should watch on the host stream (`None`: stop watching it).
    pub fn interest(&self) -> Option<EventSet> {
        if self.host_hup {
            // HUP is reported whatever is asked for; what is left is read without epoll.
            return None;
        }
        let mut set = EventSet::empty();
        if !self.readable && self.can_read() {
            set |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            set |= EventSet::OUT;
        }
        Some(set)
    }

    /// Puts the next packet for the guest into `pkt`, an rx buffer with room for `room` payload
    /// bytes.
    pub fn fill_rx<B: BitmapSlice>(
        &mut self,
        pkt: &Packet<'_, B>,
        room: usize,
        now: Instant,
    ) -> Fill {
        let (op, flags, len) = match self.state {
            State::LocalInit if self.request_pending => {
                self.request_pending = false;
                (op::REQUEST, 0, 0)
            }
            State::LocalInit => return Fill::Nothing,
            State::PeerInit => {
                self.state = State::Established;
                (op::RESPONSE, 0, 0)
            }
            State::Established => match self.next_established(pkt, room, now) {
                Ok(Some(p)) => p,
                Ok(None) => return Fill::Nothing,
                Err(()) => return Fill::Reset,
            },
        };
        self.credit_update_pending = false;
        self.fwd_cnt_told = self.fwd_cnt;
        Fill::Packet(Header {
            src_port: self.local_port,
            dst_port: self.peer_port,
            op,
            flags,
            len,
            buf_alloc: self.buf_size,
            fwd_cnt: self.fwd_cnt.0,
        })
    }

    fn next_established<B: BitmapSlice>(
        &mut self,
        pkt: &Packet<'_, B>,
        room: usize,
        now: Instant,
    ) -> Result<Option<(u16, u32, u32)>, ()> {
        if self.readable && self.can_read() && room == 0 {
            // A buffer without room for payload cannot carry data; spend it on a credit update
            // so the queue keeps moving.
            self.credit_update_pending = true;
        }
        if self.readable && self.can_read() && room > 0 {
            let want = room.min(self.peer_credit() as usize);
            match pkt.data_slice().map(|s| s.subslice(0, want)) {
                Some(Ok(mut dst)) => match (&self.stream).read_volatile(&mut dst) {
                    Ok(0) => {
                        self.host_eof = true;
                        self.readable = false;
                        let flags = if self.host_hup {
                            shutdown::BOTH
                        } else {
                            shutdown::SEND
                        };
                        self.queue_shutdown(flags);
                    }
                    Ok(n) => {
                        self.sent_cnt += n as u32;
                        return Ok(Some((op::RW, 0, n as u32)));
                    }
                    Err(e) if would_block(&e) => self.readable = false,
                    Err(_) => return Err(()),
                },
                _ => return Err(()),
            }
        }
        if self.shutdown_pending != 0 {
            let flags = self.shutdown_pending;
            self.shutdown_sent |= flags;
            self.shutdown_pending = 0;
            if self.shutdown_sent == shutdown::BOTH && self.expiry.is_none() {
                self.expiry = Some(now + SHUTDOWN_TIMEOUT);
            }
            return Ok(Some((op::SHUTDOWN, flags, 0)));
        }
        if self.credit_update_pending {
            return Ok(Some((op::CREDIT_UPDATE, 0, 0)));
        }
        Ok(None)
    }
}

fn would_block(e: &VolatileMemoryError) -> bool {
    matches!(e, VolatileMemoryError::IOError(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted))
}

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
