//! What a drive's requests run against: a plain file, or a read-only base under a
//! copy-on-write overlay ([`super::cow`]).

use std::fs::File;
use std::io::{Seek, SeekFrom};

use vm_memory::{Bytes, GuestAddress};

use super::ID_BYTES;
use super::cow::CowOverlay;
use crate::virtio::GuestMemoryMmap;

/// Where a drive's bytes live.
#[derive(Debug)]
pub enum Backend {
    /// One file, read and written in place.
    File(File),
    /// A read-only base under a sparse overlay that takes every write.
    Cow(CowOverlay),
}

/// The disk a request runs against.
#[derive(Debug)]
pub struct Disk {
    /// The backing file or files.
    pub backend: Backend,
    /// Usable size in bytes (a whole number of sectors).
    pub size: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// GET_ID answer, NUL-padded.
    pub id: [u8; ID_BYTES],
}

impl Disk {
    /// Reads `data`'s buffers from the disk at `offset` (checked by the caller to be inside
    /// it); returns the bytes read.
    pub fn read_into(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        data: &[(GuestAddress, u32)],
    ) -> std::io::Result<u32> {
        let file = match &mut self.backend {
            Backend::Cow(cow) => return cow.read_into(mem, offset, data),
            Backend::File(file) => file,
        };
        file.seek(SeekFrom::Start(offset))?;
        let mut total = 0u32;
        for &(addr, len) in data {
            mem.read_exact_volatile_from(addr, file, len as usize)
                .map_err(std::io::Error::other)?;
            total = total.saturating_add(len);
        }
        Ok(total)
    }

    /// Writes `data`'s buffers to the disk at `offset` (checked by the caller).
    pub fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        data: &[(GuestAddress, u32)],
    ) -> std::io::Result<()> {
        let file = match &mut self.backend {
            Backend::Cow(cow) => return cow.write_from(mem, offset, data),
            Backend::File(file) => file,
        };
        file.seek(SeekFrom::Start(offset))?;
        for &(addr, len) in data {
            mem.write_all_volatile_to(addr, file, len as usize)
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// Makes earlier writes durable.
    pub fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.backend {
            Backend::File(file) => file.sync_data(),
            Backend::Cow(cow) => cow.flush(),
        }
    }
}
