//! Snapshots: what a paused VM's state file holds ([`MicrovmState`]), how it is taken
//! ([`create`]) and how a new process is built from it ([`restore`]). Guest memory goes to a
//! separate memory file ([`memory`]), which a restore maps, or which a page-fault handler serves
//! ([`uffd`]). The file format itself (magic, version, CRC) and atomic replacement are
//! `kiln-snapshot`'s.

pub mod create;
pub mod memory;
pub mod restore;
pub mod uffd;
pub mod validate;
pub mod working_set;

use std::path::PathBuf;

use kiln_devices::legacy::SerialDeviceState;
use kiln_devices::virtio::balloon::BalloonState;
use kiln_devices::virtio::block::BlockState;
use kiln_devices::virtio::net::NetState;
use kiln_devices::virtio::persist::TransportState;
use kiln_devices::virtio::vsock::VsockState;
use serde::{Deserialize, Serialize};

use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::VmState;

/// Errors taking or loading a snapshot; each names the file or the step.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The request does not fit the VM's state.
    #[error("{0}")]
    Refused(String),
    /// A state file could not be read or written.
    #[error("{path}: {err}")]
    State {
        /// The state file.
        path: PathBuf,
        /// Why.
        err: kiln_snapshot::SnapshotError,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {err}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// A file could not be created or committed.
    #[error("{path}: {err}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        err: kiln_snapshot::AtomicFileError,
    },
    /// A memory file could not be written or does not fit.
    #[error("{path}: {err}")]
    Memory {
        /// The memory file.
        path: PathBuf,
        /// Why.
        err: memory::MemoryFileError,
    },
    /// The page-fault handler of a `Uffd` backend could not be given guest memory.
    #[error(transparent)]
    Uffd(#[from] uffd::UffdBackendError),
    /// KVM refused to save or restore something.
    #[error("{0}")]
    Kvm(String),
    /// The VM could not be rebuilt.
    #[error(transparent)]
    Build(#[from] crate::builder::BuildError),
}

/// What `--describe-snapshot` prints for a state file: its format version and what it holds.
pub fn describe(path: &std::path::Path) -> Result<String, PersistError> {
    let state: MicrovmState =
        kiln_snapshot::load_state(path).map_err(|err| PersistError::State {
            path: path.to_path_buf(),
            err,
        })?;
    // Each drive's files, so a reader knows what a restore needs next to the state file.
    let drives: String = state
        .devices
        .iter()
        .filter_map(|d| match &d.device {
            DeviceKindState::Block(b) => Some(match &b.cow_overlay_path {
                Some(o) => format!(
                    "; drive {}: {} under overlay {}",
                    b.id,
                    b.path.display(),
                    o.display()
                ),
                None => format!("; drive {}: {}", b.id, b.path.display()),
            }),
            DeviceKindState::Vsock(_) | DeviceKindState::Net(_) | DeviceKindState::Balloon(_) => {
                None
            }
        })
        .collect();
    Ok(format!(
        "{}: Kiln snapshot format v{}; snapshot {:016x}, {} snapshot, {} vCPUs, {} MiB of memory, {} virtio devices{drives}",
        path.display(),
        kiln_snapshot::FORMAT_VERSION,
        state.snapshot_id,
        if state.diff { "diff" } else { "full" },
        state.vcpus.len(),
        state.mem_size >> 20,
        state.devices.len()
    ))
}

/// A virtio device's saved state, by kind.
#[derive(Clone, Serialize, Deserialize)]
pub enum DeviceKindState {
    /// A drive.
    Block(BlockState),
    /// The vsock device.
    Vsock(VsockState),
    /// A network interface.
    Net(NetState),
    /// The memory balloon (boxed: it carries the guest's statistics).
    Balloon(Box<BalloonState>),
}

/// A virtio device on the bus, saved.
#[derive(Clone, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// Its MMIO window.
    pub addr: u64,
    /// Its interrupt line.
    pub irq: u32,
    /// The transport's registers.
    pub transport: TransportState,
    /// The device.
    pub device: DeviceKindState,
}

/// Everything in a snapshot's state file.
#[derive(Serialize, Deserialize)]
pub struct MicrovmState {
    /// Names the snapshot; the memory file's trailer carries the same id.
    pub snapshot_id: u64,
    /// True for a diff snapshot (its memory file holds only the changed pages).
    pub diff: bool,
    /// The VM's configuration as JSON (Firecracker's config-file shape), for GET /vm/config.
    pub config_json: String,
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// The in-kernel devices and clock.
    pub vm: VmState,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialDeviceState,
    /// The virtio devices, in attachment order.
    pub devices: Vec<VirtioDeviceState>,
}
