//! The state file: a VM's and its devices' state (not its memory) in one checksummed file.
//!
//! Layout, all integers little-endian:
//!
//! | offset     | size | field                                                    |
//! |------------|------|----------------------------------------------------------|
//! | 0          | 8    | [`MAGIC`], `b"KILNSNAP"`                                 |
//! | 8          | 4    | format version, u32 ([`FORMAT_VERSION`])                 |
//! | 12         | 8    | payload length `n`, u64                                  |
//! | 20         | n    | payload: the state, serialized with bincode 1.3          |
//! | 20 + n     | 8    | CRC-64/XZ of bytes `0 .. 20 + n`, u64                    |
//!
//! The payload uses bincode's fixed-width little-endian integers and rejects trailing bytes. The
//! checksum is CRC-64/XZ (the ECMA-182 polynomial, reflected, init and xorout all ones: the CRC of
//! xz and of Go's `crc64.ECMA` table), [`crc::CRC_64_XZ`] in the `crc` crate.
//!
//! Loading trusts nothing: it checks the file's size before reading it, then the magic, the
//! version, the length and the checksum, and only then hands the payload to the deserializer.
//! Each refusal is its own [`SnapshotError`] variant and names the file. Saving goes through
//! [`AtomicFile`], so an interrupted save leaves the previous file whole.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bincode::Options;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::atomic::{AtomicFile, AtomicFileError};

/// The first 8 bytes of every state file.
pub const MAGIC: [u8; 8] = *b"KILNSNAP";

/// The only format version this Kiln writes and reads. Version 2 added a drive's
/// copy-on-write overlay to its saved state.
pub const FORMAT_VERSION: u32 = 2;

/// The largest state file Kiln reads or writes: device and VM state is KiB to a few MiB, so
/// anything bigger is not a state file, and is refused before it is read into memory.
pub const MAX_STATE_FILE_SIZE: u64 = 64 << 20;

/// Magic, version and payload length.
const HEADER_LEN: usize = 8 + 4 + 8;
/// The trailing checksum.
const CRC_LEN: usize = 8;

/// The checksum over the header and payload.
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// The name errors use for [`to_bytes`] and [`from_bytes`], which have no file.
const IN_MEMORY: &str = "<in memory>";

/// Why a state file could not be saved or loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be opened or read.
    #[error("cannot read snapshot state file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The path is a directory, a FIFO or a device, not a regular file.
    #[error("snapshot state file {0} is not a regular file")]
    NotAFile(PathBuf),
    /// The file (or the state to be saved) is bigger than [`MAX_STATE_FILE_SIZE`].
    #[error("snapshot state file {path} is {size} bytes, more than the {limit}-byte limit")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size, or the size it would have.
        size: u64,
        /// [`MAX_STATE_FILE_SIZE`].
        limit: u64,
    },
    /// The file has no bytes at all.
    #[error("snapshot state file {0} is empty")]
    Empty(PathBuf),
    /// The file is too short to hold even a header and a checksum.
    #[error(
        "snapshot state file {path} is {size} bytes, shorter than the {min}-byte header and checksum"
    )]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The header and checksum's size.
        min: u64,
    },
    /// The file does not start with [`MAGIC`].
    #[error("{0} is not a Kiln snapshot state file (bad magic)")]
    BadMagic(PathBuf),
    /// The file has a format version this Kiln does not read (zero, or from a future Kiln).
    #[error(
        "snapshot state file {path} has format version {version}; this Kiln reads version {FORMAT_VERSION}"
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version in its header.
        version: u32,
    },
    /// The file ends before the end its header's payload length declares.
    #[error("snapshot state file {path} is truncated: {size} bytes, its header says {expected}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The size its header declares (`u64::MAX` if that overflows).
        expected: u64,
    },
    /// The file goes on past the end its header's payload length declares.
    #[error(
        "snapshot state file {path} is {size} bytes but its header's payload length makes {expected}"
    )]
    LengthMismatch {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The size its header declares.
        expected: u64,
    },
    /// The checksum does not match the header and payload: the file is corrupt.
    #[error(
        "snapshot state file {path} is corrupt: CRC-64 {computed:#018x}, stored {stored:#018x}"
    )]
    BadChecksum {
        /// The file.
        path: PathBuf,
        /// The checksum stored at the end of the file.
        stored: u64,
        /// The checksum of the header and payload as read.
        computed: u64,
    },
    /// The payload is intact but is not the state this Kiln expects.
    #[error("snapshot state file {path} does not hold the expected state: {source}")]
    Deserialize {
        /// The file.
        path: PathBuf,
        /// What bincode found.
        source: bincode::Error,
    },
    /// The state could not be serialized.
    #[error("cannot serialize the state for {path}: {source}")]
    Serialize {
        /// The file.
        path: PathBuf,
        /// What bincode found.
        source: bincode::Error,
    },
    /// Writing the temporary file failed; the old file is untouched.
    #[error("cannot write snapshot state file {path}: {source}")]
    Write {
        /// The temporary file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The atomic file around the write failed.
    #[error(transparent)]
    Atomic(#[from] AtomicFileError),
}

/// bincode's settings for the payload: fixed-width little-endian integers, no trailing bytes.
fn bincode_options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
}

/// Serializes `state` into a whole state file's bytes.
pub fn to_bytes<T: Serialize>(state: &T) -> Result<Vec<u8>, SnapshotError> {
    encode(state, Path::new(IN_MEMORY))
}

/// A whole state file around the raw `payload` bytes, with a right header and CRC: what a crafted
/// file looks like to the loader. For tests and fuzzing of deserialization and validation.
pub fn frame_payload(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len() + CRC_LEN);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(payload);
    let crc = CRC64.checksum(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// Checks a whole state file's bytes and deserializes its payload.
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SnapshotError> {
    decode(bytes, Path::new(IN_MEMORY))
}

/// Saves `state` to `path` atomically: `path` holds either its old content or the whole new file.
pub fn save_state<T: Serialize>(path: impl AsRef<Path>, state: &T) -> Result<(), SnapshotError> {
    let path = path.as_ref();
    let bytes = encode(state, path)?;
    let atomic = AtomicFile::create(path)?;
    atomic
        .file()
        .write_all(&bytes)
        .map_err(|source| SnapshotError::Write {
            path: atomic.tmp_path().to_path_buf(),
            source,
        })?;
    atomic.commit()?;
    Ok(())
}

/// Loads the state saved at `path` by [`save_state`], refusing a file that is too large,
/// truncated, not a state file, of another version, or corrupt.
pub fn load_state<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<T, SnapshotError> {
    let path = path.as_ref();
    let read_err = |source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(SnapshotError::NotAFile(path.to_path_buf()));
    }
    check_size(meta.len(), path)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow after the size check; read no more than one byte past the limit.
    file.take(MAX_STATE_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    decode(&bytes, path)
}

/// Refuses a file bigger than [`MAX_STATE_FILE_SIZE`].
fn check_size(size: u64, path: &Path) -> Result<(), SnapshotError> {
    if size > MAX_STATE_FILE_SIZE {
        return Err(SnapshotError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit: MAX_STATE_FILE_SIZE,
        });
    }
    Ok(())
}

/// Builds the file's bytes; `path` is only for messages.
fn encode<T: Serialize>(state: &T, path: &Path) -> Result<Vec<u8>, SnapshotError> {
    let payload =
        bincode_options()
            .serialize(state)
            .map_err(|source| SnapshotError::Serialize {
                path: path.to_path_buf(),
                source,
            })?;
    let size = (HEADER_LEN + payload.len() + CRC_LEN) as u64;
    check_size(size, path)?;
    let mut bytes = Vec::with_capacity(size as usize);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&payload);
    let crc = CRC64.checksum(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Ok(bytes)
}

/// Checks the file's bytes field by field, then deserializes; `path` is only for messages.
fn decode<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T, SnapshotError> {
    let size = bytes.len() as u64;
    let path_buf = || path.to_path_buf();
    check_size(size, path)?;
    if bytes.is_empty() {
        return Err(SnapshotError::Empty(path_buf()));
    }
    if bytes.len() < HEADER_LEN + CRC_LEN {
        return Err(SnapshotError::TooShort {
            path: path_buf(),
            size,
            min: (HEADER_LEN + CRC_LEN) as u64,
        });
    }
    let (header, rest) = bytes.split_at(HEADER_LEN);
    if header[..8] != MAGIC {
        return Err(SnapshotError::BadMagic(path_buf()));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4-byte slice"));
    if version != FORMAT_VERSION {
        return Err(SnapshotError::UnsupportedVersion {
            path: path_buf(),
            version,
        });
    }
    let payload_len = u64::from_le_bytes(header[12..20].try_into().expect("8-byte slice"));
    let expected = payload_len.saturating_add((HEADER_LEN + CRC_LEN) as u64);
    if size < expected {
        return Err(SnapshotError::Truncated {
            path: path_buf(),
            size,
            expected,
        });
    }
    if size > expected {
        return Err(SnapshotError::LengthMismatch {
            path: path_buf(),
            size,
            expected,
        });
    }
    let (payload, crc_bytes) = rest.split_at(rest.len() - CRC_LEN);
    let stored = u64::from_le_bytes(crc_bytes.try_into().expect("8-byte slice"));
    let computed = CRC64.checksum(&bytes[..bytes.len() - CRC_LEN]);
    if stored != computed {
        return Err(SnapshotError::BadChecksum {
            path: path_buf(),
            stored,
            computed,
        });
    }
    bincode_options()
        .with_limit(payload_len)
        .deserialize(payload)
        .map_err(|source| SnapshotError::Deserialize {
            path: path_buf(),
            source,
        })
}

#[cfg(test)]
#[path = "format_tests.rs"]
mod tests;
