//! Parsing a virtio-blk request from a descriptor chain, and running it against the disk file.
//!
//! Layout (as Linux's driver sends it): a device-readable 16-byte header (type, reserved, sector),
//! zero or more data descriptors (device-writable for reads and GET_ID, device-readable for writes),
//! and a device-writable status byte last.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress};

use std::os::fd::AsRawFd;

use super::disk::{Backend, Disk};
use super::io_uring::AsyncIo;
use super::{ID_BYTES, MAX_REQUEST_BYTES, SECTOR_SIZE, request_type, status};
use crate::virtio::GuestMemoryMmap;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into guest memory.
    In,
    /// Write sectors from guest memory.
    Out,
    /// Make earlier writes durable.
    Flush,
    /// Return the drive id.
    GetId,
    /// Anything else (answered UNSUPP).
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            request_type::IN => RequestType::In,
            request_type::OUT => RequestType::Out,
            request_type::FLUSH => RequestType::Flush,
            request_type::GET_ID => RequestType::GetId,
            other => RequestType::Unsupported(other),
        }
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub kind: RequestType,
    /// First sector.
    pub sector: u64,
    /// Data buffers in guest memory, in order.
    pub data: Vec<(GuestAddress, u32)>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain is not a request. When the status byte's place is known, the guest gets IOERR.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain is empty or has no status descriptor.
    #[error("the chain has no status descriptor")]
    NoStatus,
    /// The header descriptor is device-writable or shorter than 16 bytes.
    #[error("the header descriptor is not a readable 16-byte buffer")]
    BadHeader,
    /// The header could not be read from guest memory.
    #[error("the header at {0:#x} is outside guest memory")]
    HeaderMemory(u64),
    /// The last descriptor is not a writable buffer.
    #[error("the status descriptor is not device-writable")]
    BadStatus,
    /// A data descriptor has the wrong direction for the request.
    #[error("a data descriptor of a {0:?} request has the wrong direction")]
    DataDirection(RequestType),
}

/// Parses the request in a chain's descriptors (as [`crate::virtio::chain::walk`] returns
/// them); on error also returns where to put the status, if known.
pub fn parse(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
) -> Result<Request, (RequestError, Option<GuestAddress>)> {
    let (Some(head), Some(last)) = (descs.first(), descs.last()) else {
        return Err((RequestError::NoStatus, None));
    };
    let status_addr = (last.is_write_only() && last.len() >= 1).then(|| last.addr());
    if descs.len() < 2 {
        return Err((RequestError::NoStatus, status_addr));
    }
    let Some(status) = status_addr else {
        return Err((RequestError::BadStatus, None));
    };
    if head.is_write_only() || head.len() < 16 {
        return Err((RequestError::BadHeader, Some(status)));
    }
    let header_err = || (RequestError::HeaderMemory(head.addr().0), Some(status));
    let kind = RequestType::from(mem.read_obj::<u32>(head.addr()).map_err(|_| header_err())?);
    let sector_addr = head.addr().checked_add(8).ok_or_else(header_err)?;
    let sector = mem.read_obj::<u64>(sector_addr).map_err(|_| header_err())?;

    let data_descs = &descs[1..descs.len() - 1];
    let device_writes = matches!(kind, RequestType::In | RequestType::GetId);
    if matches!(
        kind,
        RequestType::In | RequestType::Out | RequestType::GetId
    ) && data_descs
        .iter()
        .any(|d| d.is_write_only() != device_writes)
    {
        return Err((RequestError::DataDirection(kind), Some(status)));
    }
    let data = data_descs.iter().map(|d| (d.addr(), d.len())).collect();
    Ok(Request {
        kind,
        sector,
        data,
        status,
    })
}

impl Request {
    /// Bytes of data the request moves (`None` past `u64`).
    pub fn data_len(&self) -> Option<u64> {
        self.data
            .iter()
            .try_fold(0u64, |acc, (_, len)| acc.checked_add(u64::from(*len)))
    }

    /// Byte range on the disk for a read or write, if it is whole sectors inside the disk.
    fn disk_range(&self, disk: &Disk) -> Option<u64> {
        let len = self.data_len()?;
        let offset = self.sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        (len % SECTOR_SIZE == 0 && len <= MAX_REQUEST_BYTES && end <= disk.size).then_some(offset)
    }

    /// Starts the request on `engine` (chain `head`): `None` when it is in flight (its
    /// completion finishes it), or the status byte and used length when it finished at once
    /// (refused, GET_ID, unsupported, or the ring would not take it).
    pub fn start_async(
        &self,
        disk: &mut Disk,
        engine: &mut AsyncIo,
        mem: &GuestMemoryMmap,
        head: u16,
    ) -> Option<(u8, u32)> {
        let fd = match &disk.backend {
            Backend::File(file) => file.as_raw_fd(),
            // An overlay is refused with Async when the drive is made; run it in place anyway.
            Backend::Cow(_) => return Some(self.execute(disk, mem)),
        };
        let queued = match self.kind {
            RequestType::Out if disk.read_only => return Some((status::IOERR, 1)),
            RequestType::In | RequestType::Out => match self.disk_range(disk) {
                Some(offset) => {
                    engine.queue_rw(fd, offset, mem, (head, self.status, self.kind), &self.data)
                }
                None => return Some((status::IOERR, 1)),
            },
            RequestType::Flush => engine.queue_flush(fd, head, self.status),
            RequestType::GetId | RequestType::Unsupported(_) => {
                return Some(self.execute(disk, mem));
            }
        };
        match queued {
            Ok(()) => None,
            Err(e) => {
                log::debug!("virtio-blk: cannot queue a {:?} request: {e}", self.kind);
                Some((status::IOERR, 1))
            }
        }
    }

    /// Runs the request; returns the status byte and how many bytes the device wrote to guest
    /// memory (data plus the status byte), for the used ring.
    pub fn execute(&self, disk: &mut Disk, mem: &GuestMemoryMmap) -> (u8, u32) {
        let (status, written) = match self.kind {
            RequestType::In => match self.disk_range(disk) {
                Some(offset) => match disk.read_into(mem, offset, &self.data) {
                    Ok(n) => (status::OK, n),
                    Err(e) => {
                        log::debug!("virtio-blk: read at sector {} failed: {e}", self.sector);
                        (status::IOERR, 0)
                    }
                },
                None => (status::IOERR, 0),
            },
            RequestType::Out if disk.read_only => (status::IOERR, 0),
            RequestType::Out => match self.disk_range(disk) {
                Some(offset) => match disk.write_from(mem, offset, &self.data) {
                    Ok(()) => (status::OK, 0),
                    Err(e) => {
                        log::debug!("virtio-blk: write at sector {} failed: {e}", self.sector);
                        (status::IOERR, 0)
                    }
                },
                None => (status::IOERR, 0),
            },
            RequestType::Flush => match disk.flush() {
                Ok(()) => (status::OK, 0),
                Err(e) => {
                    log::warn!("virtio-blk: flush failed: {e}");
                    (status::IOERR, 0)
                }
            },
            RequestType::GetId => match self.data.first() {
                Some(&(addr, len)) => {
                    let n = (len as usize).min(ID_BYTES);
                    match mem.write_slice(&disk.id[..n], addr) {
                        Ok(()) => (status::OK, n as u32),
                        Err(_) => (status::IOERR, 0),
                    }
                }
                None => (status::IOERR, 0),
            },
            RequestType::Unsupported(_) => (status::UNSUPP, 0),
        };
        (status, written.saturating_add(1))
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
