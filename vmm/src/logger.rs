//! A small stderr logger for the `log` facade: `kiln-vmm [   12.345 ms] LEVEL: message`, the time
//! since the logger started (so start-up phases can be read off the log). The level comes from
//! `KILN_LOG` (error, warn, info, debug, trace; default warn).

use std::sync::OnceLock;
use std::time::Instant;

use log::{LevelFilter, Metadata, Record};

struct StderrLogger;

static START: OnceLock<Instant> = OnceLock::new();

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            let ms = START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1000.0;
            let level = record.level().as_str().to_lowercase();
            eprintln!("kiln-vmm [{ms:>10.3} ms] {level}: {}", record.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// The level `KILN_LOG` names; unknown values fall back to `warn` with a warning.
fn level_from_env() -> (LevelFilter, Option<String>) {
    match std::env::var("KILN_LOG") {
        Err(_) => (LevelFilter::Warn, None),
        Ok(v) => match v.parse() {
            Ok(level) => (level, None),
            Err(_) => (LevelFilter::Warn, Some(v)),
        },
    }
}

/// Installs the logger (once; later calls do nothing).
pub fn init() {
    START.get_or_init(Instant::now);
    let (level, bad) = level_from_env();
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
    if let Some(v) = bad {
        log::warn!(
            "KILN_LOG={v:?} is not a log level (error, warn, info, debug, trace); using warn"
        );
    }
}
