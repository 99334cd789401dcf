//! The counting guest ([`Program::Counter`]) as the snapshot tests drive it: booted over the
//! API, its dots read from the console, its count read from a memory file, and snapshots of it
//! loaded with either memory backend.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{ApiVmm, COUNTER_ADDR, Program, Stream, tiny_kernel, write};

/// How long a guest may take to print what a test waits for on a loaded 2-core machine.
pub const LIMIT: Duration = Duration::from_secs(60);

/// kiln-vmm serving `dir/NAME.sock`, the guest's console collected and the VMM's log shown.
pub fn start_vmm(dir: &Path, name: &str) -> ApiVmm {
    ApiVmm::options()
        .stdout(Stream::Collect)
        .stderr(Stream::Inherit)
        .start(dir, name)
}

/// What the snapshot tests ask of a VMM running the counting guest.
pub trait CounterVmm {
    /// The dots the guest has printed so far.
    fn dots(&self) -> usize;
    /// Waits until the guest has printed `n` more dots than now.
    fn wait_dots(&self, n: usize);
    /// Asks to load `state` with guest memory from the file `mem` (dirty pages tracked); the
    /// status and body.
    fn load(&self, state: &Path, mem: &Path, resume: bool) -> (u16, String);
    /// Asks to load `state` with guest memory served by the page-fault handler listening on
    /// `sock` (dirty pages tracked); the status and body.
    fn load_uffd(&self, state: &Path, sock: &Path, resume: bool) -> (u16, String);
}

impl CounterVmm for ApiVmm {
    fn dots(&self) -> usize {
        self.stdout().bytes().filter(|&b| b == b'.').count()
    }

    fn wait_dots(&self, n: usize) {
        let want = self.dots() + n;
        let start = Instant::now();
        while self.dots() < want {
            assert!(start.elapsed() < LIMIT, "the guest stopped counting");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn load(&self, state: &Path, mem: &Path, resume: bool) -> (u16, String) {
        load_with(self, "File", state, mem, resume)
    }

    fn load_uffd(&self, state: &Path, sock: &Path, resume: bool) -> (u16, String) {
        load_with(self, "Uffd", state, sock, resume)
    }
}

fn load_with(
    vmm: &ApiVmm,
    backend: &str,
    state: &Path,
    path: &Path,
    resume: bool,
) -> (u16, String) {
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "{backend}", "backend_path": "{}"}}, "resume_vm": {resume}, "track_dirty_pages": true}}"#,
        state.display(),
        path.display()
    );
    vmm.call("PUT", "/snapshot/load", &body)
}

/// The guest's count as saved in a memory file.
pub fn counter(mem: &Path) -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open(mem)
        .unwrap()
        .read_exact_at(&mut b, u64::from(COUNTER_ADDR))
        .unwrap();
    u32::from_le_bytes(b)
}

/// Bytes of a file that are data, not holes.
pub fn data_bytes(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    kiln_snapshot::data_ranges(&f, path)
        .unwrap()
        .iter()
        .map(|r| r.end - r.start)
        .sum()
}

/// A VMM running the counting guest with `vcpus` vCPUs and 32 MiB, dirty pages tracked, that has
/// printed two dots.
pub fn boot_counter(dir: &Path, vcpus: u8) -> ApiVmm {
    boot_counter_with(dir, vcpus, |_| {})
}

/// [`boot_counter`], with `configure` adding to the VM before it starts.
pub fn boot_counter_with(dir: &Path, vcpus: u8, configure: impl FnOnce(&ApiVmm)) -> ApiVmm {
    let kernel = write(dir, "counter.elf", &tiny_kernel(Program::Counter, true));
    let vmm = start_vmm(dir, "boot");
    configure(&vmm);
    vmm.ok(
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display()),
    );
    vmm.ok(
        "PUT",
        "/machine-config",
        &format!(r#"{{"vcpu_count": {vcpus}, "mem_size_mib": 32, "track_dirty_pages": true}}"#),
    );
    vmm.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    vmm.wait_dots(2);
    vmm
}
