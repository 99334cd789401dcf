//! Images made here with the `tar` crate: two layers with a whiteout, an opaque folder and a
//! setuid file, in an OCI layout and in a classic `docker save` tarball; and hostile layers.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use sha2::{Digest, Sha256};

use super::*;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-oci-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An entry: path, contents (None for a folder), mode, uid, gid.
type Item<'a> = (&'a str, Option<&'a [u8]>, u32, u64, u64);

fn layer_tar(items: &[Item]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode, uid, gid) in items {
        let mut h = tar::Header::new_gnu();
        h.set_mode(*mode);
        h.set_uid(*uid);
        h.set_gid(*gid);
        h.set_mtime(1_700_000_000);
        match data {
            Some(bytes) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(bytes.len() as u64);
                // Raw name bytes, so hostile paths can be written too.
                h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
                h.set_cksum();
                b.append(&h, *bytes).unwrap();
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Writes `data` as a blob of `layout`; returns its descriptor.
fn put_blob(layout: &Path, media: &str, data: &[u8]) -> Value {
    let hex = format!("{:x}", Sha256::digest(data));
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&hex), data).unwrap();
    serde_json::json!({"mediaType": media, "digest": format!("sha256:{hex}"), "size": data.len()})
}

fn lower() -> Vec<u8> {
    layer_tar(&[
        ("etc/", None, 0o755, 0, 0),
        ("etc/keep", Some(b"kept\n"), 0o644, 0, 0),
        ("etc/gone", Some(b"x"), 0o644, 0, 0),
        ("opaque/", None, 0o755, 0, 0),
        ("opaque/old", Some(b"old"), 0o644, 0, 0),
        ("home/", None, 0o755, 0, 0),
        ("home/user/", None, 0o700, 1000, 1000),
    ])
}

fn upper() -> Vec<u8> {
    layer_tar(&[
        ("etc/.wh.gone", Some(b""), 0o644, 0, 0),
        ("opaque/.wh..wh..opq", Some(b""), 0o644, 0, 0),
        ("opaque/new", Some(b"new"), 0o644, 0, 0),
        ("usr/", None, 0o755, 0, 0),
        ("usr/bin/", None, 0o755, 0, 0),
        ("usr/bin/su", Some(b"#!/bin/sh\n"), 0o4755, 0, 0),
        ("home/user/notes", Some(b"mine"), 0o600, 1000, 1000),
    ])
}

fn oci_layout(dir: &Path, layers: &[Vec<u8>]) {
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let descs: Vec<Value> = layers
        .iter()
        .map(|l| put_blob(dir, "application/vnd.oci.image.layer.v1.tar+gzip", &gzip(l)))
        .collect();
    let config = put_blob(dir, "application/vnd.oci.image.config.v1+json", b"{}");
    let manifest = serde_json::json!({"schemaVersion": 2, "config": config, "layers": descs});
    let m = put_blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    );
    let mut m = m;
    m["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [m]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
}

fn check_tree(root: &Path) {
    assert_eq!(
        std::fs::read_to_string(root.join("etc/keep")).unwrap(),
        "kept\n"
    );
    assert!(!root.join("etc/gone").exists(), "the whiteout removed it");
    assert!(
        !root.join("opaque/old").exists(),
        "the opaque folder was emptied"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("opaque/new")).unwrap(),
        "new"
    );
    let su = std::fs::metadata(root.join("usr/bin/su")).unwrap();
    assert_eq!(su.permissions().mode() & 0o7777, 0o4755, "setuid kept");
    let notes = std::fs::metadata(root.join("home/user/notes")).unwrap();
    assert_eq!(notes.permissions().mode() & 0o777, 0o600);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!((notes.uid(), notes.gid()), (1000, 1000), "owners kept");
        let home = std::fs::metadata(root.join("home/user")).unwrap();
        assert_eq!((home.uid(), home.mode() & 0o777), (1000, 0o700));
    }
}

#[test]
fn an_oci_layout_unpacks_in_layer_order() {
    let d = scratch("layout");
    let (layout, root) = (d.join("layout"), d.join("root"));
    std::fs::create_dir_all(&layout).unwrap();
    std::fs::create_dir_all(&root).unwrap();
    oci_layout(&layout, &[lower(), upper()]);
    unpack(&layout, &root).unwrap();
    check_tree(&root);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_docker_save_tarball_unpacks_too() {
    let d = scratch("docker");
    let root = d.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    };
    add("aaa/layer.tar", &lower());
    add("bbb/layer.tar", &upper());
    add(
        "manifest.json",
        br#"[{"Config":"c.json","RepoTags":["t:1"],"Layers":["aaa/layer.tar","bbb/layer.tar"]}]"#,
    );
    add("c.json", b"{}");
    let tarball = d.join("image.tar");
    std::fs::write(&tarball, b.into_inner().unwrap()).unwrap();
    unpack(&tarball, &root).unwrap();
    check_tree(&root);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn entries_that_leave_the_root_are_refused_by_name() {
    for (name, evil) in [
        ("dotdot", layer_tar(&[("../evil", Some(b"x"), 0o644, 0, 0)])),
        (
            "absolute",
            layer_tar(&[("/etc/evil", Some(b"x"), 0o644, 0, 0)]),
        ),
    ] {
        let d = scratch(name);
        let (layout, root) = (d.join("layout"), d.join("root"));
        std::fs::create_dir_all(&layout).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        oci_layout(&layout, &[evil]);
        let e = unpack(&layout, &root).unwrap_err().to_string();
        assert!(
            e.contains("escapes the image's root") && e.contains("evil"),
            "{e}"
        );
        assert!(!d.join("evil").exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn a_symlink_cannot_carry_a_later_file_outside() {
    let d = scratch("symlink");
    let (layout, root) = (d.join("layout"), d.join("root"));
    std::fs::create_dir_all(&layout).unwrap();
    std::fs::create_dir_all(&root).unwrap();
    let outside = d.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    b.append_link(&mut h, "link", &outside).unwrap();
    let first = b.into_inner().unwrap();
    let second = layer_tar(&[("link/planted", Some(b"x"), 0o644, 0, 0)]);
    oci_layout(&layout, &[first, second]);
    let e = unpack(&layout, &root).unwrap_err().to_string();
    assert!(e.contains("planted"), "{e}");
    assert!(
        !outside.join("planted").exists(),
        "nothing was written outside"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn broken_layouts_name_the_file() {
    let d = scratch("broken");
    let root = d.join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(d.join("index.json"), "{}").unwrap();
    let e = unpack(&d, &root).unwrap_err().to_string();
    assert!(e.contains("index.json") && e.contains("manifests"), "{e}");
    std::fs::write(
        d.join("index.json"),
        r#"{"manifests":[{"digest":"sha256:nope"}]}"#,
    )
    .unwrap();
    let e = unpack(&d, &root).unwrap_err().to_string();
    assert!(e.contains("blobs/sha256/nope"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}
