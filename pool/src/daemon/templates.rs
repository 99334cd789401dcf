//! Templates in the daemon: build (or find) one by its content key, list them with their pools,
//! set a pool, remove one.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::error::DaemonError;
use super::{Daemon, now_s};
use crate::db::TemplateRow;
use crate::template::spec::Spec;
use crate::template::{self, TemplateFiles, build};
use crate::types::{BuildEvent, PoolSettings, TemplateInfo};

/// The marker a finished template folder holds; a folder without it is a build that died.
pub const READY_MARKER: &str = "ready";

impl Daemon {
    /// Builds `spec` (or finds it already built), telling `progress` what happens.
    pub async fn build_template(
        self: &Arc<Self>,
        spec: Spec,
        progress: mpsc::Sender<BuildEvent>,
    ) -> Result<(TemplateInfo, bool), DaemonError> {
        spec.validate()
            .map_err(|e| DaemonError::BadRequest(e.to_string()))?;
        let inputs = self.cfg.inputs.clone();
        let spec2 = spec.clone();
        let key = tokio::task::spawn_blocking(move || template::key(&spec2, &inputs))
            .await?
            .map_err(|e| DaemonError::BadRequest(format!("reading the template's inputs: {e}")))?;
        let lock = {
            let mut builds = self.builds.lock().unwrap_or_else(|p| p.into_inner());
            builds.entry(key.clone()).or_default().clone()
        };
        let _one_at_a_time = lock.lock().await;
        let dir = self.cfg.templates_dir().join(&key);
        let spec_json = serde_json::to_string(&spec).unwrap_or_default();
        let cached = dir.join(READY_MARKER).exists();
        if !cached {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)
                .map_err(|e| DaemonError::Internal(format!("{}: {e}", dir.display())))?;
            let files = TemplateFiles::in_dir(&dir);
            let inputs = self.cfg.inputs.clone();
            let spec2 = spec.clone();
            let tx = progress.clone();
            let built = tokio::task::spawn_blocking(move || {
                let mut say = |ev: BuildEvent| {
                    let _ = tx.blocking_send(ev);
                };
                build::build(&spec2, &inputs, &files, &mut say)
            })
            .await?;
            if let Err(e) = built {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
            std::fs::write(dir.join(READY_MARKER), now_s().to_string())
                .map_err(|e| DaemonError::Internal(format!("{}: {e}", dir.display())))?;
        }
        let disk_bytes = std::fs::metadata(dir.join("rootfs.ext4")).map_or(0, |m| m.len());
        let built_at = std::fs::read_to_string(dir.join(READY_MARKER))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(now_s);
        self.db().put_template(&TemplateRow {
            id: key.clone(),
            name: spec.name.clone(),
            spec_json,
            built_at,
            disk_bytes,
            kind: "build".into(),
        })?;
        let info = self.template_info(&spec.name)?;
        Ok((info, cached))
    }

    /// A named template as the API shows it.
    pub fn template_info(&self, name: &str) -> Result<TemplateInfo, DaemonError> {
        self.templates()?
            .into_iter()
            .find(|t| t.name == name || t.id == name)
            .ok_or_else(|| DaemonError::NotFound(format!("no template named {name}")))
    }

    /// Every named template, with how many warm VMs each has ready.
    pub fn templates(&self) -> Result<Vec<TemplateInfo>, DaemonError> {
        let mut list = self.db().templates()?;
        for t in &mut list {
            t.ready = self.warm_count(&t.id) as u32;
        }
        Ok(list)
    }

    /// Sets the warm pool of template `name`; warm VMs beyond a lowered `min_ready` are stopped.
    pub async fn set_pool(
        self: &Arc<Self>,
        name: &str,
        p: &PoolSettings,
    ) -> Result<TemplateInfo, DaemonError> {
        if p.min_ready > 64 {
            return Err(DaemonError::BadRequest(format!(
                "min_ready {} is more than 64",
                p.min_ready
            )));
        }
        if !self.db().set_pool(name, p.min_ready, p.max_sandboxes)? {
            return Err(DaemonError::NotFound(format!("no template named {name}")));
        }
        let info = self.template_info(name)?;
        let extra: Vec<super::Warm> = {
            let mut warm = self.warm();
            match warm.get_mut(&info.id) {
                Some(list) if list.len() > p.min_ready as usize => {
                    list.drain(p.min_ready as usize..).collect()
                }
                _ => Vec::new(),
            }
        };
        let d = self.clone();
        tokio::task::spawn_blocking(move || {
            for mut w in extra {
                w.vm.kill();
                let _ = std::fs::remove_dir_all(&w.vm.dir);
                let _ = d.db().remove_sandbox(&w.id);
            }
        })
        .await?;
        self.template_info(name)
    }

    /// Removes template `name`: refused while sandboxes use it; its warm VMs are stopped and its
    /// files removed once no name points at it.
    pub async fn remove_template(self: &Arc<Self>, name: &str) -> Result<(), DaemonError> {
        let info = self.template_info(name)?;
        if let Some(sb) = self
            .all_sandboxes()
            .into_iter()
            .find(|s| s.template_id == info.id)
        {
            return Err(DaemonError::Conflict(format!(
                "template {name} is used by sandbox {} (and maybe others); kill them first",
                sb.id
            )));
        }
        if let Some(snap) = self.snapshot_on_image(&info)? {
            return Err(DaemonError::Conflict(format!(
                "template {name}'s image is the disk of snapshot {snap} (and maybe others); \
                 remove them first"
            )));
        }
        let removed = self.db().remove_template_name(name)?;
        if let Some(id) = removed {
            let warm = self.warm().remove(&id).unwrap_or_default();
            let dir = self.cfg.templates_dir().join(&id);
            tokio::task::spawn_blocking(move || {
                for mut w in warm {
                    w.vm.kill();
                    let _ = std::fs::remove_dir_all(&w.vm.dir);
                }
                let _ = std::fs::remove_dir_all(dir);
            })
            .await?;
        }
        Ok(())
    }
}
