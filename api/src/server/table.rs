//! The server's connections: a fixed number of slots, tokens that cannot be confused with an
//! earlier connection in the same slot, the choice of which connection gives up its slot when
//! all are taken, and the nearest deadline.
//!
//! Which connection is dropped to make room, in order: the one idle longest (after an answer,
//! or silent since it connected), once idle for [`Limits::evict_after`], so a client about to
//! send its (next) request is not cut off; then, the one whose request has been arriving longest
//! (a slowloris trickle), at once: a request is normally sent in one go and read as soon as the
//! connection is accepted. Connections whose request is with the handler or whose answers are
//! being written are never dropped: the first finishes on its own, the second within the write
//! timeout.

use std::io::{Read, Write};
use std::time::Instant;

use super::Limits;
use super::conn::{Conn, Expiry, Holding, Interest};

/// Names one connection for as long as it lives; the same slot reused later gets another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token {
    slot: u32,
    serial: u32,
}

impl Token {
    /// The token as epoll's user data.
    pub(crate) fn to_u64(self) -> u64 {
        (u64::from(self.serial) << 32) | u64::from(self.slot)
    }

    /// The token epoll's user data stands for.
    pub(crate) fn from_u64(data: u64) -> Self {
        Token {
            slot: data as u32,
            serial: (data >> 32) as u32,
        }
    }
}

/// A connection and how the loop watches it.
#[derive(Debug)]
pub(crate) struct Entry<S> {
    /// The connection.
    pub conn: Conn<S>,
    serial: u32,
    /// What epoll watches it for; `None` once it no longer watches it at all (the client hung
    /// up while the handler had its request).
    pub watched: Option<Interest>,
}

/// Every open connection, at most `limits.max_connections`.
#[derive(Debug)]
pub(crate) struct Table<S> {
    slots: Vec<Option<Entry<S>>>,
    next_serial: u32,
    len: usize,
}

impl<S: Read + Write> Table<S> {
    /// Room for `capacity` connections.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            slots: (0..capacity).map(|_| None).collect(),
            next_serial: 0,
            len: 0,
        }
    }

    /// Open connections.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// True when every slot is taken.
    pub(crate) fn is_full(&self) -> bool {
        self.len == self.slots.len()
    }

    /// Adds a connection (watched for `interest`); `None` if every slot is taken.
    pub(crate) fn insert(&mut self, conn: Conn<S>, interest: Interest) -> Option<Token> {
        let slot = self.slots.iter().position(Option::is_none)?;
        self.next_serial = self.next_serial.wrapping_add(1);
        self.slots[slot] = Some(Entry {
            conn,
            serial: self.next_serial,
            watched: Some(interest),
        });
        self.len += 1;
        Some(Token {
            slot: slot as u32,
            serial: self.next_serial,
        })
    }

    /// The connection `token` names, if it is still open.
    pub(crate) fn get_mut(&mut self, token: Token) -> Option<&mut Entry<S>> {
        self.slots
            .get_mut(token.slot as usize)?
            .as_mut()
            .filter(|e| e.serial == token.serial)
    }

    /// Removes the connection `token` names.
    pub(crate) fn remove(&mut self, token: Token) -> Option<Entry<S>> {
        let slot = self.slots.get_mut(token.slot as usize)?;
        if slot.as_ref().is_some_and(|e| e.serial == token.serial) {
            self.len -= 1;
            return slot.take();
        }
        None
    }

    /// Every open connection's token.
    pub(crate) fn tokens(&self) -> Vec<Token> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, e)| {
                e.as_ref().map(|e| Token {
                    slot: slot as u32,
                    serial: e.serial,
                })
            })
            .collect()
    }

    /// The connection to drop to make room for a new one at `now` (see the module's doc), if
    /// any may be.
    pub(crate) fn eviction_candidate(&self, now: Instant, limits: &Limits) -> Option<Token> {
        let mut best: Option<(Holding, Instant, Token)> = None;
        for token in self.tokens() {
            let Some(entry) = self.slots[token.slot as usize].as_ref() else {
                continue;
            };
            let Some((holding, since)) = entry.conn.holding() else {
                continue;
            };
            if holding == Holding::Idle && now.saturating_duration_since(since) < limits.evict_after
            {
                continue;
            }
            // Idle ones first, then the longest-held.
            let rank = |h: Holding, since: Instant| (h == Holding::Idle, std::cmp::Reverse(since));
            if best.is_none_or(|(b_holding, b_since, _)| {
                rank(holding, since) > rank(b_holding, b_since)
            }) {
                best = Some((holding, since, token));
            }
        }
        best.map(|(_, _, token)| token)
    }

    /// The nearest connection deadline, if any.
    pub(crate) fn next_deadline(&self, limits: &Limits) -> Option<Instant> {
        self.slots
            .iter()
            .flatten()
            .filter_map(|e| e.conn.deadline(limits).map(|(at, _)| at))
            .min()
    }

    /// The connections whose deadline passed at `now`, and why.
    pub(crate) fn expired(&self, now: Instant, limits: &Limits) -> Vec<(Token, Expiry)> {
        self.tokens()
            .into_iter()
            .filter_map(|t| {
                let entry = self.slots[t.slot as usize].as_ref()?;
                let (at, why) = entry.conn.deadline(limits)?;
                (at <= now).then_some((t, why))
            })
            .collect()
    }

    /// The earliest time an idle connection that may not be dropped yet becomes droppable, when
    /// the table is full and none may be dropped now.
    pub(crate) fn next_evictable(&self, limits: &Limits) -> Option<Instant> {
        self.slots
            .iter()
            .flatten()
            .filter_map(|e| e.conn.holding())
            .filter(|(holding, _)| *holding == Holding::Idle)
            .map(|(_, since)| since + limits.evict_after)
            .min()
    }
}
