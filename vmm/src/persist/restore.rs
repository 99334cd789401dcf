//! Building a VM from a snapshot (`PUT /snapshot/load`), in a new `kiln-vmm` process.
//!
//! The state file is checked (magic, version, CRC) and the memory file paired with it (trailer),
//! guest memory is mapped privately from the memory file (or, with the `Uffd` backend, mapped
//! anonymous and handed to a page-fault handler, [`super::uffd`], whose memory file Kiln never
//! sees), the vCPUs and the in-kernel irqchip, PIT and clock get their saved state, and only then
//! do the platform and virtio devices come back at their saved windows and interrupt lines (so
//! interrupts they raise again are not lost). The VM starts paused unless `resume_vm` was asked
//! for.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kiln_api::requests::mmds::MmdsConfig;
use kiln_api::requests::snapshot::{MemBackendType, SnapshotLoad};
use kiln_devices::virtio::MmioTransport;
use kiln_devices::virtio::balloon::{Balloon, BalloonRestoreArgs};
use kiln_devices::virtio::block::{Block, BlockRestoreArgs};
use kiln_devices::virtio::net::{Net, NetRestoreArgs};
use kiln_devices::virtio::vsock::{Vsock, VsockRestoreArgs};
use kiln_snapshot::Persist;
use vmm_sys_util::eventfd::EventFd;

use super::memory::check_file;
use super::uffd;
use super::validate::validate;
use super::working_set::{LoadedSnapshot, WorkingSet};
use super::{DeviceKindState, MicrovmState, PersistError};
use crate::Vmm;
use crate::builder::{BuildError, Platform, create_vm, free_pages};
use crate::config::{SerialConfig, VmConfig};
use crate::device_manager::{MmioDeviceManager, Placement, VirtioKind};
use crate::instance::Instance;
use crate::memory::map_snapshot;
use crate::vmm::VmmParts;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vcpu_state;
use crate::vstate::vm::Vm;

fn refused(msg: String) -> PersistError {
    PersistError::Refused(msg)
}

/// Reads and checks the state file and, for the `File` backend, the memory file that goes with
/// it (a page-fault handler keeps its memory file to itself).
fn open(params: &SnapshotLoad) -> Result<(MicrovmState, Option<File>), PersistError> {
    let state_path = &params.snapshot_path;
    let state: MicrovmState =
        kiln_snapshot::load_state(state_path).map_err(|err| PersistError::State {
            path: state_path.clone(),
            err,
        })?;
    // Before the memory size sizes anything (the file check, the mapping, the dirty bitmap).
    validate(&state, state_path)?;
    if params.mem_backend.backend_type == MemBackendType::Uffd {
        return Ok((state, None));
    }
    let mem_path = &params.mem_backend.backend_path;
    let mem_err = |err| PersistError::Memory {
        path: mem_path.clone(),
        err,
    };
    let file = File::open(mem_path).map_err(|e| mem_err(super::memory::MemoryFileError::Io(e)))?;
    check_file(&file, state.mem_size, state.snapshot_id).map_err(mem_err)?;
    Ok((state, Some(file)))
}

/// The restored VM's configuration: the saved one, with this process's console and the vsock
/// and drive overrides applied.
fn config_of(
    state: &MicrovmState,
    params: &SnapshotLoad,
    serial: &SerialConfig,
    path: &Path,
) -> Result<VmConfig, PersistError> {
    let mut config: VmConfig = serde_json::from_str(&state.config_json).map_err(|e| {
        refused(format!(
            "{}: the saved configuration is unreadable: {e}",
            path.display()
        ))
    })?;
    config.serial = serial.clone();
    config.machine.track_dirty_pages = params.track_dirty_pages;
    if let (Some(vsock), Some(o)) = (config.vsock.as_mut(), &params.vsock_override) {
        vsock.uds_path = o.uds_path.clone();
    }
    if params.vsock_override.is_some() && config.vsock.is_none() {
        return Err(refused(
            "vsock_override: the snapshot has no vsock device".into(),
        ));
    }
    for o in &params.network_overrides {
        let Some(n) = config
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == o.iface_id)
        else {
            let have: Vec<&str> = config
                .network_interfaces
                .iter()
                .map(|n| n.iface_id.as_str())
                .collect();
            return Err(refused(format!(
                "network_overrides: the snapshot has no network interface {:?} (it has {have:?})",
                o.iface_id
            )));
        };
        if !kiln_devices::virtio::net::tap::valid_name(&o.host_dev_name) {
            return Err(refused(format!(
                "network_overrides: host_dev_name {:?} is not an interface name",
                o.host_dev_name
            )));
        }
        n.host_dev_name = o.host_dev_name.clone();
    }
    for o in &params.drive_overrides {
        let Some(drive) = config.drives.iter_mut().find(|d| d.drive_id == o.drive_id) else {
            return Err(refused(format!(
                "drive_overrides: the snapshot has no drive {:?}",
                o.drive_id
            )));
        };
        if let Some(overlay) = &o.cow_overlay_path {
            if drive.cow_overlay_path.is_none() {
                return Err(refused(format!(
                    "drive_overrides: drive {:?} has no copy-on-write overlay in the snapshot, so \
                     cow_overlay_path {} has nothing to replace",
                    o.drive_id,
                    overlay.display()
                )));
            }
            drive.cow_overlay_path = Some(overlay.clone());
        }
        if let Some(path) = &o.path_on_host {
            drive.path_on_host = path.clone();
        }
    }
    Ok(config)
}

/// The saved MMDS configuration, checked against the saved interfaces (a state file that names
/// one it lacks is refused rather than served half).
fn mmds_config_of(config: &VmConfig, path: &Path) -> Result<Option<MmdsConfig>, PersistError> {
    let Some(mmds) = &config.mmds_config else {
        return Ok(None);
    };
    let have: Vec<&str> = config
        .network_interfaces
        .iter()
        .map(|n| n.iface_id.as_str())
        .collect();
    if let Some(iface) = crate::mmds::unknown_interface(mmds, &have) {
        return Err(refused(format!(
            "{}: the saved mmds/config names network interface {iface:?}, which the snapshot does not have",
            path.display()
        )));
    }
    Ok(Some(mmds.clone()))
}

/// Builds a VM from the snapshot `params` names; console output per `serial`. Uses the KVM VM
/// in `prepared` (made ahead by [`crate::builder::prepare_vm`]) if there is one, and takes it only
/// once the snapshot's files were read and checked (and a `Uffd` handler has guest memory), so a
/// bad file or an absent handler leaves it for the next try.
///
/// The MMDS comes back as Firecracker brings it back: its configuration (version, address, the
/// interfaces that answer it) from the snapshot, put in force in `instance`, and its data store
/// as this process has it (empty until `PUT /mmds`; the snapshot does not carry the data).
pub fn restore(
    params: &SnapshotLoad,
    serial: &SerialConfig,
    prepared: &mut Option<Vm>,
    instance: &mut Instance,
) -> Result<Vmm, PersistError> {
    let (state, file) = open(params)?;
    log::debug!("restore: state file read and checked");
    if params.clock_realtime && state.vm.clock.flags & kvm_bindings::KVM_CLOCK_REALTIME == 0 {
        return Err(refused(format!(
            "clock_realtime: {} has no wall-clock stamp on its guest clock (the host that took it had no stable TSC)",
            params.snapshot_path.display()
        )));
    }
    let config = config_of(&state, params, serial, &params.snapshot_path)?;
    let mmds_config = mmds_config_of(&config, &params.snapshot_path)?;
    // The handler has guest memory before anything below can touch it, and `prepared` is taken
    // only after that: a handler that is not there leaves the VMM as it was, ready for another
    // load.
    let loaded = LoadedSnapshot {
        snapshot_id: state.snapshot_id,
        mem_size: state.mem_size,
    };
    let mut working_set = None;
    let (mem, page_fault_handler) = match &file {
        Some(file) => {
            let mem = map_snapshot(file, state.mem_size).map_err(BuildError::from)?;
            if let Some(path) = &params.working_set_path {
                let set = WorkingSet::load(path, loaded, &mem)?;
                set.prefault(&mem)?;
                working_set = Some(set);
            }
            (mem, None)
        }
        None if params.working_set_path.is_some() => {
            return Err(refused(
                "working_set_path: a working set is mapped in from the memory file; with the Uffd \
                 backend the page-fault handler serves every page"
                    .into(),
            ));
        }
        None => {
            let (mem, handler) = uffd::connect(&params.mem_backend.backend_path, state.mem_size)?;
            (mem, Some(handler))
        }
    };
    let logged = params.track_dirty_pages;
    let vm = create_vm(prepared.take(), &mem, logged)?;
    let pages = free_pages(&vm, &mem, logged)?;
    log::debug!("restore: memory mapped and registered");

    // KVM's own state first: the vCPUs, then the irqchip, PIT and clock. Devices come after, so
    // the interrupts they raise again on restore (a pending UART or virtio interrupt) are
    // delivered into the restored irqchip and LAPICs instead of being overwritten by them.
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (id, saved) in state.vcpus.iter().enumerate() {
        let vcpu = Vcpu::new(&vm, id as u8).map_err(BuildError::from)?;
        vcpu_state::restore(vcpu.fd(), id as u8, saved).map_err(BuildError::from)?;
        vcpus.push(vcpu);
    }
    log::debug!("restore: vCPUs restored");
    vm.restore_state(&state.vm)
        .map_err(|e| PersistError::Kvm(e.to_string()))?;
    log::debug!("restore: irqchip, PIT and clock restored");
    // The working set's pages in KVM's page tables too, now that the vCPUs' state is in.
    if let (Some(set), Some(vcpu)) = (&working_set, vcpus.first())
        && let Err(e) = set.prefault_kvm(vcpu.fd())
    {
        log::warn!(
            "working set: mapping pages in KVM ahead failed ({e}); the guest faults them in"
        );
    }

    let mut platform = Platform::new(vm, &config, Some(&state.serial))?;

    let mut devices = MmioDeviceManager::default();
    for saved in &state.devices {
        let irqfd =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::EventFd("a device IRQ", e))?;
        let (name, kind) = match &saved.device {
            DeviceKindState::Block(s) => {
                let drive = config.drives.iter().find(|d| d.drive_id == s.id);
                let limits = drive.and_then(|d| d.rate_limiter.as_ref());
                let o = params.drive_overrides.iter().find(|o| o.drive_id == s.id);
                let args = BlockRestoreArgs {
                    mem: mem.clone(),
                    irqfd,
                    rate_limiter: crate::config::rate_limiter::rate_limiter(limits),
                    path_override: o.and_then(|o| o.path_on_host.clone()),
                    cow_overlay_override: o.and_then(|o| o.cow_overlay_path.clone()),
                    io_engine: crate::config::drive::io_engine(drive.and_then(|d| d.io_engine)),
                };
                let block = Block::restore(args, s).map_err(BuildError::Block)?;
                (
                    format!("drive {}", s.id),
                    VirtioKind::Block(Arc::new(Mutex::new(block))),
                )
            }
            DeviceKindState::Vsock(s) => {
                let args = VsockRestoreArgs {
                    mem: mem.clone(),
                    irqfd,
                    uds_override: params.vsock_override.as_ref().map(|o| o.uds_path.clone()),
                };
                let vsock = Vsock::restore(args, s).map_err(|e| {
                    refused(format!(
                        "{e} (a VM restored beside the original needs its own socket: pass vsock_override)"
                    ))
                })?;
                (
                    "vsock".to_string(),
                    VirtioKind::Vsock(Arc::new(Mutex::new(vsock))),
                )
            }
            DeviceKindState::Net(s) => {
                let host_dev_name = params
                    .network_overrides
                    .iter()
                    .find(|o| o.iface_id == s.id)
                    .map(|o| o.host_dev_name.clone());
                let args = NetRestoreArgs {
                    mem: mem.clone(),
                    irqfd,
                    host_dev_name,
                };
                let mut net = Net::restore(args, s).map_err(|e| {
                    refused(format!(
                        "{e} (a VM restored beside the original needs its own TAP: pass network_overrides)"
                    ))
                })?;
                if let Some(hook) =
                    crate::mmds::hook_for(&s.id, mmds_config.as_ref(), &instance.mmds)
                {
                    net.set_frame_hook(Box::new(hook));
                }
                (
                    format!("network interface {}", s.id),
                    VirtioKind::Net(Arc::new(Mutex::new(net))),
                )
            }
            DeviceKindState::Balloon(s) => {
                let args = BalloonRestoreArgs {
                    mem: mem.clone(),
                    irqfd,
                    pages: pages.clone(),
                };
                let balloon = Balloon::restore(args, s).map_err(BuildError::Balloon)?;
                (
                    "balloon".to_string(),
                    VirtioKind::Balloon(Arc::new(Mutex::new(balloon))),
                )
            }
        };
        let transport = MmioTransport::restore(kind.device(), mem.clone(), &saved.transport)
            .map_err(|e| refused(format!("{name}: cannot restore its transport: {e}")))?;
        let placement = Placement::At {
            addr: saved.addr,
            irq: saved.irq,
        };
        let mut ctx = platform.attach_context(&mem);
        devices
            .attach(&name, kind, placement, Some(transport), &mut ctx)
            .map_err(BuildError::from)?;
    }

    instance.loaded_snapshot = file.is_some().then_some(loaded);
    if let Some(mmds) = mmds_config {
        instance
            .configure_mmds(mmds)
            .map_err(|e| refused(format!("mmds/config: {e}")))?;
    }
    log::info!(
        "restored snapshot {:016x} from {}: {} vCPUs, {} MiB, {} devices",
        state.snapshot_id,
        params.snapshot_path.display(),
        state.vcpus.len(),
        state.mem_size >> 20,
        state.devices.len()
    );
    Ok(Vmm::new(VmmParts {
        platform,
        mem,
        memfd: None,
        page_fault_handler,
        pages,
        vcpus,
        devices,
        config,
        track_dirty: params.track_dirty_pages,
        paused_clock: Some(state.vm.clock),
        clock_realtime: params.clock_realtime,
    }))
}
