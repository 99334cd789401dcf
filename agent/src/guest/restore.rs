//! The `restored` request: what a VM restored from a snapshot must do before it runs anything, so
//! that clones of one snapshot are not twins. In order: mix the host's entropy into the kernel's
//! pool (crediting it) and force the CRNG to reseed from it, so no two clones continue one random
//! stream; step `CLOCK_REALTIME` to the host's time, since the guest's clock stopped when the
//! snapshot was taken; set eth0 up again when the host sent network settings; replace the default
//! environment for later execs. The steps that touch the
//! kernel go through [`Kernel`], so tests on a host can leave its real clock alone.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::{Agent, log};
use crate::protocol::{ErrorInfo, ErrorKind, Event, RestoreSpec};

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])`: add bytes to the input pool and credit them.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`: reseed the CRNG from the input pool now (Linux 4.17+).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Where the RNG ioctls go.
const URANDOM: &str = "/dev/urandom";

/// The kernel state `restored` changes. The agent uses [`LinuxKernel`]; tests substitute a clock
/// that records instead of stepping the host's.
pub trait Kernel: Send + Sync {
    /// Mixes `bytes` into the kernel's entropy pool, credited as `8 * len` bits.
    fn add_entropy(&self, bytes: &[u8]) -> io::Result<()>;
    /// Makes the kernel's CRNG reseed from the pool now.
    fn reseed_crng(&self) -> io::Result<()>;
    /// `CLOCK_REALTIME`, in nanoseconds since the epoch.
    fn realtime_ns(&self) -> io::Result<i128>;
    /// Steps `CLOCK_REALTIME` to `ns` nanoseconds since the epoch.
    fn set_realtime_ns(&self, ns: u64) -> io::Result<()>;
    /// Sets eth0's address, route and name servers (see [`super::net::configure`]).
    fn configure_net(&self, net: &crate::protocol::Net) -> io::Result<()>;
}

/// The real thing: ioctls on `/dev/urandom` and `clock_settime(2)`. Needs `CAP_SYS_ADMIN` for
/// the RNG and `CAP_SYS_TIME` for the clock, both of which PID 1 has.
pub struct LinuxKernel;

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Kernel for LinuxKernel {
    fn add_entropy(&self, bytes: &[u8]) -> io::Result<()> {
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, built in a
        // u32 buffer so the header and the bytes after it are laid out as the kernel reads them.
        let len = i32::try_from(bytes.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        let bits = len.checked_mul(8).ok_or(io::ErrorKind::InvalidInput)?;
        let mut info = vec![bits as u32, len as u32];
        for chunk in bytes.chunks(4) {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            info.push(u32::from_ne_bytes(word));
        }
        let urandom = File::open(URANDOM)?;
        // SAFETY: RNDADDENTROPY reads a rand_pool_info header and `buf_size` bytes after it,
        // all within `info`, which outlives the call.
        check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) })
    }

    fn reseed_crng(&self) -> io::Result<()> {
        let urandom = File::open(URANDOM)?;
        // SAFETY: RNDRESEEDCRNG takes no argument and touches no memory of ours.
        check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) })
    }

    fn realtime_ns(&self) -> io::Result<i128> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec to the valid pointer.
        check(unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) })?;
        Ok(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec))
    }

    fn set_realtime_ns(&self, ns: u64) -> io::Result<()> {
        let ts = libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: clock_settime reads one timespec from the valid pointer.
        check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })
    }

    fn configure_net(&self, net: &crate::protocol::Net) -> io::Result<()> {
        super::net::configure(net)
    }
}

/// A step that failed: which one, what was already done, and the OS error.
fn step_failed(step: &str, done: &str, e: io::Error) -> ErrorInfo {
    let kind = match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => ErrorKind::PermissionDenied,
        _ => ErrorKind::Io,
    };
    ErrorInfo {
        kind,
        message: format!("restored: {step} failed: {e}; {done}"),
        errno: e.raw_os_error(),
    }
}

/// Carries out a `restored` request on `agent`: the answer is [`Event::Restored`], or an error
/// naming the field that is wrong (nothing was changed) or the step that failed (the steps
/// before it were done, the ones after it were not).
pub fn restored(agent: &Agent, spec: &RestoreSpec) -> Event {
    match run(agent, spec) {
        Ok(event) => event,
        Err(info) => {
            log(format_args!("{}", info.message));
            Event::Error(info)
        }
    }
}

fn run(agent: &Agent, spec: &RestoreSpec) -> Result<Event, ErrorInfo> {
    let r = spec
        .validate()
        .map_err(|e| ErrorInfo::new(ErrorKind::BadRequest, e.to_string()))?;
    let kernel = agent.kernel();
    let n = r.entropy.len();
    kernel.add_entropy(&r.entropy).map_err(|e| {
        step_failed(
            &format!("adding {n} bytes of entropy (RNDADDENTROPY on {URANDOM})"),
            "nothing was changed",
            e,
        )
    })?;
    kernel.reseed_crng().map_err(|e| {
        step_failed(
            &format!("reseeding the kernel RNG (RNDRESEEDCRNG on {URANDOM})"),
            "the entropy was added; the clock and environment were not changed",
            e,
        )
    })?;
    let not_clock = "the RNG was reseeded; the clock and environment were not changed";
    let before = kernel
        .realtime_ns()
        .map_err(|e| step_failed("reading CLOCK_REALTIME", not_clock, e))?;
    kernel.set_realtime_ns(r.time_ns).map_err(|e| {
        step_failed(
            &format!("setting CLOCK_REALTIME to {} ns", r.time_ns),
            not_clock,
            e,
        )
    })?;
    let step = i128::from(r.time_ns) - before;
    let clock_step_ns = i64::try_from(step).unwrap_or(if step < 0 { i64::MIN } else { i64::MAX });
    if let Some(net) = &r.net {
        kernel.configure_net(net).map_err(|e| {
            step_failed(
                &format!("configuring {}", crate::protocol::net::INTERFACE),
                "the RNG was reseeded and the clock set; the environment was not changed",
                e,
            )
        })?;
    }
    agent.set_default_env(r.env);
    log(format_args!(
        "restored: {n} bytes of entropy, RNG reseeded, clock stepped by {clock_step_ns} ns"
    ));
    Ok(Event::Restored {
        clock_step_ns,
        entropy_bytes: n as u32,
    })
}

#[cfg(test)]
#[path = "restore_tests.rs"]
mod tests;
