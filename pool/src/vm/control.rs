//! Driving a running VMM through its API socket: boot, restore, pause, resume, snapshot, working
//! set, and the files it is given (linked into its jail when it has one).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{
    CMDLINE_OVERLAY, CMDLINE_WRITABLE, GUEST_CID, OVERLAY_NAME, ROOTFS_NAME, Root, VmError,
    VmProcess,
};
use crate::template::TemplateFiles;

/// A working set's name in a jail.
const WORKING_SET_NAME: &str = "working-set.json";

impl VmProcess {
    /// The path the VMM sees for the host path `host` (its own in a jail).
    pub(super) fn in_vm(&self, host: &Path) -> PathBuf {
        match &self.jail {
            Some((jail, _)) => jail.inside(host).unwrap_or_else(|| host.to_path_buf()),
            None => host.to_path_buf(),
        }
    }

    /// Gives the VMM the host file `host`: its own path unjailed, else a link in the jail named
    /// `name` (the VM's to write with `writable`).
    fn give(&mut self, host: &Path, name: &str, writable: bool) -> Result<PathBuf, VmError> {
        match &mut self.jail {
            Some((jail, _)) => Ok(jail.expose(host, name, writable)?),
            None => Ok(host.to_path_buf()),
        }
    }

    /// One API request that must answer 204.
    pub fn api(
        &mut self,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> Result<(), VmError> {
        let request = format!("{method} {path}");
        let text = body.to_string();
        match kiln_api::client::request(&self.api_sock, method, path, Some(&text)) {
            Ok((204, _)) => Ok(()),
            Ok((_, answer)) => {
                let message = serde_json::from_str::<serde_json::Value>(&answer)
                    .ok()
                    .and_then(|v| v["fault_message"].as_str().map(str::to_string))
                    .unwrap_or(answer);
                Err(VmError::Api { request, message })
            }
            Err(e) => Err(match self.try_exit() {
                Some(status) => self.exited_error(status),
                None => VmError::Api {
                    request,
                    message: e.to_string(),
                },
            }),
        }
    }

    /// Boots `kernel` from the root filesystem `rootfs`, attached as `root` says.
    pub fn boot(
        &mut self,
        kernel: &Path,
        rootfs: &Path,
        root: Root<'_>,
        vcpus: u32,
        mem_mib: u32,
    ) -> Result<(), VmError> {
        let base = match root {
            Root::Tmpfs => CMDLINE_OVERLAY,
            Root::Writable | Root::Cow(_) => CMDLINE_WRITABLE,
        };
        let args = match self.net.cmdline_word() {
            Some(word) => format!("{base} {word}"),
            None => base.to_string(),
        };
        let kernel = self.give(kernel, "vmlinux", false)?;
        self.rootfs = Some(rootfs.to_path_buf());
        let rootfs = self.give(rootfs, ROOTFS_NAME, matches!(root, Root::Writable))?;
        let mut drive = json!({"drive_id": "rootfs", "path_on_host": rootfs,
                               "is_root_device": true,
                               "is_read_only": matches!(root, Root::Tmpfs)});
        if let Root::Cow(overlay) = root {
            self.overlay = Some(overlay.to_path_buf());
            drive["cow_overlay_path"] = json!(self.give(overlay, OVERLAY_NAME, true)?);
        }
        self.api(
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": kernel, "boot_args": args}),
        )?;
        self.api(
            "PUT",
            "/machine-config",
            json!({"vcpu_count": vcpus, "mem_size_mib": mem_mib}),
        )?;
        self.api("PUT", "/drives/rootfs", drive)?;
        if let Some(iface) = self.net.interface() {
            self.api(
                "PUT",
                &format!("/network-interfaces/{}", kiln_net::addr::IFACE_ID),
                iface,
            )?;
        }
        let vsock = self.in_vm(&self.vsock);
        self.api(
            "PUT",
            "/vsock",
            json!({"guest_cid": GUEST_CID, "uds_path": vsock}),
        )?;
        self.api("PUT", "/actions", json!({"action_type": "InstanceStart"}))
    }

    /// Restores the snapshot in `from` and resumes it, its vsock on this VM's socket and its
    /// network interface (a snapshot taken with one) on this VM's TAP. In a jail
    /// the snapshot's root filesystem is linked where the VM that took it had it. A snapshot with
    /// a copy-on-write overlay gives this VM a sparse copy of it in its folder, and the root
    /// drive writes there (never to the snapshot's).
    pub fn restore(&mut self, from: &TemplateFiles) -> Result<(), VmError> {
        if self.jail.is_some() {
            self.give(&from.rootfs, ROOTFS_NAME, false)?;
            self.rootfs = Some(from.rootfs.clone());
        }
        let state = self.give(&from.state, "vmstate", false)?;
        let memory = self.give(&from.memory, "memory", false)?;
        let vsock = self.in_vm(&self.vsock);
        let mut body = json!({"snapshot_path": state,
                              "mem_backend": {"backend_type": "File", "backend_path": memory},
                              "resume_vm": true, "vsock_override": {"uds_path": vsock}});
        if let Some(live) = crate::disk::overlay_for_restore(&from.overlay, &self.dir)? {
            self.overlay = Some(live.clone());
            let overlay = self.give(&live, OVERLAY_NAME, true)?;
            body["drive_overrides"] = json!([{"drive_id": "rootfs", "cow_overlay_path": overlay}]);
        }
        if let Some(overrides) = self.net.overrides() {
            body["network_overrides"] = overrides;
        }
        if from.working_set.is_file() {
            let ws = self.give(&from.working_set, WORKING_SET_NAME, false)?;
            body["working_set_path"] = json!(ws);
        }
        self.api("PUT", "/snapshot/load", body)
    }

    /// Writes the working set of this restored VM (the guest pages it has touched since the
    /// load) to `to`; in a jail it is written there and moved out.
    pub fn save_working_set(&mut self, to: &Path) -> Result<(), VmError> {
        let Some((jail, _)) = &self.jail else {
            return self.api("PUT", "/snapshot/working-set", json!({"path": to}));
        };
        let inside = self.in_vm(&jail.root.join(WORKING_SET_NAME));
        self.api("PUT", "/snapshot/working-set", json!({"path": inside}))?;
        if let Some((jail, _)) = &self.jail {
            jail.take_out(WORKING_SET_NAME, to)?;
        }
        Ok(())
    }

    /// Pauses the vCPUs.
    pub fn pause(&mut self) -> Result<(), VmError> {
        self.api("PATCH", "/vm", json!({"state": "Paused"}))
    }

    /// Resumes the vCPUs.
    pub fn resume(&mut self) -> Result<(), VmError> {
        self.api("PATCH", "/vm", json!({"state": "Resumed"}))
    }

    /// Writes a Full snapshot of the paused VM into `into` (its state and memory files; in a jail
    /// they are written in the jail, moved out, and the root filesystem linked beside them), and
    /// a sparse copy of its copy-on-write overlay as it is now (the disk that goes with that
    /// memory) unless the overlay already is `into`'s (a template's).
    pub fn snapshot(&mut self, into: &TemplateFiles) -> Result<(), VmError> {
        self.snapshot_state(into)?;
        if let Some(live) = &self.overlay
            && *live != into.overlay
        {
            crate::disk::copy_sparse(live, &into.overlay)?;
        }
        Ok(())
    }

    fn snapshot_state(&mut self, into: &TemplateFiles) -> Result<(), VmError> {
        let Some((jail, _)) = &self.jail else {
            return self.api(
                "PUT",
                "/snapshot/create",
                json!({"snapshot_type": "Full", "snapshot_path": into.state,
                       "mem_file_path": into.memory}),
            );
        };
        let (state, memory) = (jail.root.join("snap.state"), jail.root.join("snap.memory"));
        let body = json!({"snapshot_type": "Full", "snapshot_path": self.in_vm(&state),
                          "mem_file_path": self.in_vm(&memory)});
        self.api("PUT", "/snapshot/create", body)?;
        if let Some((jail, _)) = &self.jail {
            jail.take_out("snap.state", &into.state)?;
            jail.take_out("snap.memory", &into.memory)?;
        }
        if let Some(rootfs) = &self.rootfs
            && *rootfs != into.rootfs
        {
            let _ = std::fs::remove_file(&into.rootfs);
            std::fs::hard_link(rootfs, &into.rootfs).map_err(|err| VmError::File {
                path: into.rootfs.clone(),
                err,
            })?;
        }
        Ok(())
    }

    /// Waits up to `limit` for the VMM to exit on its own (after the guest shut down).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<String> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// A warm VM becomes a sandbox: its cgroup gets the default CPU weight back (it waited at
    /// [`crate::jail::BACKGROUND_CPU_WEIGHT`]). Unjailed VMs have no cgroup of their own.
    pub fn foreground(&self) {
        if let Some((jail, cfg)) = &self.jail
            && let Err(e) = cfg.set_cpu_weight(&jail.id, crate::jail::SANDBOX_CPU_WEIGHT)
        {
            tracing::warn!(vm = %self.dir.display(), "cannot raise a warm VM's CPU weight: {e}");
        }
    }
}
