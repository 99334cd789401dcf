//! The in-guest side: the `kiln-agent` program. It sets the guest up when it is PID 1 ([`init`],
//! and its memory: zram swap and the rest, [`memory`]) and shuts it down on Ctrl-Alt-Del
//! ([`cad`]), reaps every child through one [`reaper`], listens on vsock (or a Unix socket for
//! host tests), and serves each connection ([`session`]) with a thread per
//! request ([`exec`], [`files`]). After a snapshot restore the host sends one `restored` request
//! ([`restore`]). It sets eth0 up from the host's settings ([`net`]) and forwards published ports
//! of a VM without a network interface over vsock ([`forward`]).
//!
//! Only the agent binary (and test harnesses standing in for a VM) should run this: the reaper
//! waits for *every* child of the process.

pub mod cad;
pub mod exec;
pub mod files;
pub mod forward;
pub mod init;
pub mod listen;
pub mod memory;
pub mod net;
pub mod procs;
pub mod reaper;
pub mod restore;
pub mod session;
pub mod spawn;
pub mod sys;
pub mod user;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use crate::link::{Outbox, Socket};
use crate::protocol::{Event, Message};
use listen::{ListenAddr, Listener};
use restore::{Kernel, LinuxKernel};

/// Writes one line to stderr (the console when PID 1). Never panics, unlike `eprintln!`.
pub fn log(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "kiln-agent: {args}");
}

/// What a shutdown request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// PID 1: stop everything, sync, unmount, reset the VM (Ctrl-Alt-Del does the same).
    Reboot,
    /// Under another init (or on the host): kill our processes and exit 0.
    Exit,
}

/// Agent-wide settings and state, shared by every connection.
pub struct Agent {
    shutdown: ShutdownMode,
    kernel: Box<dyn Kernel>,
    /// The default environment of execs, set by `restored`.
    env: Mutex<BTreeMap<String, String>>,
    /// Why the last `restored` failed, while it stands: a clone that could not be reseeded runs
    /// nothing, even an exec the host sent along with the step before it heard the answer.
    restore_failed: Mutex<Option<String>>,
}

impl Agent {
    /// An agent whose shutdown request does `shutdown`, changing the real kernel's RNG and clock
    /// on `restored`.
    pub fn new(shutdown: ShutdownMode) -> Agent {
        Agent {
            shutdown,
            kernel: Box::new(LinuxKernel),
            env: Mutex::new(BTreeMap::new()),
            restore_failed: Mutex::new(None),
        }
    }

    /// This agent with `kernel` in place of the real one (for tests: a clock that records).
    pub fn with_kernel(mut self, kernel: impl Kernel + 'static) -> Agent {
        self.kernel = Box::new(kernel);
        self
    }

    /// The kernel `restored` changes.
    pub fn kernel(&self) -> &dyn Kernel {
        self.kernel.as_ref()
    }

    fn env(&self) -> MutexGuard<'_, BTreeMap<String, String>> {
        self.env.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The environment every exec starts from (under its own `env`), beyond the built-in `PATH`,
    /// `HOME` and the like.
    pub fn default_env(&self) -> BTreeMap<String, String> {
        self.env().clone()
    }

    /// Replaces the default environment.
    pub fn set_default_env(&self, env: BTreeMap<String, String>) {
        *self.env() = env;
    }

    fn restore_failed(&self) -> MutexGuard<'_, Option<String>> {
        self.restore_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Records how the latest `restored` went: a failure (its message) blocks execs until one
    /// succeeds.
    pub fn set_restore_outcome(&self, failure: Option<String>) {
        *self.restore_failed() = failure;
    }

    /// Why execs are refused: the latest `restored` failed.
    pub fn exec_refusal(&self) -> Option<String> {
        self.restore_failed().as_ref().map(|why| {
            format!(
                "this VM's post-restore step failed ({why}); nothing runs until a restored \
                 request succeeds"
            )
        })
    }

    /// Acknowledges shutdown request `id`, then shuts down.
    pub fn shutdown(&self, outbox: &Outbox, id: u64) {
        outbox.send(&Message::Event(id, Event::Done { bytes: None }));
        outbox.flush(Duration::from_secs(1));
        match self.shutdown {
            ShutdownMode::Reboot => init::power_off(),
            ShutdownMode::Exit => {
                reaper::reaper().kill_all();
                std::process::exit(0);
            }
        }
    }
}

/// Serves one connection (for harnesses that accept connections themselves).
pub fn serve_connection(agent: Arc<Agent>, socket: Socket) {
    if let Err(e) = session::serve(agent, socket) {
        log(format_args!("connection: {e}"));
    }
}

/// Accepts connections on `listener` forever, a thread each.
pub fn accept_loop(agent: Arc<Agent>, listener: Listener) {
    loop {
        match listener.accept() {
            Ok(socket) => {
                let agent = agent.clone();
                if let Err(e) = thread::Builder::new()
                    .name("connection".into())
                    .spawn(move || serve_connection(agent, socket))
                {
                    log(format_args!("cannot start a connection thread: {e}"));
                }
            }
            Err(e) => {
                log(format_args!("accept: {e}"));
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

const USAGE: &str =
    "usage: kiln-agent [--listen vsock[:PORT]|unix:PATH]... [--forward vsock[:PORT]|unix:PATH]

Kiln's guest agent. As PID 1 it mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /tmp and /run,
sets the hostname (kiln.hostname= on the kernel command line, default kiln), sets up zram swap
(kiln.zram=off|SIZE|N%, default 50%; kiln.swappiness=N, default 100) with page-cluster 0 and
transparent huge pages off (none of it with $KILN_AGENT_NO_MEMORY_SETUP set), sets eth0 up from kiln.net= on the kernel command line, and resets
the VM on a shutdown request or Ctrl-Alt-Del (SIGINT). It listens on vsock port 1024 and
forwards port connections on vsock port 1025 unless --listen (and --forward) say otherwise.";

/// The `kiln-agent` program.
pub fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    sys::ensure_std_fds();
    let mut addrs = Vec::new();
    let mut forward = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let parsed = match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "-V" | "--version" => {
                println!("kiln-agent {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "--listen" => args
                .next()
                .ok_or_else(|| "--listen needs a value".to_string())
                .and_then(|v| ListenAddr::parse(&v)),
            "--forward" => {
                match args
                    .next()
                    .ok_or_else(|| "--forward needs a value".to_string())
                    .and_then(|v| ListenAddr::parse(&v))
                {
                    Ok(a) => {
                        forward = Some(a);
                        continue;
                    }
                    Err(msg) => {
                        log(format_args!("{msg}"));
                        return ExitCode::from(2);
                    }
                }
            }
            other => match other.strip_prefix("--listen=") {
                Some(v) => ListenAddr::parse(v),
                // As PID 1 the kernel passes unknown command-line words as arguments: ignore them.
                None if pid1 => continue,
                None => Err(format!("unknown argument {other:?}")),
            },
        };
        match parsed {
            Ok(a) => addrs.push(a),
            Err(msg) => {
                log(format_args!("{msg}"));
                return ExitCode::from(2);
            }
        }
    }
    if addrs.is_empty() {
        addrs.push(ListenAddr::Vsock(crate::protocol::AGENT_PORT));
        forward.get_or_insert(ListenAddr::Vsock(crate::protocol::FORWARD_PORT));
    }
    let mode = if pid1 {
        init::setup();
        // Before the listeners: no command runs before its memory is set up.
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        // PID 1 of a namespace on a host (the agent's own tests) must leave the host's zram,
        // swappiness and huge pages alone.
        let host_test = std::env::var_os("KILN_AGENT_NO_MEMORY_SETUP").is_some();
        match memory::MemorySettings::from_cmdline(&cmdline) {
            Ok(_) if host_test => {}
            Ok(settings) => {
                for problem in memory::setup(&settings) {
                    log(format_args!("memory setup: {problem}"));
                }
            }
            Err(e) => log(format_args!(
                "{e}; no zram, memory left as the kernel set it"
            )),
        }
        // Before any thread starts: it blocks SIGINT in this thread for all threads to inherit.
        cad::shut_down_on_ctrl_alt_del();
        ShutdownMode::Reboot
    } else {
        // Orphans of our processes come back to us, so the reaper collects them too.
        // SAFETY: prctl with an integer argument; no memory is passed.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        ShutdownMode::Exit
    };
    reaper::reaper();
    let agent = Arc::new(Agent::new(mode));
    let mut listeners = Vec::new();
    for addr in &addrs {
        match Listener::bind(addr) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                log(format_args!("cannot listen on {addr:?}: {e}"));
                if pid1 {
                    init::power_off();
                }
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(addr) = &forward {
        match Listener::bind(addr) {
            Ok(l) => {
                thread::spawn(move || forward::accept_loop(l));
            }
            // Published ports of a VM without a NIC stop working; commands still run.
            Err(e) => log(format_args!(
                "cannot listen for forwarded ports on {addr:?}: {e}"
            )),
        }
    }
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let agent = agent.clone();
            thread::spawn(move || accept_loop(agent, l))
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    ExitCode::SUCCESS
}
