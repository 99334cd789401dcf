//! Unpacking an OCI image into a directory tree: an OCI image layout folder (`oci-layout`,
//! `index.json`, `blobs/`) or a `docker save` tarball (either its classic `manifest.json` form or
//! the OCI layout that newer Docker writes inside it). Layers are applied in order with owners,
//! modes and special bits kept; whiteouts (`.wh.NAME`) remove what lower layers put there and
//! opaque markers (`.wh..wh..opq`) empty their folder first. An entry whose path or link would
//! leave the root is refused, naming the layer and the entry.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

/// Why an image could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// A file could not be read or written.
    #[error("{path}: {err}")]
    Io {
        /// Which.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The image's JSON is not what the OCI or Docker formats say.
    #[error("{path}: {message}")]
    Format {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A layer entry would be written outside the root.
    #[error("layer {layer}: entry {entry:?} escapes the image's root")]
    Escape {
        /// The layer.
        layer: String,
        /// The entry's path (or its link's target).
        entry: String,
    },
    /// A layer's compression is not one Kiln reads.
    #[error(
        "layer {layer}: media type {media_type} is not supported (gzip or plain tar layers only)"
    )]
    Compression {
        /// The layer.
        layer: String,
        /// Its media type.
        media_type: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OciError + '_ {
    move |err| OciError::Io {
        path: path.into(),
        err,
    }
}

fn format(path: &Path, message: impl Into<String>) -> OciError {
    OciError::Format {
        path: path.into(),
        message: message.into(),
    }
}

fn read_json(path: &Path) -> Result<Value, OciError> {
    let text = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&text).map_err(|e| format(path, format!("not JSON: {e}")))
}

/// A layer to apply: its file and whether it is gzip-compressed.
struct Layer {
    path: PathBuf,
    gzip: bool,
}

/// The blob file for an OCI descriptor's digest.
fn blob(layout: &Path, desc: &Value, what: &Path) -> Result<PathBuf, OciError> {
    let digest = desc["digest"]
        .as_str()
        .ok_or_else(|| format(what, "a descriptor has no digest"))?;
    let (algo, hex) = digest
        .split_once(':')
        .ok_or_else(|| format(what, format!("digest {digest:?} is not ALGO:HEX")))?;
    if algo.is_empty()
        || hex.is_empty()
        || !hex.bytes().all(|b| b.is_ascii_alphanumeric())
        || !algo.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(format(what, format!("digest {digest:?} is not ALGO:HEX")));
    }
    Ok(layout.join("blobs").join(algo).join(hex))
}

/// The layers of the linux/amd64 (or only) image of an OCI layout, lowest first.
fn oci_layers(layout: &Path) -> Result<Vec<Layer>, OciError> {
    let index_path = layout.join("index.json");
    let mut index = read_json(&index_path)?;
    let mut from = index_path.clone();
    // An index may point at another index (a multi-platform image): follow it down.
    for _ in 0..4 {
        let manifests = index["manifests"]
            .as_array()
            .ok_or_else(|| format(&from, "no \"manifests\" list"))?;
        let pick = manifests
            .iter()
            .find(|m| m["platform"]["architecture"] == "amd64" && m["platform"]["os"] == "linux")
            .or_else(|| manifests.first())
            .ok_or_else(|| format(&from, "the manifests list is empty"))?;
        let path = blob(layout, pick, &from)?;
        let doc = read_json(&path)?;
        if doc["layers"].is_array() {
            return doc["layers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| {
                    let media = l["mediaType"].as_str().unwrap_or("");
                    let path = blob(layout, l, &path)?;
                    let gzip = media.ends_with("gzip") || media.ends_with(".tar.gzip");
                    if !(gzip
                        || media.ends_with(".tar")
                        || media.ends_with("tar")
                        || media.is_empty())
                    {
                        return Err(OciError::Compression {
                            layer: path.display().to_string(),
                            media_type: media.into(),
                        });
                    }
                    Ok(Layer { path, gzip })
                })
                .collect();
        }
        index = doc;
        from = path;
    }
    Err(format(&index_path, "indexes nest deeper than 4"))
}

/// The layers a classic `docker save` `manifest.json` lists.
fn docker_layers(root: &Path) -> Result<Vec<Layer>, OciError> {
    let path = root.join("manifest.json");
    let doc = read_json(&path)?;
    let layers = doc[0]["Layers"]
        .as_array()
        .ok_or_else(|| format(&path, "no Layers list in the first image"))?;
    layers
        .iter()
        .map(|l| {
            let rel = l
                .as_str()
                .ok_or_else(|| format(&path, "a layer is not a path"))?;
            if !is_inside(Path::new(rel)) {
                return Err(format(
                    &path,
                    format!("layer path {rel:?} leaves the archive"),
                ));
            }
            // Docker writes plain tars; a gzip one is told by its magic bytes.
            let file = root.join(rel);
            let mut magic = [0u8; 2];
            let gzip = File::open(&file)
                .and_then(|mut f| f.read_exact(&mut magic))
                .is_ok()
                && magic == [0x1f, 0x8b];
            Ok(Layer { path: file, gzip })
        })
        .collect()
}

/// True when `p` is relative and never climbs above where it starts.
fn is_inside(p: &Path) -> bool {
    let mut depth = 0i32;
    for c in p.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Applies one layer onto `root`.
fn apply(layer: &Layer, root: &Path) -> Result<(), OciError> {
    let name = layer.path.display().to_string();
    let file = File::open(&layer.path).map_err(io(&layer.path))?;
    let reader: Box<dyn Read> = if layer.gzip {
        Box::new(flate2::read::GzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let entries = archive.entries().map_err(io(&layer.path))?;
    for entry in entries {
        let mut entry = entry.map_err(io(&layer.path))?;
        let path = entry.path().map_err(io(&layer.path))?.into_owned();
        let escape = || OciError::Escape {
            layer: name.clone(),
            entry: path.display().to_string(),
        };
        if !is_inside(&path) {
            return Err(escape());
        }
        if let Ok(Some(target)) = entry.link_name()
            && entry.header().entry_type().is_hard_link()
            && !is_inside(&target)
        {
            return Err(OciError::Escape {
                layer: name.clone(),
                entry: target.display().to_string(),
            });
        }
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(hidden) = file_name.strip_prefix(".wh.") {
            let dir = root.join(path.parent().unwrap_or(Path::new("")));
            if hidden == ".wh..opq" {
                // Opaque: what lower layers put in this folder is gone.
                if let Ok(rd) = std::fs::read_dir(&dir) {
                    for e in rd.flatten() {
                        remove(&e.path());
                    }
                }
            } else {
                remove(&dir.join(hidden));
            }
            continue;
        }
        // A file where a folder was (or the other way round) replaces it.
        let dest = root.join(&path);
        if let Ok(meta) = std::fs::symlink_metadata(&dest)
            && (meta.is_dir() != entry.header().entry_type().is_dir())
        {
            remove(&dest);
        }
        match entry.unpack_in(root) {
            Ok(true) => {}
            // tar refuses an entry that would land outside the root (through a symlink, say).
            Ok(false) => return Err(escape()),
            Err(e) => {
                // tar's error says which entry; its cause says why.
                let why = std::error::Error::source(&e)
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default();
                return Err(OciError::Io {
                    path: dest,
                    err: std::io::Error::new(e.kind(), format!("{e}{why}")),
                });
            }
        }
    }
    Ok(())
}

fn remove(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// Unpacks the OCI image `source` (layout folder or `docker save` tarball) into `root`.
pub fn unpack(source: &Path, root: &Path) -> Result<(), OciError> {
    let meta = std::fs::metadata(source).map_err(io(source))?;
    if meta.is_dir() {
        for layer in oci_layers(source)? {
            apply(&layer, root)?;
        }
        return Ok(());
    }
    // A tarball: unpack it beside the root (it is only read from), then read it as a folder.
    let scratch = root.with_extension("archive");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(io(&scratch))?;
    let result = (|| {
        let file = File::open(source).map_err(io(source))?;
        let mut archive = tar::Archive::new(BufReader::new(file));
        for entry in archive.entries().map_err(io(source))? {
            let mut entry = entry.map_err(io(source))?;
            let path = entry.path().map_err(io(source))?.into_owned();
            if !is_inside(&path) {
                return Err(OciError::Escape {
                    layer: source.display().to_string(),
                    entry: path.display().to_string(),
                });
            }
            entry.unpack_in(&scratch).map_err(io(source))?;
        }
        let layers = if scratch.join("index.json").exists() {
            oci_layers(&scratch)?
        } else {
            docker_layers(&scratch)?
        };
        for layer in layers {
            apply(&layer, root)?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

#[cfg(test)]
#[path = "oci_tests.rs"]
mod tests;
