//! Dropping to uid:gid for good: no supplementary groups, real, effective and saved ids all set,
//! the capability bounding and ambient sets emptied, `no_new_privs` set (so no set-uid file or
//! file capability can hand anything back at exec), and a check that the permitted and effective
//! sets are empty afterwards.

use std::io;

use crate::sys::{check, check_long};

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The step of the drop that failed.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {err}")]
pub struct PrivError {
    /// What was being done.
    pub step: &'static str,
    /// What the OS said.
    pub err: io::Error,
    /// The ids had already changed: the process is no longer root.
    pub ids_changed: bool,
}

fn at(step: &'static str) -> impl FnOnce(io::Error) -> PrivError {
    move |err| PrivError {
        step,
        err,
        ids_changed: false,
    }
}

fn after_ids(step: &'static str) -> impl FnOnce(io::Error) -> PrivError {
    move |err| PrivError {
        step,
        err,
        ids_changed: true,
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// prctl with unsigned long arguments, as the kernel reads them.
fn prctl(option: libc::c_int, arg2: libc::c_ulong, arg3: libc::c_ulong) -> io::Result<()> {
    let zero: libc::c_ulong = 0;
    // SAFETY: prctl with integer arguments only, each passed at the width the kernel reads.
    check(unsafe { libc::prctl(option, arg2, arg3, zero, zero) }).map(drop)
}

/// Everything before the ids change, while the process still has the capabilities these need.
pub fn prepare() -> Result<(), PrivError> {
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).map_err(at("cannot set no_new_privs"))?;
    for cap in 0..64 {
        // EINVAL marks the first capability the kernel does not know.
        match prctl(libc::PR_CAPBSET_DROP, cap, 0) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(at("cannot empty the capability bounding set")(e)),
        }
    }
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
    )
    .map_err(at("cannot clear the ambient capabilities"))
}

/// Becomes uid:gid with no supplementary groups and no capabilities left.
pub fn drop_to(uid: u32, gid: u32) -> Result<(), PrivError> {
    // SAFETY: a zero-length list; the pointer is not read.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })
        .map_err(at("cannot drop supplementary groups"))?;
    // SAFETY: setresgid and setresuid take plain integers.
    check(unsafe { libc::setresgid(gid, gid, gid) }).map_err(at("cannot setresgid"))?;
    // SAFETY: as above.
    check(unsafe { libc::setresuid(uid, uid, uid) }).map_err(at("cannot setresuid"))?;
    // Leaving uid 0 clears permitted and effective capabilities unless securebits keep them;
    // clearing them explicitly holds either way, and lowering is always allowed.
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let none = [CapData::default(); 2];
    // SAFETY: header and two data words, the layout version 3 expects; capset only reads them.
    check_long(unsafe { libc::syscall(libc::SYS_capset, &header, none.as_ptr()) })
        .map_err(after_ids("cannot clear capabilities"))?;
    let left = capabilities().map_err(after_ids("cannot read capabilities back"))?;
    if left != (0, 0) {
        return Err(after_ids("capabilities are left after the drop")(
            io::Error::other(format!("permitted {:#x}, effective {:#x}", left.0, left.1)),
        ));
    }
    Ok(())
}

/// This process's (permitted, effective) capability sets.
pub fn capabilities() -> io::Result<(u64, u64)> {
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData words, which `data` has room for.
    check_long(unsafe { libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) })?;
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(data[0].permitted, data[1].permitted),
        join(data[0].effective, data[1].effective),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_read_back_as_in_proc_status() {
        let (permitted, effective) = capabilities().unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        };
        assert_eq!(Some(permitted), field("CapPrm:"));
        assert_eq!(Some(effective), field("CapEff:"));
    }
}
