//! Resource limits for the jailed process (`--resource-limit`), set on the jailer itself so the
//! exec'd VMM inherits them. As in Firecracker, `no-file` is 2048 unless given, and each limit is
//! both the soft and the hard value, so the VMM cannot raise it again.

use crate::args::ResourceLimit;
use crate::sys::check;

/// RLIMIT_NOFILE when `--resource-limit no-file=N` is not given (Firecracker's default).
pub const DEFAULT_NO_FILE: u64 = 2048;

/// A limit that could not be set.
#[derive(Debug, thiserror::Error)]
#[error("cannot set {name} to {value}: {err}{hint}")]
pub struct RlimitError {
    /// The `--resource-limit` name.
    pub name: &'static str,
    /// The value asked for.
    pub value: u64,
    /// What the OS said.
    pub err: std::io::Error,
    /// Why, when it is likely known.
    pub hint: &'static str,
}

/// The limits to set: those given, plus the default `no-file` when it is not.
pub fn plan(given: &[ResourceLimit]) -> Vec<ResourceLimit> {
    let mut limits = given.to_vec();
    if !limits.iter().any(|l| matches!(l, ResourceLimit::NoFile(_))) {
        limits.push(ResourceLimit::NoFile(DEFAULT_NO_FILE));
    }
    limits
}

/// Sets every limit in `plan(given)` on this process.
pub fn apply(given: &[ResourceLimit]) -> Result<(), RlimitError> {
    for limit in plan(given) {
        let (resource, value) = match limit {
            ResourceLimit::NoFile(n) => (libc::RLIMIT_NOFILE, n),
            ResourceLimit::FileSize(n) => (libc::RLIMIT_FSIZE, n),
        };
        let rlim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit reads the struct we pass and touches nothing else.
        check(unsafe { libc::setrlimit(resource, &rlim) }).map_err(|err| RlimitError {
            name: limit.name(),
            value,
            hint: if err.raw_os_error() == Some(libc::EPERM) {
                " (raising a hard limit needs CAP_SYS_RESOURCE)"
            } else {
                ""
            },
            err,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_defaults_to_2048_unless_given() {
        assert_eq!(plan(&[]), [ResourceLimit::NoFile(2048)]);
        assert_eq!(
            plan(&[ResourceLimit::FileSize(10)]),
            [ResourceLimit::FileSize(10), ResourceLimit::NoFile(2048)]
        );
        assert_eq!(
            plan(&[ResourceLimit::NoFile(64)]),
            [ResourceLimit::NoFile(64)]
        );
    }
}
