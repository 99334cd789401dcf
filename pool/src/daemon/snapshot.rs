//! Snapshots of running sandboxes kept as templates: the sandbox's vCPUs pause, its state,
//! memory and disk overlay go to a new template folder, it runs on, and the folder becomes a
//! template record of kind `snapshot`. So creating sandboxes from it by name or id, its warm
//! pool, `kiln template ls/rm` and the template list all work as for a built template, and it
//! outlives the sandbox it was taken from. The checkpoint itself (pause, snapshot, resume, a new
//! agent connection) is shared with fork.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use super::error::DaemonError;
use super::templates::READY_MARKER;
use super::{Daemon, new_id, now_s};
use crate::db::TemplateRow;
use crate::template::spec::{Spec, valid_name};
use crate::template::{NIC_MARKER, TemplateFiles};
use crate::types::TemplateInfo;
use crate::vm::VmProcess;

/// A template record's kind when it was taken from a sandbox.
pub const SNAPSHOT_KIND: &str = "snapshot";
/// The file in a snapshot's folder naming the sandbox it was taken from.
pub const SOURCE_FILE: &str = "source";

/// Pauses `vm`, writes its snapshot into `into`, resumes it and connects to its agent again (the
/// snapshot reset the guest's vsock connections, as Firecracker's does, the daemon's to the agent
/// included). The VM comes back whatever happened; the connection only if all went well.
pub fn checkpoint(
    mut vm: VmProcess,
    into: &TemplateFiles,
) -> (VmProcess, Result<kiln_agent::client::Client, DaemonError>) {
    let result = (|| {
        std::fs::create_dir_all(&into.dir)
            .map_err(|e| DaemonError::Internal(format!("{}: {e}", into.dir.display())))?;
        vm.pause()?;
        let r = vm.snapshot(into);
        vm.resume()?;
        r?;
        let client = kiln_agent::client::wait_ready(
            &vm.vsock,
            std::time::Instant::now() + super::create::AGENT_WAIT,
        )?;
        Ok::<_, DaemonError>(client)
    })();
    (vm, result)
}

/// Checks a snapshot's name, or makes one.
pub fn snapshot_name(name: Option<String>) -> Result<String, DaemonError> {
    match name {
        Some(n) if valid_name(&n) => Ok(n),
        Some(n) => Err(DaemonError::BadRequest(format!(
            "snapshot name {n:?} is not a template name: 1 to 64 of a-z, 0-9, '.', '_', '-', \
             starting with a letter or digit"
        ))),
        None => Ok(format!("snapshot-{}", &new_id()[..12])),
    }
}

/// Finishes a snapshot's folder: the root image beside it (a hard link, so the snapshot keeps
/// its disk whatever happens to the template it came from), the network marker when the source
/// had an interface, the source sandbox's id, and last the ready marker.
fn finish_folder(
    files: &TemplateFiles,
    source: &TemplateFiles,
    sandbox: &str,
) -> Result<(), DaemonError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| DaemonError::Internal(format!("{}: {e}", p.display()))
    };
    if !files.rootfs.exists() {
        std::fs::hard_link(&source.rootfs, &files.rootfs).map_err(io(&files.rootfs))?;
    }
    if source.has_nic() {
        std::fs::write(files.dir.join(NIC_MARKER), "").map_err(io(&files.dir))?;
    }
    std::fs::write(files.dir.join(SOURCE_FILE), sandbox).map_err(io(&files.dir))?;
    std::fs::write(files.dir.join(READY_MARKER), now_s().to_string()).map_err(io(&files.dir))
}

impl Daemon {
    /// Snapshots running sandbox `id` (memory and disk) into a template named `name` (or a made
    /// up one); the sandbox runs on. A snapshot of the same name is replaced (its old files go
    /// once no sandbox uses them); a built template's name is refused. On failure nothing is
    /// left: no record, no folder.
    pub async fn snapshot(
        self: &Arc<Self>,
        id: &str,
        name: Option<String>,
    ) -> Result<TemplateInfo, DaemonError> {
        let name = snapshot_name(name)?;
        let sb = self.sandbox(id)?;
        let old = self.db().template(&name)?.map(|(row, _, _)| row);
        if let Some(row) = &old
            && (row.kind != SNAPSHOT_KIND || row.id == name)
        {
            return Err(DaemonError::Conflict(format!(
                "{name} is the name or id of a template that is not a snapshot of that name: \
                 choose another name"
            )));
        }
        let files = TemplateFiles::in_dir(&self.cfg.templates_dir().join(new_id()));
        let source = TemplateFiles::in_dir(&self.cfg.templates_dir().join(&sb.template_id));
        let vm = sb.live().vm.take().ok_or_else(|| {
            DaemonError::Conflict(format!("sandbox {id} is paused; resume it first"))
        })?;
        let (files2, id2) = (files.clone(), id.to_string());
        let (vm, taken) = tokio::task::spawn_blocking(move || {
            let (vm, taken) = checkpoint(vm, &files2);
            let taken = taken.and_then(|c| finish_folder(&files2, &source, &id2).map(|_| c));
            (vm, taken)
        })
        .await?;
        sb.live().vm = Some(vm);
        let recorded = taken.and_then(|client| {
            sb.live().client = Some(client);
            // The source's own variables live in its agent's memory, which the snapshot keeps;
            // a sandbox from it has its environment set again at restore, so they join the
            // template's.
            let mut spec = Spec {
                name: name.clone(),
                ..(*sb.spec).clone()
            };
            spec.env.extend(sb.env.clone());
            let template_id = files
                .dir
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            self.db().put_template(&TemplateRow {
                id: template_id,
                name: name.clone(),
                spec_json: serde_json::to_string(&spec).unwrap_or_default(),
                built_at: now_s(),
                disk_bytes: std::fs::metadata(&files.rootfs).map_or(0, |m| m.len()),
                kind: SNAPSHOT_KIND.into(),
            })?;
            Ok(())
        });
        if let Err(e) = recorded {
            let _ = std::fs::remove_dir_all(&files.dir);
            return Err(e);
        }
        if let Some(old) = old {
            self.retire_snapshot(&old.id).await?;
        }
        tracing::info!(sandbox = %id, snapshot = %name, "snapshot taken");
        self.template_info(&name)
    }

    /// Lets go of snapshot template `template_id` after its name went to a newer one: its warm
    /// VMs stop, and its record and files go unless a sandbox still runs from it (then they go
    /// with the last one, see [`Daemon::release_unnamed_snapshot`]).
    async fn retire_snapshot(self: &Arc<Self>, template_id: &str) -> Result<(), DaemonError> {
        let warm = self.warm().remove(template_id).unwrap_or_default();
        let d = self.clone();
        tokio::task::spawn_blocking(move || {
            for mut w in warm {
                w.vm.kill();
                let _ = std::fs::remove_dir_all(&w.vm.dir);
                let _ = d.db().remove_sandbox(&w.id);
            }
        })
        .await?;
        self.release_unnamed_snapshot(template_id)
    }

    /// Removes snapshot template `template_id`'s record and folder if no name points at it and
    /// no sandbox runs from it (called when one of its sandboxes goes).
    pub fn release_unnamed_snapshot(&self, template_id: &str) -> Result<(), DaemonError> {
        let used = self
            .all_sandboxes()
            .iter()
            .any(|s| s.template_id == template_id);
        if !used && self.db().forget_unnamed_snapshot(template_id)? {
            let _ = std::fs::remove_dir_all(self.cfg.templates_dir().join(template_id));
        }
        Ok(())
    }

    /// The name of a snapshot whose disk is built template `t`'s root image (a hard link to
    /// it). Such a snapshot's state names the image by the path of the template it was built
    /// under when VMMs run unjailed (a snapshot of a sandbox from a snapshot names the same
    /// one), so that template must stay while the snapshot does; snapshots hold none.
    pub fn snapshot_on_image(&self, t: &TemplateInfo) -> Result<Option<String>, DaemonError> {
        if t.kind == SNAPSHOT_KIND {
            return Ok(None);
        }
        let image = |id: &str| {
            let path = TemplateFiles::in_dir(&self.cfg.templates_dir().join(id)).rootfs;
            std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
        };
        let Some(mine) = image(&t.id) else {
            return Ok(None);
        };
        Ok(self
            .snapshots()?
            .into_iter()
            .find(|(s, _)| s.id != t.id && image(&s.id) == Some(mine))
            .map(|(s, _)| s.name))
    }

    /// The snapshots (templates of kind `snapshot`), with the sandbox each was taken from.
    pub fn snapshots(&self) -> Result<Vec<(TemplateInfo, String)>, DaemonError> {
        Ok(self
            .templates()?
            .into_iter()
            .filter(|t| t.kind == SNAPSHOT_KIND)
            .map(|t| {
                let dir = self.cfg.templates_dir().join(&t.id);
                let source = std::fs::read_to_string(dir.join(SOURCE_FILE)).unwrap_or_default();
                (t, source.trim().to_string())
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_or_made() {
        assert_eq!(
            snapshot_name(Some("my-snap.1".into())).unwrap(),
            "my-snap.1"
        );
        let made = snapshot_name(None).unwrap();
        assert!(made.starts_with("snapshot-") && valid_name(&made), "{made}");
        for bad in ["", "Upper", "-x", "a/b", &"x".repeat(65)] {
            let e = snapshot_name(Some(bad.into())).unwrap_err();
            assert_eq!(e.status(), 400);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }
}
