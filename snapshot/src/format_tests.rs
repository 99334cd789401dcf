//! Tests of the state file format: round trips, and every kind of damage refused by its own error.

use std::collections::BTreeMap;
use std::fs;

use serde::{Deserialize, Serialize};

use super::*;
use crate::atomic::is_temporary_name;
use crate::test_util::TestDir;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Queue {
    size: u16,
    ready: bool,
    desc_table: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Backend {
    File { path: String, read_only: bool },
    Socket(u32),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DeviceState {
    id: String,
    queues: Vec<Queue>,
    config_space: Vec<u8>,
    backend: Option<Backend>,
    last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct VmState {
    vcpu_regs: Vec<[u64; 4]>,
    devices: Vec<DeviceState>,
    labels: BTreeMap<String, i64>,
    memory_size: u64,
}

fn sample() -> VmState {
    VmState {
        vcpu_regs: vec![[1, 2, 3, 4], [u64::MAX, 0, 0x1000, 7]],
        devices: vec![
            DeviceState {
                id: "rootfs".into(),
                queues: vec![Queue {
                    size: 256,
                    ready: true,
                    desc_table: 0x7fff_0000,
                }],
                config_space: (0..=255).collect(),
                backend: Some(Backend::File {
                    path: "/srv/rootfs.ext4".into(),
                    read_only: true,
                }),
                last_error: None,
            },
            DeviceState {
                id: "vsock ünïcode".into(),
                queues: vec![],
                config_space: vec![],
                backend: Some(Backend::Socket(3)),
                last_error: Some("EPIPE".into()),
            },
        ],
        labels: [("a".to_string(), -1), ("b".to_string(), 2)].into(),
        memory_size: 128 << 20,
    }
}

/// A small state, so that flipping every bit of its file is quick.
fn small_file() -> Vec<u8> {
    to_bytes(&("kiln".to_string(), Some(7u32), vec![1u8, 2, 3])).unwrap()
}

type Small = (String, Option<u32>, Vec<u8>);

/// Rewrites the stored checksum so that only the field under test is wrong.
fn fix_crc(bytes: &mut [u8]) {
    let n = bytes.len() - CRC_LEN;
    let crc = CRC64.checksum(&bytes[..n]);
    bytes[n..].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn round_trip_in_memory() {
    let state = sample();
    let bytes = to_bytes(&state).unwrap();
    assert_eq!(from_bytes::<VmState>(&bytes).unwrap(), state);
}

#[test]
fn round_trip_through_a_file() {
    let dir = TestDir::new("format-roundtrip");
    let path = dir.path().join("vm.state");
    save_state(&path, &sample()).unwrap();
    assert_eq!(load_state::<VmState>(&path).unwrap(), sample());

    // Saving again replaces the file whole and leaves no temporary behind.
    let mut changed = sample();
    changed.devices.pop();
    save_state(&path, &changed).unwrap();
    assert_eq!(load_state::<VmState>(&path).unwrap(), changed);
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("vm.state")]);
    assert!(!names.iter().any(|n| is_temporary_name(n)));
}

#[test]
fn saved_file_has_the_documented_layout() {
    // The CRC variant is CRC-64/XZ: its catalogue check value over "123456789".
    assert_eq!(CRC64.checksum(b"123456789"), 0x995d_c9bb_df19_39fa);

    let bytes = small_file();
    let payload_len = bytes.len() - HEADER_LEN - CRC_LEN;
    assert_eq!(&bytes[..8], b"KILNSNAP");
    assert_eq!(&bytes[8..12], &2u32.to_le_bytes());
    assert_eq!(&bytes[12..20], &(payload_len as u64).to_le_bytes());
    let n = bytes.len() - 8;
    assert_eq!(&bytes[n..], &CRC64.checksum(&bytes[..n]).to_le_bytes());
    // bincode 1.3, fixed-width little-endian: a u64 length, then the string's bytes.
    assert_eq!(&bytes[20..28], &4u64.to_le_bytes());
    assert_eq!(&bytes[28..32], b"kiln");
}

#[test]
fn truncation_is_refused_at_every_kind_of_length() {
    let bytes = to_bytes(&sample()).unwrap();
    let len = bytes.len();
    for cut in [0, 1, 7, 8, 11, 12, 19, 20, 27] {
        let err = from_bytes::<VmState>(&bytes[..cut]).unwrap_err();
        if cut == 0 {
            assert!(matches!(err, SnapshotError::Empty(_)), "{cut}: {err}");
        } else {
            assert!(
                matches!(err, SnapshotError::TooShort { .. }),
                "{cut}: {err}"
            );
        }
    }
    // Inside the payload and inside the checksum.
    for cut in [28, 29, len / 2, len - 9, len - 8, len - 5, len - 1] {
        let err = from_bytes::<VmState>(&bytes[..cut]).unwrap_err();
        match err {
            SnapshotError::Truncated { size, expected, .. } => {
                assert_eq!((size, expected), (cut as u64, len as u64));
            }
            other => panic!("cut at {cut}: {other}"),
        }
    }
}

#[test]
fn truncated_file_on_disk_is_refused_and_named() {
    let dir = TestDir::new("format-truncated");
    let path = dir.path().join("vm.state");
    save_state(&path, &sample()).unwrap();
    let len = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let err = load_state::<VmState>(&path).unwrap_err();
    assert!(matches!(err, SnapshotError::Truncated { .. }), "{err}");
    assert!(err.to_string().contains(&path.display().to_string()));
}

#[test]
fn every_flipped_bit_is_refused() {
    let good = small_file();
    for pos in 0..good.len() {
        for bit in 0..8 {
            let mut bytes = good.clone();
            bytes[pos] ^= 1 << bit;
            let err = from_bytes::<Small>(&bytes).unwrap_err();
            let expected = match pos {
                0..8 => matches!(err, SnapshotError::BadMagic(_)),
                8..12 => matches!(err, SnapshotError::UnsupportedVersion { .. }),
                12..20 => matches!(
                    err,
                    SnapshotError::Truncated { .. } | SnapshotError::LengthMismatch { .. }
                ),
                // The payload and the checksum itself.
                _ => matches!(err, SnapshotError::BadChecksum { .. }),
            };
            assert!(expected, "byte {pos} bit {bit}: {err}");
        }
    }
}

#[test]
fn wrong_magic_is_not_a_state_file() {
    let dir = TestDir::new("format-magic");
    let path = dir.path().join("vmlinux");
    let mut elf = b"\x7fELF\x02\x01\x01\0".to_vec();
    elf.resize(4096, 0);
    fs::write(&path, &elf).unwrap();
    let err = load_state::<VmState>(&path).unwrap_err();
    assert!(matches!(err, SnapshotError::BadMagic(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("not a Kiln snapshot state file"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn future_and_zero_versions_are_refused() {
    for version in [0u32, 1, FORMAT_VERSION + 1, u32::MAX] {
        let mut bytes = small_file();
        bytes[8..12].copy_from_slice(&version.to_le_bytes());
        fix_crc(&mut bytes);
        let err = from_bytes::<Small>(&bytes).unwrap_err();
        assert!(
            matches!(err, SnapshotError::UnsupportedVersion { version: v, .. } if v == version),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "format version {version}; this Kiln reads version {FORMAT_VERSION}"
            )),
            "{msg}"
        );
    }
}

#[test]
fn trailing_bytes_disagree_with_the_length() {
    let mut bytes = small_file();
    bytes.extend_from_slice(&[0; 8]);
    let err = from_bytes::<Small>(&bytes).unwrap_err();
    assert!(matches!(err, SnapshotError::LengthMismatch { .. }), "{err}");
}

#[test]
fn an_overflowing_length_is_refused() {
    let mut bytes = small_file();
    bytes[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    fix_crc(&mut bytes);
    let err = from_bytes::<Small>(&bytes).unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::Truncated {
                expected: u64::MAX,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn checksum_is_checked_before_deserializing() {
    // A well-formed file holding a u8 is not a string: the deserializer says so...
    let bytes = to_bytes(&7u8).unwrap();
    let err = from_bytes::<String>(&bytes).unwrap_err();
    assert!(matches!(err, SnapshotError::Deserialize { .. }), "{err}");
    // ...but if the payload is also damaged, the checksum refuses it first.
    let mut damaged = bytes.clone();
    damaged[HEADER_LEN] ^= 0x80;
    let err = from_bytes::<String>(&damaged).unwrap_err();
    assert!(matches!(err, SnapshotError::BadChecksum { .. }), "{err}");
}

#[test]
fn payload_with_trailing_bytes_does_not_deserialize() {
    let bytes = to_bytes(&(1u32, 2u32)).unwrap();
    let err = from_bytes::<u32>(&bytes).unwrap_err();
    assert!(matches!(err, SnapshotError::Deserialize { .. }), "{err}");
}

#[test]
fn zero_length_file_is_empty() {
    let dir = TestDir::new("format-empty");
    let path = dir.path().join("vm.state");
    fs::write(&path, b"").unwrap();
    let err = load_state::<VmState>(&path).unwrap_err();
    assert!(matches!(err, SnapshotError::Empty(_)), "{err}");
    assert!(err.to_string().contains(&path.display().to_string()));
}

#[test]
fn oversize_file_is_refused_before_reading() {
    let dir = TestDir::new("format-oversize");
    let path = dir.path().join("vm.state");
    // Sparse: a header that would otherwise be valid, then a hole up to one byte past the limit.
    let file = fs::File::create(&path).unwrap();
    (&file).write_all(&small_file()[..HEADER_LEN]).unwrap();
    file.set_len(MAX_STATE_FILE_SIZE + 1).unwrap();
    let err = load_state::<VmState>(&path).unwrap_err();
    match &err {
        SnapshotError::TooLarge { size, limit, .. } => {
            assert_eq!(
                (*size, *limit),
                (MAX_STATE_FILE_SIZE + 1, MAX_STATE_FILE_SIZE)
            );
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains(&path.display().to_string()));
}

#[test]
fn missing_file_and_directory_are_refused_by_name() {
    let dir = TestDir::new("format-missing");
    let missing = dir.path().join("nope.state");
    let err = load_state::<VmState>(&missing).unwrap_err();
    assert!(matches!(err, SnapshotError::Read { .. }), "{err}");
    assert!(err.to_string().contains(&missing.display().to_string()));

    let err = load_state::<VmState>(dir.path()).unwrap_err();
    assert!(matches!(err, SnapshotError::NotAFile(_)), "{err}");
}

#[test]
fn failed_save_leaves_the_old_file() {
    let dir = TestDir::new("format-failed-save");
    let path = dir.path().join("vm.state");
    save_state(&path, &sample()).unwrap();

    /// A state whose serialization fails half-way.
    struct Unserializable;
    impl Serialize for Unserializable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("device busy"))
        }
    }
    let err = save_state(&path, &Unserializable).unwrap_err();
    assert!(matches!(err, SnapshotError::Serialize { .. }), "{err}");
    assert_eq!(load_state::<VmState>(&path).unwrap(), sample());
}
