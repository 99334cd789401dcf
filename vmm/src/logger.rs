//! kiln-vmm's logger for the `log` facade. Until a log file is configured, lines go to stderr as
//! `kiln-vmm [   12.345 ms] LEVEL: message`, the time since start (so start-up phases can be read
//! off the log), at the level `KILN_LOG` names (error, warn, info, debug, trace; default warn).
//!
//! Once `--log-path` or `PUT /logger` names a file (or named pipe), lines go there in
//! Firecracker's format, so tools that parse Firecracker's logs read Kiln's:
//! `2026-12-06T02:03:04.123456789 [instance-id:thread:LEVEL:file:line] message`, the level and
//! origin only when asked for (`show_level`, `show_log_origin`), the level Info unless set, and
//! only lines from modules under `module` when given. A line that cannot be written at once (a
//! full pipe) is dropped and counted, never waited for: any thread may log, under its seccomp
//! filter, so writing is one `write` of a formatted line and nothing else.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kiln_api::requests::logger::{LogLevel, Logger as LoggerConfig};
use log::{LevelFilter, Metadata, Record};

/// Lines dropped because the log file could not take them at once.
pub static MISSED_LOG_COUNT: AtomicU64 = AtomicU64::new(0);
/// Lines whose write failed outright.
pub static LOG_FAILS: AtomicU64 = AtomicU64::new(0);

/// Why a log file could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    /// The file could not be opened.
    #[error("logger: cannot open log_path {path}: {err}")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
}

/// Where lines go and what they show.
struct State {
    level: LevelFilter,
    file: Option<File>,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
    instance_id: String,
}

static STATE: RwLock<State> = RwLock::new(State {
    level: LevelFilter::Warn,
    file: None,
    show_level: false,
    show_origin: false,
    module: None,
    instance_id: String::new(),
});

static START: OnceLock<Instant> = OnceLock::new();

struct KilnLogger;

impl log::Log for KilnLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let state = STATE.read().unwrap_or_else(|p| p.into_inner());
        if let Some(module) = &state.module
            && !record
                .module_path()
                .unwrap_or("")
                .starts_with(module.as_str())
        {
            return;
        }
        let Some(mut file) = state.file.as_ref() else {
            let ms = START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1000.0;
            let level = record.level().as_str().to_lowercase();
            eprintln!("kiln-vmm [{ms:>10.3} ms] {level}: {}", record.args());
            return;
        };
        let line = firecracker_line(&state, record, SystemTime::now());
        match file.write(line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            Ok(_) => {
                MISSED_LOG_COUNT.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                MISSED_LOG_COUNT.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                LOG_FAILS.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn flush(&self) {}
}

/// One line in Firecracker's format.
fn firecracker_line(state: &State, record: &Record, now: SystemTime) -> String {
    let thread = std::thread::current();
    let mut prefix = format!(
        "{} [{}:{}",
        timestamp(now),
        state.instance_id,
        thread.name().unwrap_or("-")
    );
    if state.show_level {
        prefix.push(':');
        prefix.push_str(firecracker_level(record.level()));
    }
    if state.show_origin {
        prefix.push_str(&format!(
            ":{}:{}",
            record.file().unwrap_or("?"),
            record.line().unwrap_or(0)
        ));
    }
    format!("{prefix}] {}\n", record.args())
}

/// Firecracker's level names.
fn firecracker_level(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "ERROR",
        log::Level::Warn => "WARN",
        log::Level::Info => "INFO",
        log::Level::Debug => "DEBUG",
        log::Level::Trace => "TRACE",
    }
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn` in UTC.
fn timestamp(now: SystemTime) -> String {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// The `log` level for a Firecracker level.
pub fn level_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Off => LevelFilter::Off,
        LogLevel::Error => LevelFilter::Error,
        LogLevel::Warning => LevelFilter::Warn,
        LogLevel::Info => LevelFilter::Info,
        LogLevel::Debug => LevelFilter::Debug,
        LogLevel::Trace => LevelFilter::Trace,
    }
}

/// The level `KILN_LOG` names, if it is set; unknown values fall back to `warn` with a warning.
fn level_from_env() -> (Option<LevelFilter>, Option<String>) {
    match std::env::var("KILN_LOG") {
        Err(_) => (None, None),
        Ok(v) => match v.parse() {
            Ok(level) => (Some(level), None),
            Err(_) => (Some(LevelFilter::Warn), Some(v)),
        },
    }
}

/// True when `KILN_LOG` sets the level (a `--level` or `PUT /logger` level still wins).
pub fn level_from_environment() -> bool {
    std::env::var_os("KILN_LOG").is_some()
}

/// Installs the logger (once; later calls do nothing), writing to stderr.
pub fn init() {
    START.get_or_init(Instant::now);
    let (level, bad) = level_from_env();
    let level = level.unwrap_or(LevelFilter::Warn);
    STATE.write().unwrap_or_else(|p| p.into_inner()).level = level;
    if log::set_logger(&KilnLogger).is_ok() {
        log::set_max_level(level);
    }
    if let Some(v) = bad {
        log::warn!(
            "KILN_LOG={v:?} is not a log level (error, warn, info, debug, trace); using warn"
        );
    }
}

/// Sets the instance id that Firecracker-format lines carry.
pub fn set_instance_id(id: &str) {
    STATE.write().unwrap_or_else(|p| p.into_inner()).instance_id = id.to_string();
}

/// Sets the level alone (`--level` without `--log-path`, or `--boot-timer` asking for Info).
pub fn set_level(level: LevelFilter) {
    STATE.write().unwrap_or_else(|p| p.into_inner()).level = level;
    log::set_max_level(level);
}

/// Opens `path` for appending (creating it if missing; a named pipe is opened without waiting
/// for its reader) for lines that must never block.
pub fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .or_else(|e| {
            // A FIFO with no reader yet refuses a non-blocking write-only open (ENXIO); open it
            // read-write, which never waits and keeps it open for the reader to come.
            if e.raw_os_error() == Some(libc::ENXIO) {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open(path)
            } else {
                Err(e)
            }
        })
}

/// Applies a logger configuration (`--log-path` and its flags, or `PUT /logger`): a log file
/// switches lines to Firecracker's format, at Info unless a level is given.
pub fn configure(config: &LoggerConfig) -> Result<(), LoggerError> {
    let file = match &config.log_path {
        Some(path) => Some(open_nonblocking(path).map_err(|err| LoggerError::Open {
            path: path.clone(),
            err,
        })?),
        None => None,
    };
    let mut state = STATE.write().unwrap_or_else(|p| p.into_inner());
    let level = match config.level {
        Some(l) => level_filter(l),
        None if file.is_some() || state.file.is_some() => LevelFilter::Info,
        None => state.level,
    };
    if file.is_some() {
        state.file = file;
    }
    state.level = level;
    state.show_level = config.show_level.unwrap_or(state.show_level);
    state.show_origin = config.show_log_origin.unwrap_or(state.show_origin);
    if config.module.is_some() {
        state.module = config.module.clone();
    }
    log::set_max_level(level);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_civil_time() {
        let t = UNIX_EPOCH + Duration::new(1_795_000_000, 123_456_789);
        assert_eq!(timestamp(t), "2026-11-18T11:06:40.123456789");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert!(timestamp(leap).starts_with("2000-02-29T00:00:00"));
    }

    #[test]
    fn firecracker_lines_show_level_and_origin_when_asked() {
        let mut state = State {
            level: LevelFilter::Info,
            file: None,
            show_level: false,
            show_origin: false,
            module: None,
            instance_id: "vm-7".into(),
        };
        let t = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let line = std::thread::Builder::new()
            .name("kiln_vcpu0".into())
            .spawn(move || {
                let line = |state: &State| {
                    firecracker_line(
                        state,
                        &Record::builder()
                            .args(format_args!("Guest-boot-time = {:>6} us {} ms", 1234, 1))
                            .level(log::Level::Info)
                            .file(Some("vmm/src/x.rs"))
                            .line(Some(42))
                            .build(),
                        t,
                    )
                };
                let plain = line(&state);
                state.show_level = true;
                state.show_origin = true;
                (plain, line(&state))
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(
            line.0,
            "2026-11-18T11:06:40.000000000 [vm-7:kiln_vcpu0] Guest-boot-time =   1234 us 1 ms\n"
        );
        assert_eq!(
            line.1,
            "2026-11-18T11:06:40.000000000 [vm-7:kiln_vcpu0:INFO:vmm/src/x.rs:42] Guest-boot-time =   1234 us 1 ms\n"
        );
    }
}
