//! The `Uffd` memory backend of `PUT /snapshot/load`, as Firecracker has it: guest memory is
//! anonymous, a page-fault handler (another process, listening on `backend_path`) fills it from
//! wherever it keeps the snapshot's memory.
//!
//! The VMM maps guest memory anonymous and private with the memory file's region layout, creates
//! a userfaultfd with `UFFD_FEATURE_EVENT_REMOVE` (so the handler hears of pages the balloon or
//! free page reporting drops), registers every region for missing-page faults, connects to the
//! handler's Unix socket and sends one message: the JSON array of [`GuestRegionUffdMapping`]s
//! with the userfaultfd attached (SCM_RIGHTS). All that happens before anything touches guest
//! memory, so from then on every first touch, by a vCPU inside KVM or by the VMM, waits for the
//! handler.
//!
//! The VMM keeps the connection open for the VM's life (handlers watch it to learn that the VMM
//! went away) and keeps its own copy of the userfaultfd: if the handler dies, guest memory then
//! stops, rather than quietly turning into zero pages.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use kiln_snapshot::PAGE_SIZE;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::memory::uffd::{UFFD_FEATURE_EVENT_REMOVE, UffdError, Userfaultfd};
use crate::memory::{GuestMemoryMmap, MemoryError, file_layout, map_anonymous};

/// One guest memory region as the handler sees it: Firecracker's `GuestRegionUffdMapping`,
/// field for field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegionUffdMapping {
    /// Where the region is mapped in the VMM: fault addresses are in these terms.
    pub base_host_virt_addr: u64,
    /// The region's length in bytes.
    pub size: u64,
    /// Where the region's contents start in the snapshot's memory file.
    pub offset: u64,
    /// The page size backing the region, in bytes.
    pub page_size: u64,
    /// The page size again, in bytes despite its name: Firecracker keeps this older field for
    /// handlers written against it (its value has always been the size in bytes).
    pub page_size_kib: u64,
}

/// Errors setting up a `Uffd` backend; each names the handler's socket.
#[derive(Debug, thiserror::Error)]
pub enum UffdBackendError {
    /// Guest memory could not be mapped.
    #[error(transparent)]
    Map(#[from] MemoryError),
    /// The userfaultfd could not be made or registered.
    #[error("mem_backend Uffd {}: {err}", path.display())]
    Userfaultfd {
        /// The handler's socket.
        path: PathBuf,
        /// Why.
        err: UffdError,
    },
    /// Nothing is at the socket path.
    #[error("mem_backend Uffd: no page-fault handler socket at {}: {err}", path.display())]
    NoSocket {
        /// The handler's socket.
        path: PathBuf,
        /// Why.
        err: io::Error,
    },
    /// Nothing listens on the socket.
    #[error(
        "mem_backend Uffd: the page-fault handler socket {} refused the connection (nothing listens on it)",
        path.display()
    )]
    Refused {
        /// The handler's socket.
        path: PathBuf,
    },
    /// Connecting failed otherwise.
    #[error("mem_backend Uffd: cannot connect to the page-fault handler socket {}: {err}", path.display())]
    Connect {
        /// The handler's socket.
        path: PathBuf,
        /// Why.
        err: io::Error,
    },
    /// The handler went away before it took the regions.
    #[error(
        "mem_backend Uffd: the page-fault handler at {} closed the connection before it was sent guest memory's regions",
        path.display()
    )]
    Closed {
        /// The handler's socket.
        path: PathBuf,
    },
    /// Sending the regions failed otherwise.
    #[error("mem_backend Uffd: cannot send guest memory's regions to the page-fault handler at {}: {err}", path.display())]
    Send {
        /// The handler's socket.
        path: PathBuf,
        /// Why.
        err: io::Error,
    },
}

/// What a `Uffd`-backed VM holds on to for its life: the connection to its page-fault handler
/// and its own copy of the userfaultfd (see the module doc for why both).
#[derive(Debug)]
pub struct PageFaultHandler {
    _socket: UnixStream,
    _uffd: Userfaultfd,
}

/// The regions of `mem` as the handler is told of them: each with its offset in the memory file
/// (the layout [`file_layout`] gives for `size` bytes) and 4 KiB pages.
pub fn mappings(mem: &GuestMemoryMmap, size: u64) -> Vec<GuestRegionUffdMapping> {
    mem.iter()
        .zip(file_layout(size))
        .map(|(region, (_, len, offset))| GuestRegionUffdMapping {
            base_host_virt_addr: region.as_ptr() as u64,
            size: len,
            offset,
            page_size: PAGE_SIZE,
            page_size_kib: PAGE_SIZE,
        })
        .collect()
}

/// Maps `size` bytes of guest memory for the page-fault handler listening at `path` and hands it
/// the regions and the userfaultfd. On error nothing is left: the mapping, the userfaultfd and
/// the connection are dropped (the handler sees the connection close).
pub fn connect(
    path: &Path,
    size: u64,
) -> Result<(GuestMemoryMmap, PageFaultHandler), UffdBackendError> {
    let mem = map_anonymous(size)?;
    let uffd_err = |err| UffdBackendError::Userfaultfd {
        path: path.to_path_buf(),
        err,
    };
    let uffd = Userfaultfd::new(UFFD_FEATURE_EVENT_REMOVE).map_err(uffd_err)?;
    for region in mem.iter() {
        uffd.register_missing(region.as_ptr() as u64, region.len())
            .map_err(uffd_err)?;
    }
    let socket = handshake(path, &mappings(&mem, size), &uffd)?;
    log::info!(
        "mem_backend Uffd: guest memory ({size} bytes in {} regions) handed to the page-fault handler at {}",
        mem.num_regions(),
        path.display()
    );
    Ok((
        mem,
        PageFaultHandler {
            _socket: socket,
            _uffd: uffd,
        },
    ))
}

/// Connects to `path` and sends `regions` as JSON with `uffd` attached; the open connection.
fn handshake(
    path: &Path,
    regions: &[GuestRegionUffdMapping],
    uffd: &impl AsRawFd,
) -> Result<UnixStream, UffdBackendError> {
    let socket = UnixStream::connect(path).map_err(|err| match err.raw_os_error() {
        Some(libc::ENOENT) => UffdBackendError::NoSocket {
            path: path.to_path_buf(),
            err,
        },
        Some(libc::ECONNREFUSED) => UffdBackendError::Refused {
            path: path.to_path_buf(),
        },
        _ => UffdBackendError::Connect {
            path: path.to_path_buf(),
            err,
        },
    })?;
    send_regions(&socket, path, regions, uffd)?;
    Ok(socket)
}

/// Sends `regions` as JSON with `uffd` attached over `socket`, connected to `path`.
fn send_regions(
    socket: &UnixStream,
    path: &Path,
    regions: &[GuestRegionUffdMapping],
    uffd: &impl AsRawFd,
) -> Result<(), UffdBackendError> {
    // Plain data with no map or float keys: serializing cannot fail.
    let json = serde_json::to_vec(regions).unwrap_or_default();
    // One sendmsg (MSG_NOSIGNAL: a closed peer is EPIPE, not SIGPIPE) carries the JSON and the
    // descriptor together; a Unix stream socket takes a message this small whole.
    let sent = socket
        .send_with_fd(&json[..], uffd.as_raw_fd())
        .map_err(|e| match e.errno() {
            libc::EPIPE | libc::ECONNRESET => UffdBackendError::Closed {
                path: path.to_path_buf(),
            },
            errno => UffdBackendError::Send {
                path: path.to_path_buf(),
                err: io::Error::from_raw_os_error(errno),
            },
        })?;
    if sent != json.len() {
        return Err(UffdBackendError::Send {
            path: path.to_path_buf(),
            err: io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", json.len()),
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn sock_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-uffd-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_json_is_firecrackers_guest_region_uffd_mapping() {
        let m = GuestRegionUffdMapping {
            base_host_virt_addr: 0x7f00_0000_0000,
            size: 32 * MIB,
            offset: 0,
            page_size: 4096,
            page_size_kib: 4096,
        };
        let v = serde_json::to_value([&m]).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{"base_host_virt_addr": 0x7f00_0000_0000u64, "size": 33554432,
                                "offset": 0, "page_size": 4096, "page_size_kib": 4096}])
        );
        // A handler written against Firecracker's struct reads it back.
        let back: Vec<GuestRegionUffdMapping> = serde_json::from_value(v).unwrap();
        assert_eq!(back, vec![m]);
    }

    #[test]
    fn regions_carry_their_memory_file_offsets() {
        let mem = map_anonymous(3 * GIB + 256 * MIB).unwrap();
        let m = mappings(&mem, 3 * GIB + 256 * MIB);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].size, m[0].offset), (3 * GIB, 0));
        assert_eq!((m[1].size, m[1].offset), (256 * MIB, 3 * GIB));
        for (r, region) in m.iter().zip(mem.iter()) {
            assert_eq!(r.base_host_virt_addr, region.as_ptr() as u64);
            assert_eq!((r.page_size, r.page_size_kib), (4096, 4096));
        }
    }

    #[test]
    fn the_handler_gets_the_regions_and_the_userfaultfd_and_the_connection_stays() {
        let dir = sock_dir("ok");
        let path = dir.join("h.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handler = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let (n, fd) = stream.recv_with_fd(&mut buf).unwrap();
            let regions: Vec<GuestRegionUffdMapping> = serde_json::from_slice(&buf[..n]).unwrap();
            (
                stream,
                regions,
                fd.expect("a descriptor came with the regions"),
            )
        });
        let (mem, kept) = connect(&path, 2 * MIB).unwrap();
        let (stream, regions, fd) = handler.join().unwrap();
        assert_eq!(regions, mappings(&mem, 2 * MIB));
        // The descriptor is the VMM's userfaultfd: the handler serves a fault with it.
        let uffd = Userfaultfd::from_fd(fd.into());
        let base = regions[0].base_host_virt_addr;
        let reader = std::thread::spawn(move || {
            // SAFETY: inside guest memory, which `mem` keeps mapped until this thread is joined.
            unsafe { std::ptr::read_volatile((base + 8192) as *const u8) }
        });
        loop {
            if let Some(crate::memory::uffd::Event::Pagefault { addr, .. }) =
                uffd.read_event().unwrap()
            {
                uffd.copy(addr & !(PAGE_SIZE - 1), &[7u8; PAGE_SIZE as usize])
                    .unwrap();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(reader.join().unwrap(), 7);
        stream.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let open = std::io::Read::read(&mut &stream, &mut b);
        assert_eq!(
            open.unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "the VMM keeps the connection open"
        );
        drop(kept);
        assert_eq!(
            std::io::Read::read(&mut &stream, &mut b).unwrap(),
            0,
            "and closes it with the VM"
        );
        drop(mem);
    }

    #[test]
    fn a_missing_or_deaf_socket_is_named() {
        let dir = sock_dir("bad");
        let missing = dir.join("nobody.sock");
        let e = connect(&missing, 2 * MIB).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "mem_backend Uffd: no page-fault handler socket at {}",
                missing.display()
            )),
            "{e}"
        );
        let deaf = dir.join("deaf.sock");
        drop(UnixListener::bind(&deaf).unwrap());
        let e = connect(&deaf, 2 * MIB).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "mem_backend Uffd: the page-fault handler socket {} refused the connection (nothing listens on it)",
                deaf.display()
            )
        );
    }

    #[test]
    fn a_handler_that_closed_early_is_named() {
        // Connected, but the handler end is gone before the regions go out.
        let (vmm, handler) = UnixStream::pair().unwrap();
        drop(handler);
        let uffd = Userfaultfd::new(0).unwrap();
        let path = Path::new("/run/handler.sock");
        let e = send_regions(&vmm, path, &[], &uffd).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mem_backend Uffd: the page-fault handler at /run/handler.sock closed the connection before it was sent guest memory's regions"
        );
    }
}
