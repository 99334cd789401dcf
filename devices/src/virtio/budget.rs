//! How much one pass of a device's event handler may do before it returns to the event loop.
//!
//! Every handler that walks a queue (block, vsock, and any device added later: net, balloon)
//! takes a [`Budget`] per pass, charges each chain it handles (with the bytes it moved), stops
//! when the budget is spent, and if work is left signals its own queue eventfd again before it
//! returns. The event loop then serves the API and the other devices before the next pass, so a
//! guest re-posting chains as fast as it can (from a second vCPU, say) slows only its own device.

/// What is left of one pass's allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    chains: usize,
    bytes: u64,
}

impl Budget {
    /// An allowance of `chains` chains and `bytes` bytes of I/O.
    pub fn new(chains: usize, bytes: u64) -> Self {
        Self { chains, bytes }
    }

    /// Records one chain handled that moved `bytes` bytes.
    pub fn charge(&mut self, bytes: u64) {
        self.chains = self.chains.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    /// Whether the pass should stop now.
    pub fn spent(&self) -> bool {
        self.chains == 0 || self.bytes == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_or_bytes_end_the_pass() {
        let mut b = Budget::new(3, 100);
        b.charge(10);
        b.charge(10);
        assert!(!b.spent());
        b.charge(0);
        assert!(b.spent(), "three chains");
        let mut b = Budget::new(100, 100);
        b.charge(99);
        assert!(!b.spent());
        b.charge(u64::MAX);
        assert!(b.spent(), "the bytes");
    }
}
