//! A page-fault handler for loads with `mem_backend` `Uffd`, doing what E2B's orchestrator and
//! Firecracker's example handlers do: it listens on a Unix socket, takes the VMM's one message
//! (the JSON array of regions with the userfaultfd attached), and serves each missing-page fault
//! from a snapshot's memory file with UFFDIO_COPY (UFFDIO_ZEROPAGE for an all-zero page, and for
//! pages in a range the VMM removed). It is a thread of the test process: faults on the VMM's
//! memory, KVM's included, go to whoever holds the userfaultfd.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kiln_vmm::memory::uffd::{Event, Userfaultfd};
use kiln_vmm::persist::uffd::GuestRegionUffdMapping;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const PAGE: u64 = 4096;

/// What the handler has seen and done so far.
#[derive(Debug, Default, Clone)]
pub struct HandlerLog {
    /// The VMM's message, as sent.
    pub message: Option<String>,
    /// The message's regions.
    pub regions: Vec<GuestRegionUffdMapping>,
    /// Faults served.
    pub faults: u64,
    /// Of those, pages copied from the memory file.
    pub copied: u64,
    /// Of those, zero pages mapped.
    pub zeroed: u64,
    /// Ranges the VMM removed (host addresses).
    pub removed: Vec<Range<u64>>,
    /// The VMM closed the connection (it exited).
    pub vmm_closed: bool,
    /// What went wrong, if anything.
    pub errors: Vec<String>,
}

/// A running handler; stopped and joined when dropped.
pub struct UffdHandler {
    sock: PathBuf,
    log: Arc<Mutex<HandlerLog>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UffdHandler {
    /// Listens on `sock` and serves the first VMM that connects from `mem_file`.
    pub fn start(sock: &Path, mem_file: &Path) -> Self {
        let listener = UnixListener::bind(sock).expect("bind the handler's socket");
        listener.set_nonblocking(true).unwrap();
        let file = File::open(mem_file).expect("open the memory file");
        let log = Arc::new(Mutex::new(HandlerLog::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                if let Err(e) = serve(&listener, &file, &log, &stop) {
                    log.lock().unwrap().errors.push(e);
                }
            })
        };
        Self {
            sock: sock.to_path_buf(),
            log,
            stop,
            thread: Some(thread),
        }
    }

    /// The socket it listens on.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// What it has seen so far.
    pub fn log(&self) -> HandlerLog {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for UffdHandler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits up to 50 ms for any of `fds` to be readable (or hung up).
fn wait_readable(fds: &[i32]) {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `polls` is a live array of pollfd of the length given.
    unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, 50) };
}

fn serve(
    listener: &UnixListener,
    file: &File,
    log: &Mutex<HandlerLog>,
    stop: &AtomicBool,
) -> Result<(), String> {
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                wait_readable(&[listener.as_raw_fd()]);
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    let (regions, uffd) = handshake(&stream, log)?;
    stream.set_nonblocking(true).unwrap();
    let mut pending: Vec<u64> = Vec::new();
    let mut page = vec![0u8; PAGE as usize];
    while !stop.load(Ordering::Relaxed) {
        wait_readable(&[uffd.as_raw_fd(), stream.as_raw_fd()]);
        // Every waiting event first: a copy fails with EAGAIN while a removal is unread.
        while let Some(event) = uffd.read_event().map_err(|e| format!("read_event: {e}"))? {
            match event {
                Event::Pagefault { addr, .. } => pending.push(addr & !(PAGE - 1)),
                Event::Remove { start, end } => log.lock().unwrap().removed.push(start..end),
                Event::Other(n) => log.lock().unwrap().errors.push(format!("event {n:#x}")),
            }
        }
        let mut retry = Vec::new();
        for addr in pending.drain(..) {
            let removed = log
                .lock()
                .unwrap()
                .removed
                .iter()
                .any(|r| r.contains(&addr));
            let offset = regions
                .iter()
                .find(|r| (r.base_host_virt_addr..r.base_host_virt_addr + r.size).contains(&addr))
                .map(|r| r.offset + (addr - r.base_host_virt_addr))
                .ok_or_else(|| format!("a fault at {addr:#x}, outside every region"))?;
            let zero = removed || {
                file.read_exact_at(&mut page, offset)
                    .map_err(|e| format!("read the memory file at {offset:#x}: {e}"))?;
                page.iter().all(|&b| b == 0)
            };
            let done = if zero {
                uffd.zeropage(addr, PAGE)
            } else {
                uffd.copy(addr, &page)
            };
            match done.as_ref().map_err(|e| e.raw_os_error()) {
                Ok(()) => {
                    let mut l = log.lock().unwrap();
                    l.faults += 1;
                    if zero {
                        l.zeroed += 1;
                    } else {
                        l.copied += 1;
                    }
                }
                // Served by an earlier copy; make sure its waiters are awake.
                Err(Some(libc::EEXIST)) => {
                    let _ = uffd.wake(addr, PAGE);
                }
                Err(Some(libc::EAGAIN)) => retry.push(addr),
                Err(_) => return Err(format!("serve {addr:#x}: {}", done.unwrap_err())),
            }
        }
        pending = retry;
        // The VMM keeps the connection for the VM's life; its end means the VMM is gone.
        let mut b = [0u8; 1];
        match (&stream).read(&mut b) {
            Ok(0) => {
                log.lock().unwrap().vmm_closed = true;
                return Ok(());
            }
            Ok(_) => return Err("the VMM sent more than its one message".into()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("the connection: {e}")),
        }
    }
    Ok(())
}

/// Takes the VMM's message: its regions and the userfaultfd.
fn handshake(
    stream: &UnixStream,
    log: &Mutex<HandlerLog>,
) -> Result<(Vec<GuestRegionUffdMapping>, Userfaultfd), String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let (n, fd) = stream
        .recv_with_fd(&mut buf)
        .map_err(|e| format!("recvmsg: {e}"))?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let regions: Vec<GuestRegionUffdMapping> =
        serde_json::from_str(&text).map_err(|e| format!("the message {text:?}: {e}"))?;
    let fd = fd.ok_or_else(|| format!("no descriptor came with {text:?}"))?;
    let mut l = log.lock().unwrap();
    l.message = Some(text);
    l.regions = regions.clone();
    Ok((regions, Userfaultfd::from_fd(fd.into())))
}
