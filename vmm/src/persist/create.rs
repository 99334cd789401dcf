//! Taking a snapshot of a paused VM (`PUT /snapshot/create`).
//!
//! Order matters: `Async` drives first finish the requests they have in flight, the vsock device
//! then tells the guest its connections are gone (the event
//! lands in guest memory and the event queue, both saved after), then devices, vCPUs and the VM
//! are saved, and guest memory is written last. Both files are written under temporary names and
//! fsynced, and only then renamed into place, memory first; a kill at any point before the renames
//! leaves the previous snapshot as it was, and the trailer check catches the one in between.

use std::io::Write;
use std::path::Path;

use kiln_api::requests::snapshot::{SnapshotCreate, SnapshotType};
use kiln_snapshot::{AtomicFile, PAGE_SIZE, Persist};

use super::memory::{write_diff, write_full};
use super::{DeviceKindState, MicrovmState, PersistError, VirtioDeviceState};
use crate::Vmm;
use crate::device_manager::VirtioKind;

fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh random snapshot id.
fn new_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Unique enough as a fallback: the trailer only has to tell snapshots apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t ^ u64::from(std::process::id()).rotate_left(32);
    }
    u64::from_le_bytes(b)
}

fn atomic(path: &Path) -> Result<AtomicFile, PersistError> {
    AtomicFile::create(path).map_err(|err| PersistError::File {
        path: path.to_path_buf(),
        err,
    })
}

fn commit(file: AtomicFile) -> Result<(), PersistError> {
    let path = file.final_path().to_path_buf();
    file.commit()
        .map_err(|err| PersistError::File { path, err })
}

impl Vmm {
    /// Saves every device; the vsock device tells the guest its connections were reset first.
    fn save_devices(&self) -> Vec<VirtioDeviceState> {
        self.devices
            .devices()
            .iter()
            .map(|d| {
                let device = match &d.kind {
                    VirtioKind::Block(b) => DeviceKindState::Block(lock(b).save()),
                    VirtioKind::Vsock(v) => {
                        let mut v = lock(v);
                        if !v.send_transport_reset() {
                            log::warn!(
                                "vsock: the guest had no event buffer for the transport reset; its connections survive in the snapshot"
                            );
                        }
                        DeviceKindState::Vsock(v.save())
                    }
                    VirtioKind::Net(n) => DeviceKindState::Net(lock(n).save()),
                    VirtioKind::Balloon(b) => DeviceKindState::Balloon(Box::new(lock(b).save())),
                };
                VirtioDeviceState {
                    addr: d.addr,
                    irq: d.irq,
                    transport: lock(&d.transport).save(),
                    device,
                }
            })
            .collect()
    }

    /// Finishes what `Async` drives have in flight, so the saved queues hold no request the
    /// restored device would never answer (the interrupts this raises reach the irqchip before
    /// it is saved).
    fn complete_block_requests(&self) {
        for d in self.devices.devices() {
            if let VirtioKind::Block(b) = &d.kind {
                lock(b).complete_in_flight();
            }
        }
    }

    /// Writes a snapshot of the paused VM: its state to `snapshot_path`, its memory to
    /// `mem_file_path` (all of it, or for `Diff` only what changed since the last snapshot).
    pub fn snapshot(&mut self, params: &SnapshotCreate) -> Result<(), PersistError> {
        let Some(clock) = self.paused_clock else {
            return Err(PersistError::Refused(
                "the VM is running; pause it first (PATCH /vm {\"state\": \"Paused\"})".into(),
            ));
        };
        let diff = params.snapshot_type == SnapshotType::Diff;
        if diff && !self.track_dirty {
            return Err(PersistError::Refused(
                "snapshot_type Diff needs dirty page tracking: set track_dirty_pages in machine-config (or when loading the snapshot)".into(),
            ));
        }
        if diff && !self.dirty_log_intact {
            return Err(PersistError::Refused(
                "an earlier snapshot failed after reading the dirty page log, so a diff would miss pages; take a Full snapshot".into(),
            ));
        }
        let started = std::time::Instant::now();
        let id = new_id();
        self.complete_block_requests();
        let devices = self.save_devices();
        let mut vcpus = Vec::with_capacity(self.handles.len());
        for handle in &self.handles {
            vcpus.push(
                handle
                    .save()
                    .map_err(|e| PersistError::Kvm(e.to_string()))?,
            );
        }
        let mut vm = self
            .vm
            .save_state()
            .map_err(|e| PersistError::Kvm(e.to_string()))?;
        // The clock as it was when the VM paused, so a restored guest continues from there.
        vm.clock = clock;
        // The MMDS configuration is the instance's (the API sets it there); the data store is
        // not saved, as with Firecracker.
        let saved = crate::config::VmConfig {
            mmds_config: self.instance().mmds_config.clone(),
            ..self.config.clone()
        };
        let config_json = serde_json::to_string(&saved)
            .map_err(|e| PersistError::Refused(format!("cannot save the configuration: {e}")))?;
        let state = MicrovmState {
            snapshot_id: id,
            diff,
            config_json,
            mem_size: self.config.machine.mem_size_mib as u64 * (1 << 20),
            vm,
            vcpus,
            serial: lock(&self.serial).save(),
            devices,
        };

        let mem_path = params.mem_file_path.as_path();
        let mem_file = atomic(mem_path)?;
        let mem_err = |err| PersistError::Memory {
            path: mem_path.to_path_buf(),
            err,
        };
        // From here a failure loses the dirty log already read; a later diff would miss pages.
        self.dirty_log_intact = false;
        // The pages written since the last snapshot (the next diff is relative to this one) and
        // the free ones, left out of both kinds.
        let pages = self
            .pages
            .take_for_snapshot()
            .map_err(|e| PersistError::Kvm(e.to_string()))?;
        let free: u64 = pages.free.iter().map(|f| f.dirty_pages() * PAGE_SIZE).sum();
        let written = if diff {
            write_diff(mem_file.file(), &self.mem, &pages.dirty, &pages.free, id)
                .map_err(mem_err)?
        } else {
            write_full(
                mem_file.file(),
                &self.mem,
                self.memfd.as_ref(),
                &pages.free,
                id,
            )
            .map_err(mem_err)?
        };
        let state_path = params.snapshot_path.as_path();
        let bytes = kiln_snapshot::to_bytes(&state).map_err(|err| PersistError::State {
            path: state_path.to_path_buf(),
            err,
        })?;
        let state_file = atomic(state_path)?;
        state_file
            .file()
            .write_all(&bytes)
            .map_err(|err| PersistError::Write {
                path: state_file.tmp_path().to_path_buf(),
                err,
            })?;
        commit(mem_file)?;
        commit(state_file)?;
        self.dirty_log_intact = true;
        log::info!(
            "{} snapshot {id:016x} written in {:?}: {} bytes of state, {written} bytes of memory ({free} bytes free in the guest left out)",
            if diff { "diff" } else { "full" },
            started.elapsed(),
            bytes.len()
        );
        Ok(())
    }
}
