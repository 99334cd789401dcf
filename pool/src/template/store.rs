//! A template's inputs, its files in the store, and its content key.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::debian;
use super::spec::Spec;

/// Bump when the way a template is made changes in a way the key does not see (v3: the template
/// VM has a network interface on a sandbox network, so its snapshot has `eth0`).
const BUILD_VERSION: &str = "kiln-template-v3";

/// What every build uses from the host.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// How VMMs are started (`kiln-vmm`, under `kiln-jailer` unless unjailed).
    pub vmm: crate::jail::Launcher,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The static guest agent.
    pub agent: PathBuf,
    /// Folders with Debian images made ahead (`debian-<key>.ext4`).
    pub image_dirs: Vec<PathBuf>,
    /// Template VMs and sandboxes get a network interface on a sandbox network of their own;
    /// false (`kilnd --no-net`): none, for a kilnd without the privileges networks need.
    pub net: bool,
}

/// A template's files in the store.
#[derive(Debug, Clone)]
pub struct TemplateFiles {
    /// Its folder.
    pub dir: PathBuf,
    /// The root filesystem image (its sandboxes read it; it is never written after the build).
    pub rootfs: PathBuf,
    /// The snapshot's state file.
    pub state: PathBuf,
    /// The snapshot's memory file.
    pub memory: PathBuf,
    /// The root drive's copy-on-write overlay as it was at the snapshot (only with
    /// `disk = "cow"`; never written after the snapshot: each VM restored from it gets a copy).
    pub overlay: PathBuf,
    /// The guest pages a restore of the snapshot touched up to the end of its first command
    /// (kiln-vmm's working set, recorded by the build); every restore maps them in ahead. A
    /// snapshot without one (a paused sandbox's) is restored without.
    pub working_set: PathBuf,
}

/// The marker a template folder holds when its snapshot has a network interface.
pub const NIC_MARKER: &str = "nic";

impl TemplateFiles {
    /// Whether the template's snapshot has a network interface (its sandboxes must be restored
    /// with one, and only they can be given a network).
    pub fn has_nic(&self) -> bool {
        self.dir.join(NIC_MARKER).exists()
    }

    /// The files of the template stored in `dir`.
    pub fn in_dir(dir: &Path) -> TemplateFiles {
        TemplateFiles {
            dir: dir.into(),
            rootfs: dir.join("rootfs.ext4"),
            state: dir.join("vmstate"),
            memory: dir.join("memory"),
            overlay: dir.join(crate::disk::OVERLAY),
            working_set: dir.join("working-set.json"),
        }
    }
}

/// What a file is, for the key: its length, change time, inode and device, so a changed file
/// changes the key without reading it all. (A tree is fingerprinted the same way, entry by entry.)
fn fingerprint(path: &Path, out: &mut Sha256) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    out.update(format!(
        "{} {} {} {} {} {} {} {}\n",
        path.display(),
        meta.mode(),
        meta.uid(),
        meta.gid(),
        meta.len(),
        meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
        meta.ino(),
        meta.dev()
    ));
    if meta.is_dir() {
        let mut names: Vec<PathBuf> = std::fs::read_dir(path)?
            .flatten()
            .map(|e| e.path())
            .collect();
        names.sort();
        for p in names {
            fingerprint(&p, out)?;
        }
    } else if meta.file_type().is_symlink() {
        out.update(std::fs::read_link(path)?.as_os_str().as_encoded_bytes());
    }
    Ok(())
}

/// The SHA-256 of a file's bytes.
fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

/// The content key of `spec` built with `inputs`: 16 hex digits. An input that cannot be read is
/// an error naming it.
pub fn key(spec: &Spec, inputs: &Inputs) -> Result<String, String> {
    key_io(spec, inputs).map_err(|(path, e)| format!("{}: {e}", path.display()))
}

fn key_io(spec: &Spec, inputs: &Inputs) -> Result<String, (PathBuf, std::io::Error)> {
    let named = |p: &Path| {
        let p = p.to_path_buf();
        move |e| (p, e)
    };
    let mut h = Sha256::new();
    h.update(BUILD_VERSION);
    // A snapshot with a network interface restores only with one, and one without only without.
    h.update(if inputs.net { "nic\n" } else { "no nic\n" });
    h.update(serde_json::to_vec(spec).unwrap_or_default());
    for source in [&spec.from.dir, &spec.from.image, &spec.from.oci]
        .into_iter()
        .flatten()
    {
        fingerprint(source, &mut h).map_err(named(source))?;
    }
    if let Some(d) = &spec.from.debian
        && let Some(image) = debian::cached_image(d, &inputs.image_dirs)
    {
        fingerprint(&image, &mut h).map_err(named(&image))?;
    }
    h.update(file_sha256(&inputs.agent).map_err(named(&inputs.agent))?);
    fingerprint(&inputs.kernel, &mut h).map_err(named(&inputs.kernel))?;
    Ok(format!("{:x}", h.finalize())[..16].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_spec_and_the_inputs() {
        let dir = std::env::temp_dir().join(format!("kiln-tkey-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tree")).unwrap();
        for (name, text) in [("agent", "a1"), ("kernel", "k"), ("tree/f", "x")] {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let inputs = Inputs {
            vmm: crate::jail::Launcher {
                vmm: "/bin/true".into(),
                jail: None,
            },
            kernel: dir.join("kernel"),
            agent: dir.join("agent"),
            image_dirs: vec![],
            net: true,
        };
        let text = format!(
            "name = \"t\"\n[from]\ndir = \"{}\"\n",
            dir.join("tree").display()
        );
        let spec = Spec::parse(&text).unwrap();
        let k1 = key(&spec, &inputs).unwrap();
        assert_eq!(k1.len(), 16);
        assert_eq!(
            key(&spec, &inputs).unwrap(),
            k1,
            "the same inputs, the same key"
        );
        let other =
            Spec::parse(&text.replace("name = \"t\"", "name = \"t\"\nmem_mib = 512")).unwrap();
        assert_ne!(key(&other, &inputs).unwrap(), k1, "another spec");
        let policy = Spec::parse(&format!("{text}[network]\nallow_net = true\n")).unwrap();
        assert_ne!(key(&policy, &inputs).unwrap(), k1, "another sandbox policy");
        let build_policy =
            Spec::parse(&format!("{text}[build]\nallow_domains = [\"pypi.org\"]\n")).unwrap();
        assert_ne!(
            key(&build_policy, &inputs).unwrap(),
            k1,
            "another build policy"
        );
        let no_nic = Inputs {
            net: false,
            ..inputs.clone()
        };
        assert_ne!(key(&spec, &no_nic).unwrap(), k1, "no network interface");
        std::fs::write(dir.join("agent"), "a2").unwrap();
        let k2 = key(&spec, &inputs).unwrap();
        assert_ne!(k2, k1, "another agent");
        std::fs::write(dir.join("tree/g"), "new file").unwrap();
        assert_ne!(key(&spec, &inputs).unwrap(), k2, "a changed source tree");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
