//! The kernel's userfaultfd interface (`linux/userfaultfd.h`), as much of it as a `Uffd` memory
//! backend uses: the VMM creates a userfaultfd, declares the features it wants
//! ([`Userfaultfd::new`]) and registers guest memory for missing-page faults
//! ([`Userfaultfd::register_missing`]); a page-fault handler, which holds the same descriptor,
//! reads the faults ([`Userfaultfd::read_event`]) and fills the pages
//! ([`Userfaultfd::copy`], [`Userfaultfd::zeropage`]). The VMM itself never serves a fault: the
//! handler side is here for the tests' handler (and any Kiln-side handler later), so both ends
//! share one definition of the ABI.
//!
//! Written by hand rather than with the `userfaultfd` crate: its `userfaultfd-sys` generates the
//! bindings with bindgen at build time, which needs libclang on every machine that builds
//! kiln-vmm; the part used here is one system call, four ioctls and two message layouts.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::ioctl::ioctl_with_mut_ref;

/// `UFFD_API`: the interface version the kernel speaks.
const UFFD_API: u64 = 0xAA;
/// The ioctl type of every `UFFDIO_*` request.
const UFFDIO: u32 = 0xAA;
/// `_UFFDIO_COPY`, also the bit for UFFDIO_COPY in a range's ioctl set.
const UFFDIO_COPY_NR: u32 = 0x03;
/// The kernel reports a removed range (MADV_DONTNEED, MADV_REMOVE) to the handler, which can
/// then serve those pages as zeros when they fault again instead of from the snapshot.
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// Register a range for faults on pages that are not there yet.
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// A page fault (`UFFD_EVENT_PAGEFAULT`).
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// A range was removed (`UFFD_EVENT_REMOVE`).
const UFFD_EVENT_REMOVE: u8 = 0x15;
/// The fault is a write (`UFFD_PAGEFAULT_FLAG_WRITE`).
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;
/// Size of one `struct uffd_msg` (packed).
const MSG_SIZE: usize = 32;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// The request numbers (`_IOWR(UFFDIO, nr, struct)`), private to this module.
mod requests {
    use super::*;
    use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

    ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
    ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
    ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
    ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, UFFDIO_COPY_NR, UffdioCopy);
    ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
}
use requests::{UFFDIO_API, UFFDIO_COPY, UFFDIO_REGISTER, UFFDIO_WAKE, UFFDIO_ZEROPAGE};

/// Errors creating or registering a userfaultfd.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The system call was refused for lack of privilege.
    #[error(
        "cannot create a userfaultfd: not permitted (EPERM): a userfaultfd that also sees KVM's \
         faults on guest memory needs CAP_SYS_PTRACE, or the host's vm.unprivileged_userfaultfd=1"
    )]
    NotPermitted,
    /// The kernel has no userfaultfd.
    #[error(
        "cannot create a userfaultfd: the kernel has none (ENOSYS: built without CONFIG_USERFAULTFD)"
    )]
    NoSyscall,
    /// Another failure of the system call.
    #[error("cannot create a userfaultfd: {0}")]
    Create(io::Error),
    /// UFFDIO_API failed.
    #[error("the userfaultfd refused API version {UFFD_API:#x} with features {features:#x}: {err}")]
    Api {
        /// The features asked for.
        features: u64,
        /// Why.
        err: io::Error,
    },
    /// The kernel lacks a feature asked for.
    #[error("the kernel's userfaultfd lacks features {missing:#x} (it offers {offered:#x})")]
    Feature {
        /// The features asked for that are missing.
        missing: u64,
        /// What it has.
        offered: u64,
    },
    /// UFFDIO_REGISTER failed.
    #[error("cannot register guest memory at {addr:#x} ({len} bytes) with the userfaultfd: {err}")]
    Register {
        /// Host address.
        addr: u64,
        /// Length.
        len: u64,
        /// Why.
        err: io::Error,
    },
    /// The registered range cannot be filled by copying.
    #[error(
        "the userfaultfd cannot fill guest memory at {addr:#x} by copying (ioctls {ioctls:#x}), so no handler could serve it"
    )]
    NoCopy {
        /// Host address.
        addr: u64,
        /// The ioctls the range allows.
        ioctls: u64,
    },
}

/// One message read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread touched the missing page at host address `addr` (the page's start: the kernel
    /// hides the offset unless asked for `UFFD_FEATURE_EXACT_ADDRESS`).
    Pagefault {
        /// The faulting address.
        addr: u64,
        /// True for a write.
        write: bool,
    },
    /// `start..end` was dropped (MADV_DONTNEED or MADV_REMOVE); its pages fault again.
    Remove {
        /// First byte.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// An event this interface does not decode, by its number.
    Other(u8),
}

impl Event {
    /// Decodes one `struct uffd_msg`.
    fn parse(msg: &[u8; MSG_SIZE]) -> Self {
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&msg[at..at + 8]);
            u64::from_le_bytes(b)
        };
        match msg[0] {
            UFFD_EVENT_PAGEFAULT => Event::Pagefault {
                addr: word(16),
                write: word(8) & UFFD_PAGEFAULT_FLAG_WRITE != 0,
            },
            UFFD_EVENT_REMOVE => Event::Remove {
                start: word(8),
                end: word(16),
            },
            other => Event::Other(other),
        }
    }
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Userfaultfd(File);

impl Userfaultfd {
    /// A new userfaultfd (close-on-exec, non-blocking) that also sees faults the kernel takes on
    /// the process's behalf (KVM's, a system call's), with `features` declared
    /// (e.g. [`UFFD_FEATURE_EVENT_REMOVE`]); every one must be there.
    pub fn new(features: u64) -> Result<Self, UffdError> {
        // No UFFD_USER_MODE_ONLY: the guest's own accesses fault inside KVM, in kernel mode.
        // SAFETY: userfaultfd takes only flags and returns a new descriptor or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EPERM) => UffdError::NotPermitted,
                Some(libc::ENOSYS) => UffdError::NoSyscall,
                _ => UffdError::Create(err),
            });
        }
        // SAFETY: fd was just returned by userfaultfd and is owned by nothing else.
        let uffd = Self(unsafe { File::from_raw_fd(fd as RawFd) });
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one uffdio_api, which `api` is.
        let rc = unsafe { ioctl_with_mut_ref(&uffd.0, UFFDIO_API(), &mut api) };
        if rc < 0 {
            return Err(UffdError::Api {
                features,
                err: io::Error::last_os_error(),
            });
        }
        if api.features & features != features {
            return Err(UffdError::Feature {
                missing: features & !api.features,
                offered: api.features,
            });
        }
        Ok(uffd)
    }

    /// The userfaultfd a handler was given (over SCM_RIGHTS).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self(File::from(fd))
    }

    /// Registers `len` bytes at host address `addr` (page aligned, mapped anonymous private) for
    /// missing-page faults, which must be servable by copying.
    pub fn register_missing(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly one uffdio_register, which `reg` is;
        // registering changes how faults in the range are handled, not what memory is mapped.
        let rc = unsafe { ioctl_with_mut_ref(&self.0, UFFDIO_REGISTER(), &mut reg) };
        if rc < 0 {
            return Err(UffdError::Register {
                addr,
                len,
                err: io::Error::last_os_error(),
            });
        }
        if reg.ioctls & (1 << UFFDIO_COPY_NR) == 0 {
            return Err(UffdError::NoCopy {
                addr,
                ioctls: reg.ioctls,
            });
        }
        Ok(())
    }

    /// The next message, or `None` if none is waiting.
    pub fn read_event(&self) -> io::Result<Option<Event>> {
        let mut msg = [0u8; MSG_SIZE];
        match (&self.0).read(&mut msg) {
            Ok(MSG_SIZE) => Ok(Some(Event::parse(&msg))),
            Ok(n) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("a userfaultfd message of {n} bytes, not {MSG_SIZE}"),
            )),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Fills the missing pages at `dst` with `src` (whole pages) and wakes the threads waiting
    /// on them. `EEXIST` means another copy got there first; `EAGAIN` that the mappings are
    /// changing (read the pending events, then try again).
    pub fn copy(&self, dst: u64, src: &[u8]) -> io::Result<()> {
        let mut copy = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: the kernel reads `src.len()` bytes from `src`, which is borrowed for the call,
        // and writes them only into the registered range of the process the userfaultfd
        // belongs to, at pages that are missing; `copy` is one uffdio_copy.
        let rc = unsafe { ioctl_with_mut_ref(&self.0, UFFDIO_COPY(), &mut copy) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Maps the zero page at the missing pages `dst..dst + len` and wakes their waiters.
    pub fn zeropage(&self, dst: u64, len: u64) -> io::Result<()> {
        let mut zero = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: `zero` is one uffdio_zeropage; the kernel only maps zeros at missing pages of
        // the registered range.
        let rc = unsafe { ioctl_with_mut_ref(&self.0, UFFDIO_ZEROPAGE(), &mut zero) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wakes the threads waiting on `start..start + len` (after an `EEXIST` from another copy).
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        // SAFETY: `range` is one uffdio_range, which the kernel only reads.
        let rc = unsafe { ioctl_with_mut_ref(&self.0, UFFDIO_WAKE(), &mut range) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    const P: usize = 4096;

    /// An anonymous private mapping of `pages` pages, unmapped on drop.
    struct Anon(*mut u8, usize);

    impl Anon {
        fn new(pages: usize) -> Self {
            // SAFETY: a fresh anonymous mapping; no Rust reference into it outlives `Anon`.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    pages * P,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Self(p.cast(), pages * P)
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`, not used after.
            unsafe { libc::munmap(self.0.cast(), self.1) };
        }
    }

    /// The next event, waiting up to a few seconds for it.
    fn next_event(uffd: &Userfaultfd) -> Event {
        let start = Instant::now();
        loop {
            if let Some(e) = uffd.read_event().unwrap() {
                return e;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no event came");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_registered_page_waits_for_its_handler_and_gets_what_it_copies() {
        let mem = Anon::new(4);
        let base = mem.0 as u64;
        let uffd = Userfaultfd::new(UFFD_FEATURE_EVENT_REMOVE).unwrap();
        uffd.register_missing(base, 4 * P as u64).unwrap();
        assert_eq!(uffd.read_event().unwrap(), None, "nothing faulted yet");

        let (tx, rx) = mpsc::channel();
        let addr = base as usize;
        let reader = std::thread::spawn(move || {
            // SAFETY: inside the 4-page mapping, which outlives this thread (joined below).
            let read = |i: usize| unsafe { std::ptr::read_volatile((addr + i) as *const u8) };
            tx.send((read(P + 5), read(2 * P + 7))).unwrap();
        });
        assert_eq!(
            next_event(&uffd),
            Event::Pagefault {
                addr: base + P as u64,
                write: false
            }
        );
        assert!(rx.try_recv().is_err(), "the reader waits for its page");
        uffd.copy(base + P as u64, &[0x5a; P]).unwrap();
        let again = uffd.copy(base + P as u64, &[0x11; P]).unwrap_err();
        assert_eq!(
            again.raw_os_error(),
            Some(libc::EEXIST),
            "a page is filled once"
        );
        assert!(
            matches!(next_event(&uffd), Event::Pagefault { addr, .. } if addr == base + 2 * P as u64)
        );
        uffd.zeropage(base + 2 * P as u64, P as u64).unwrap();
        assert_eq!(rx.recv().unwrap(), (0x5a, 0));
        reader.join().unwrap();

        // Dropping a page is reported, and the page faults again.
        let dropper = std::thread::spawn(move || {
            // SAFETY: drops page 1 of the mapping, which outlives this thread.
            unsafe { libc::madvise((addr + P) as *mut libc::c_void, P, libc::MADV_DONTNEED) }
        });
        assert_eq!(
            next_event(&uffd),
            Event::Remove {
                start: base + P as u64,
                end: base + 2 * P as u64
            }
        );
        assert_eq!(dropper.join().unwrap(), 0);
        let writer = std::thread::spawn(move || {
            // SAFETY: inside the mapping, which outlives this thread.
            unsafe { std::ptr::write_volatile((addr + P) as *mut u8, 3) };
        });
        assert_eq!(
            next_event(&uffd),
            Event::Pagefault {
                addr: base + P as u64,
                write: true
            }
        );
        uffd.zeropage(base + P as u64, P as u64).unwrap();
        writer.join().unwrap();
        // SAFETY: inside the mapping; the page is there now.
        assert_eq!(unsafe { std::ptr::read_volatile(mem.0.add(P)) }, 3);
        uffd.wake(base, P as u64).unwrap();
    }

    #[test]
    fn registering_what_is_not_anonymous_memory_is_named() {
        let uffd = Userfaultfd::new(0).unwrap();
        let e = uffd.register_missing(0x1000, 0x1000).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot register guest memory at 0x1000 (4096 bytes)"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_what_the_host_lacks() {
        assert!(
            UffdError::NotPermitted
                .to_string()
                .contains("CAP_SYS_PTRACE, or the host's vm.unprivileged_userfaultfd=1")
        );
        assert!(UffdError::NoSyscall.to_string().contains("ENOSYS"));
        let e = UffdError::Feature {
            missing: UFFD_FEATURE_EVENT_REMOVE,
            offered: 0,
        };
        assert_eq!(
            e.to_string(),
            "the kernel's userfaultfd lacks features 0x8 (it offers 0x0)"
        );
    }

    #[test]
    fn messages_decode() {
        let mut m = [0u8; MSG_SIZE];
        m[0] = UFFD_EVENT_PAGEFAULT;
        m[8..16].copy_from_slice(&1u64.to_le_bytes());
        m[16..24].copy_from_slice(&0x7f00_1234u64.to_le_bytes());
        assert_eq!(
            Event::parse(&m),
            Event::Pagefault {
                addr: 0x7f00_1234,
                write: true
            }
        );
        m[0] = UFFD_EVENT_REMOVE;
        assert_eq!(
            Event::parse(&m),
            Event::Remove {
                start: 1,
                end: 0x7f00_1234
            }
        );
        m[0] = 0x13;
        assert_eq!(Event::parse(&m), Event::Other(0x13));
    }
}
