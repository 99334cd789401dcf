//! Seccomp filters, one for each kind of thread `kiln-vmm` runs, so that a guest that takes over a
//! thread (through a device bug, say) can make only the system calls that thread needs.
//!
//! The filters are written in seccompiler's JSON (`resources/seccomp/x86_64.json`), compiled to
//! BPF by `build.rs` and embedded in the binary; any system call a filter does not list traps:
//! the SIGSYS handler ([`sigsys`]) names the thread and the call on stderr and ends the process
//! with status [`EXIT_BAD_SYSCALL`] (148). `--no-seccomp` installs none. The kinds, and when
//! each installs its filter:
//!
//! - **api**: the `kiln_api` thread, before it serves its first request. It serves every
//!   connection from one epoll loop and starts no thread: it accepts, reads, parses and writes
//!   HTTP on Unix sockets and hands requests to the VMM thread.
//! - **vcpu**: each `kiln_vcpu{N}` thread, first thing, before it runs any guest code. Its work is
//!   KVM_RUN and the exits it handles: port and MMIO accesses dispatched to the devices (serial
//!   output, eventfd writes, a vsock reset closing host sockets), the kick signal, and the state
//!   ioctls the VMM thread asks for while paused (snapshots).
//! - **vmm**: the main thread, which builds the VM (opening /dev/kvm, creating it, mapping memory,
//!   loading the kernel, or reading a snapshot), then runs the event loop, the devices and the
//!   API's answers. Its filter is installed *after* the VM is built and the vCPU threads are
//!   started, and *before* any of them runs guest code: the vCPU threads start paused, each
//!   installs its own filter, the VMM thread installs its filter, and only then are the vCPUs
//!   resumed. So the VMM filter need not allow building a VM (no KVM_CREATE_VM, no
//!   memfd_create, no opening of kernels), and since the vCPU threads were created before it,
//!   their filters are not stacked on it.
//!
//! A restore with the `Uffd` memory backend ([`crate::persist::uffd`]) makes its extra calls on
//! the VMM thread while it builds the VM, so before that thread's filter: `userfaultfd(2)`, the
//! `UFFDIO_API` and `UFFDIO_REGISTER` ioctls, and the `socket`/`connect`/`sendmsg` that hand the
//! userfaultfd to the page-fault handler. No filter lists them (`tests.rs` checks that). After
//! that such a VM needs nothing new: a thread touching a page the handler has not served yet
//! waits inside the fault (in KVM_RUN for a vCPU, in a plain memory copy for the VMM thread),
//! with no system call of its own, and a balloon discard is the `madvise(MADV_DONTNEED)` the VMM
//! filter already allows (the kernel holds it until the handler has read of the removal).
//!
//! A filter that cannot be installed is an error naming the thread, and the VMM stops.
//!
//! Threads allocate under their filters, so the allocator must use only calls every filter
//! allows: `main` calls [`malloc::configure`] before any thread exists (one arena, a fixed mmap
//! threshold; the module says why).
//!
//! The lists are what `strace -f` showed each thread calling after its filter went in, for the
//! host tests (tiny guests, the API, snapshots) and for the lab's Linux guests
//! (`tests/tests/lab_seccomp.rs`: every device, pause, snapshots, restores), plus the few calls
//! of paths those runs do not reach, each named in its rule's comment: the terminal put back at
//! exit, a failed snapshot's cleanup, `abort()` after a panic, malloc growing a heap, a timed
//! wait resumed after SIGSTOP. Arguments are pinned where that narrows something: ioctl requests
//! (no KVM_CREATE_VM on any thread, no KVM_RUN outside the vCPU threads), socket types, open
//! flags, futex operations (no priority-inheritance ones), never PROT_EXEC memory. To re-derive
//! them, run the lab test under strace: `cargo xtask lab --with-strace --share DIR -- ...` with
//! the test binary in DIR and `KILN_VMM_STRACE=/tmp/traces` in its environment (see
//! `kiln_tests::kiln_vmm`).

pub mod malloc;
pub mod sigsys;

use std::sync::Arc;

use seccompiler::{BpfProgram, sock_filter};

pub use sigsys::EXIT_BAD_SYSCALL;

/// The kinds of thread `kiln-vmm` runs, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: the event loop, devices, API answers, snapshots.
    Vmm,
    /// The API socket's threads.
    Api,
    /// A vCPU thread.
    Vcpu,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vmm, ThreadKind::Api, ThreadKind::Vcpu];

    /// The filter's name in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
        }
    }

    fn embedded(self) -> &'static [u8] {
        match self {
            ThreadKind::Vmm => include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-vmm.bpf")),
            ThreadKind::Api => include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-api.bpf")),
            ThreadKind::Vcpu => include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-vcpu.bpf")),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors loading or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The embedded program is not whole BPF instructions (a build problem).
    #[error(
        "the embedded {kind} seccomp filter is {len} bytes, not a whole number of 8-byte BPF instructions"
    )]
    Corrupt {
        /// Which filter.
        kind: ThreadKind,
        /// Its length.
        len: usize,
    },
    /// The handler that reports a forbidden call could not be installed.
    #[error(
        "thread {thread}: cannot install the SIGSYS handler that reports forbidden system calls: {err}"
    )]
    Handler {
        /// The thread's name.
        thread: String,
        /// Why.
        err: std::io::Error,
    },
    /// A `--seccomp-filter` file could not be read or is not a filter map.
    #[error("--seccomp-filter {path}: {why}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The kernel refused the filter.
    #[error("thread {thread}: cannot install the {kind} seccomp filter: {err}")]
    Install {
        /// The thread's name.
        thread: String,
        /// Which filter.
        kind: ThreadKind,
        /// Why.
        err: seccompiler::Error,
    },
}

/// The BPF program embedded for `kind`.
pub fn program(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let bytes = kind.embedded();
    if bytes.is_empty() || !bytes.len().is_multiple_of(8) {
        return Err(SeccompError::Corrupt {
            kind,
            len: bytes.len(),
        });
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|i| sock_filter {
            code: u16::from_le_bytes([i[0], i[1]]),
            jt: i[2],
            jf: i[3],
            k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
        })
        .collect())
}

/// Installs `program` as the calling thread's `kind` filter, after the SIGSYS handler that
/// reports a forbidden call (see [`sigsys`]) and the thread's name for that report.
pub fn install_program(kind: ThreadKind, program: &BpfProgram) -> Result<(), SeccompError> {
    let thread = || {
        std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string()
    };
    sigsys::remember_thread_name();
    sigsys::install_handler().map_err(|err| SeccompError::Handler {
        thread: thread(),
        err,
    })?;
    seccompiler::apply_filter(program).map_err(|err| SeccompError::Install {
        thread: thread(),
        kind,
        err,
    })
}

/// The filters a `kiln-vmm` process installs, or none (`--no-seccomp`, and library users that
/// never ask for them). Cheap to clone: each thread that installs one holds a copy.
#[derive(Clone, Default)]
pub struct SeccompFilters(Option<Arc<[BpfProgram; 3]>>);

impl SeccompFilters {
    /// The filters built into this binary.
    pub fn embedded() -> Result<Self, SeccompError> {
        Ok(Self(Some(Arc::new([
            program(ThreadKind::Vmm)?,
            program(ThreadKind::Api)?,
            program(ThreadKind::Vcpu)?,
        ]))))
    }

    /// The filters in `path` (`--seccomp-filter`): a map from thread kind to BPF program in the
    /// bincode layout Firecracker's `seccompiler-bin` writes (little-endian, fixed-width: the
    /// entry count as u64, then each name as u64 length and bytes, each program as u64
    /// instruction count and 8-byte instructions). It must hold exactly `vmm`, `api` and `vcpu`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, SeccompError> {
        let fail = |why: String| SeccompError::File {
            path: path.to_path_buf(),
            why,
        };
        let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        let map = parse_filter_map(&bytes).map_err(fail)?;
        let mut programs: [Option<BpfProgram>; 3] = [None, None, None];
        for (name, program) in map {
            let Some(kind) = ThreadKind::ALL.iter().find(|k| k.name() == name) else {
                return Err(fail(format!(
                    "has a filter for {name:?}; kiln-vmm's thread kinds are vmm, api and vcpu"
                )));
            };
            if program.is_empty() {
                return Err(fail(format!("the {name} filter is empty")));
            }
            programs[kind.index()] = Some(program);
        }
        let [Some(vmm), Some(api), Some(vcpu)] = programs else {
            return Err(fail("needs a filter for each of vmm, api and vcpu".into()));
        };
        Ok(Self(Some(Arc::new([vmm, api, vcpu]))))
    }

    /// No filters: [`SeccompFilters::install`] does nothing.
    pub fn disabled() -> Self {
        Self(None)
    }

    /// True unless disabled.
    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Installs the `kind` filter on the calling thread (and so on the threads it starts later).
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        match &self.0 {
            Some(programs) => install_program(kind, &programs[kind.index()]),
            None => Ok(()),
        }
    }
}

/// Most instructions a BPF program may have (the kernel's `BPF_MAXINSNS`).
const MAX_INSNS: u64 = 4096;

/// A reader over a filter file's bytes that never reads past their end.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "ends early, at byte {} (not a seccompiler-bin filter file)",
                    self.at
                )
            })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

/// Parses the bincode filter map of [`SeccompFilters::from_file`].
fn parse_filter_map(bytes: &[u8]) -> Result<Vec<(String, BpfProgram)>, String> {
    let mut c = Cursor { bytes, at: 0 };
    let entries = c.u64()?;
    if entries > 16 {
        return Err(format!("claims {entries} filters; it is not a filter map"));
    }
    let mut out = Vec::new();
    for _ in 0..entries {
        let len = c.u64()?;
        if len > 64 {
            return Err(format!("has a thread name of {len} bytes"));
        }
        let name = std::str::from_utf8(c.take(len as usize)?)
            .map_err(|_| "has a thread name that is not UTF-8".to_string())?
            .to_string();
        let count = c.u64()?;
        if count > MAX_INSNS {
            return Err(format!(
                "the {name} filter has {count} instructions; BPF allows {MAX_INSNS}"
            ));
        }
        let program = c
            .take(count as usize * 8)?
            .chunks_exact(8)
            .map(|i| sock_filter {
                code: u16::from_le_bytes([i[0], i[1]]),
                jt: i[2],
                jf: i[3],
                k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
            })
            .collect();
        out.push((name, program));
    }
    if c.at != bytes.len() {
        return Err(format!(
            "has {} bytes after the last filter",
            bytes.len() - c.at
        ));
    }
    Ok(out)
}

/// The bytes [`SeccompFilters::from_file`] reads for `filters` (for tests and tools).
pub fn encode_filter_map(filters: &[(&str, &BpfProgram)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(filters.len() as u64).to_le_bytes());
    for (name, program) in filters {
        out.extend_from_slice(&(name.len() as u64).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(program.len() as u64).to_le_bytes());
        for i in program.iter() {
            out.extend_from_slice(&i.code.to_le_bytes());
            out.push(i.jt);
            out.push(i.jf);
            out.extend_from_slice(&i.k.to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests;
