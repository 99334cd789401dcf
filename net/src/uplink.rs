//! `--allow-net`: a veth pair from the VM's namespace to the uplink namespace (the host's, by
//! default), numbered from [`crate::nft::VETH_RANGE`] one /30 per VM, with the uplink's shared
//! NAT table. The pair lives in the VM's namespace and goes with it; the shared table stays (it
//! holds no per-VM state). Allocation is serialized with a lock file so concurrent sandboxes
//! never pick the same /30.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use crate::link::{self, LinkError};
use crate::netns::{NetNs, NetNsError};
use crate::nft::{self, NftError, UPLINK_TABLE, VETH_INSIDE, VETH_OUTSIDE_PREFIX, VETH_RANGE};

/// Serializes veth allocation between processes.
pub const LOCK_FILE: &str = "/run/kiln-net.lock";
/// How many /30s the range holds.
pub const MAX_VETHS: u32 = 1 << (30 - VETH_RANGE.1);

/// Why the uplink could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// A namespace could not be entered.
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    /// A link step failed.
    #[error("--allow-net: {0}")]
    Link(#[from] LinkError),
    /// The shared table could not be loaded.
    #[error("--allow-net: {0}")]
    Nft(#[from] NftError),
    /// The lock file could not be taken.
    #[error("--allow-net: cannot lock {LOCK_FILE}: {0}")]
    Lock(std::io::Error),
    /// Every /30 is in use.
    #[error("--allow-net: all {MAX_VETHS} uplink links of {}/{} are in use", VETH_RANGE.0, VETH_RANGE.1)]
    Full,
}

/// A VM's uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Veth {
    /// Its number in the range.
    pub index: u32,
    /// The uplink end's name.
    pub outside: String,
    /// The uplink end's address (the VM namespace's gateway).
    pub outside_ip: Ipv4Addr,
    /// The VM namespace's end's address.
    pub inside_ip: Ipv4Addr,
}

/// Holds [`LOCK_FILE`] locked while alive.
struct Lock(File);

impl Lock {
    fn take() -> Result<Lock, UplinkError> {
        // /run is there on any booted host, but not always in a minimal root (an initramfs).
        if let Some(dir) = std::path::Path::new(LOCK_FILE).parent() {
            std::fs::create_dir_all(dir).map_err(UplinkError::Lock)?;
        }
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .map_err(UplinkError::Lock)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } < 0 {
            return Err(UplinkError::Lock(std::io::Error::last_os_error()));
        }
        Ok(Lock(f))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: flock on a descriptor we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Connects `vm` to `uplink`: shared table and forwarding in the uplink, a free /30, the veth
/// pair, addresses, and the VM namespace's default route and forwarding.
pub fn attach(vm: &NetNs, uplink: &NetNs) -> Result<Veth, UplinkError> {
    let _lock = Lock::take()?;
    let index = uplink.run(|| -> Result<u32, UplinkError> {
        if !nft::table_exists("inet", UPLINK_TABLE)? {
            nft::apply("uplink", &nft::uplink_ruleset())?;
        }
        link::sysctl("net/ipv4/ip_forward", "1")?;
        (0..MAX_VETHS)
            .find(|i| !link::exists(&format!("{VETH_OUTSIDE_PREFIX}{i}")))
            .ok_or(UplinkError::Full)
    })??;
    let base = u32::from(VETH_RANGE.0) + 4 * index;
    let veth = Veth {
        index,
        outside: format!("{VETH_OUTSIDE_PREFIX}{index}"),
        outside_ip: Ipv4Addr::from(base + 1),
        inside_ip: Ipv4Addr::from(base + 2),
    };
    let uplink_path = format!("/proc/{}/fd/{}", std::process::id(), uplink.as_raw_fd());
    vm.run(|| {
        link::ip(&[
            "link",
            "add",
            VETH_INSIDE,
            "type",
            "veth",
            "peer",
            "name",
            &veth.outside,
            "netns",
            &uplink_path,
        ])
    })??;
    uplink.run(|| -> Result<(), LinkError> {
        link::set_address(&veth.outside, veth.outside_ip, 30)?;
        link::up(&veth.outside)
    })??;
    vm.run(|| -> Result<(), LinkError> {
        link::set_address(VETH_INSIDE, veth.inside_ip, 30)?;
        link::up(VETH_INSIDE)?;
        link::ip(&[
            "route",
            "add",
            "default",
            "via",
            &veth.outside_ip.to_string(),
            "dev",
            VETH_INSIDE,
        ])?;
        link::sysctl("net/ipv4/ip_forward", "1")
    })??;
    Ok(veth)
}

/// The uplink `vm` already has (a namespace made by a process that is gone, being adopted), read
/// back from the address of its end of the veth; `None` when it has none.
pub fn existing(vm: &NetNs) -> Result<Option<Veth>, UplinkError> {
    let inside = vm.run(|| {
        if link::exists(VETH_INSIDE) {
            link::address(VETH_INSIDE).map(Some)
        } else {
            Ok(None)
        }
    })??;
    Ok(inside.map(veth_at))
}

/// The veth whose inside end has address `inside`.
fn veth_at(inside: Ipv4Addr) -> Veth {
    let index = (u32::from(inside) - u32::from(VETH_RANGE.0)) / 4;
    let base = u32::from(VETH_RANGE.0) + 4 * index;
    Veth {
        index,
        outside: format!("{VETH_OUTSIDE_PREFIX}{index}"),
        outside_ip: Ipv4Addr::from(base + 1),
        inside_ip: Ipv4Addr::from(base + 2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_veth_is_found_again_from_its_inside_address() {
        let v = veth_at(Ipv4Addr::new(10, 201, 0, 10));
        assert_eq!(
            v,
            Veth {
                index: 2,
                outside: "kn-2".into(),
                outside_ip: Ipv4Addr::new(10, 201, 0, 9),
                inside_ip: Ipv4Addr::new(10, 201, 0, 10),
            }
        );
    }
}
