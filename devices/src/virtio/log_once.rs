//! Logging what a guest does wrong without letting it fill the disk: each kind of misbehaviour is
//! logged at `warn` the first time a device sees it and at `debug` after that. A guest looping on
//! a bad register write or a broken queue makes one line at the default level, not one per exit.

/// Remembers which kinds of misbehaviour (numbered 0 to 63) one device already logged.
#[derive(Debug, Default)]
pub struct LogOnce {
    seen: u64,
    warnings: u32,
}

impl LogOnce {
    /// Logs `msg` (prefixed with `device`) at `warn` the first time `kind` happens, at `debug`
    /// after that.
    pub fn warn(&mut self, kind: u32, device: &str, msg: std::fmt::Arguments<'_>) {
        let bit = 1u64 << (kind % 64);
        if self.seen & bit == 0 {
            self.seen |= bit;
            self.warnings = self.warnings.saturating_add(1);
            log::warn!("{device}: {msg} (further ones are logged at debug level)");
        } else {
            log::debug!("{device}: {msg}");
        }
    }

    /// How many lines went out at `warn`.
    pub fn warnings(&self) -> u32 {
        self.warnings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_warns_once() {
        let mut log = LogOnce::default();
        for i in 0..1000 {
            log.warn(3, "dev", format_args!("bad {i}"));
            log.warn(5, "dev", format_args!("worse {i}"));
        }
        assert_eq!(log.warnings(), 2);
    }
}
