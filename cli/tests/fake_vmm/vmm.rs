#![allow(dead_code)] // each test binary uses a different subset of these helpers
//! A stand-in for `kiln-vmm`, shared by the CLI's test binaries: run with `KILN_FAKE_VMM` set,
//! the test binary itself acts as the VMM. It logs its command line, writes a console log, and
//! serves the real agent code (in-process) behind a Firecracker-style vsock socket: at `--vsock`'s
//! `uds=` when booted, or at the load request's `vsock_override` when started with only
//! `--api-sock`, whose requests it answers and logs. What the guest would do is real; only the VM
//! is missing.
//!
//! The in-process agent's kernel is a stand-in too: `restored` must not step this host's clock.
//! A spy between the vsock socket and the agent logs the `restored` and `exec` requests it sees.
//! A snapshot ends every host connection to the agent, as kiln-vmm's vsock transport reset does.
//!
//! Modes (`KILN_FAKE_VMM`): `agent` serves; `fail` exits 1 at once; `hang` never answers;
//! `load-fault` and `create-fault` refuse those API requests with a fault message;
//! `silent-agent` has an agent that says hello and then nothing ever again. In any mode, a
//! snapshot is refused as in `create-fault` while the file `KILN_FAKE_VMM_CREATE_FAULT_IF` names
//! exists (so a test can fail one snapshot of a VM that was made fine).

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use kiln_agent::guest::restore::{Kernel, LinuxKernel};
use kiln_agent::guest::{Agent, ShutdownMode, serve_connection};
use kiln_agent::link::Socket;
use kiln_agent::protocol::frame::encode_frame;
use kiln_agent::protocol::{Message, Request, read_frame};
use kiln_api::requests::instance::{InstanceInfo, InstanceState};
use kiln_api::requests::vm::{VmState, VmStateBody};
use kiln_api::{ApiRequest, ApiResponse, ApiServer};

/// The fault the `load-fault` mode answers with.
pub const LOAD_FAULT: &str = "snapshot/load: memory file is 3 bytes, the VM state says 256 MiB";
/// The fault the `create-fault` mode answers with.
pub const CREATE_FAULT: &str = "snapshot/create: cannot create /x/memory: Permission denied";

/// Runs `tests` (or, with `KILN_FAKE_VMM` set, the fake VMM): the `main` of a harness-less test
/// binary.
pub fn main(tests: &[(&str, fn())]) {
    if let Ok(mode) = std::env::var("KILN_FAKE_VMM") {
        fake_vmm(&mode);
        return;
    }
    let mut failed = 0;
    for (name, test) in tests {
        match std::panic::catch_unwind(test) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    println!("{} passed, {failed} failed", tests.len() - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}

// ---- the fake VMM ----

fn fake_vmm(mode: &str) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        let i = args.iter().position(|a| a == flag)?;
        args.get(i + 1).cloned()
    };
    if let Ok(log) = std::env::var("KILN_FAKE_VMM_LOG") {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let blocked = status.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
        let text = format!(
            "pid {}\n{blocked}\n{}\n",
            std::process::id(),
            args.join("\n")
        );
        std::fs::write(&log, text).unwrap();
        let ns = std::fs::read_link("/proc/self/ns/net").unwrap();
        std::fs::write(format!("{log}.netns"), ns.to_string_lossy().as_bytes()).unwrap();
    }
    std::fs::write(value("--serial-out").unwrap(), "fake console: booting\n").unwrap();
    match mode {
        "fail" => {
            eprintln!("kiln-vmm: guest memory: out of memory");
            std::process::exit(1);
        }
        "hang" => thread::sleep(Duration::from_secs(3600)),
        _ => {}
    }
    if let Some(api_sock) = value("--api-sock") {
        serve_api(mode, Path::new(&api_sock));
        return;
    }
    let vsock = value("--vsock").unwrap();
    let uds = vsock
        .split(',')
        .find_map(|p| p.strip_prefix("uds="))
        .unwrap();
    serve_vsock(Path::new(uds));
}

/// Appends one line to `$KILN_FAKE_VMM_API_LOG`, if set.
fn log_line(line: &str) {
    if let Ok(path) = std::env::var("KILN_FAKE_VMM_API_LOG") {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(format!("{line}\n").as_bytes()).unwrap();
    }
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap()
}

/// Answers API requests like a VMM that has a running VM (or can load one, or boot one
/// configured over the API), logging each change as `METHOD PATH BODY`. A snapshot writes small
/// state and memory files, so callers that keep them find them.
fn serve_api(mode: &str, sock: &Path) {
    let server = ApiServer::bind(sock).unwrap();
    let mut state = InstanceState::Running;
    let mode = mode.to_string();
    let mut vsock_uds: Option<PathBuf> = None;
    server
        .serve(move |request| match request {
            ApiRequest::PutBootSource(_)
            | ApiRequest::PutMachineConfig(_)
            | ApiRequest::PutDrive(_) => ApiResponse::NoContent,
            ApiRequest::PutVsock(v) => {
                vsock_uds = Some(v.uds_path);
                ApiResponse::NoContent
            }
            // As kiln-vmm would fail to attach it, a TAP missing from the VMM's namespace is
            // refused.
            ApiRequest::PutNetworkInterface(n) => {
                log_line(&format!("PUT /network-interfaces {}", json(&n)));
                match tap_missing(&n.host_dev_name) {
                    Some(fault) => ApiResponse::fault(fault),
                    None => ApiResponse::NoContent,
                }
            }
            ApiRequest::PutAction(kiln_api::requests::actions::Action::InstanceStart) => {
                log_line("PUT /actions {\"action_type\":\"InstanceStart\"}");
                if let Some(uds) = vsock_uds.take() {
                    let listener = UnixListener::bind(&uds).unwrap();
                    thread::spawn(move || accept_loop(listener));
                }
                ApiResponse::NoContent
            }
            ApiRequest::GetInstanceInfo => ApiResponse::json(&InstanceInfo::new("fake", state)),
            ApiRequest::PatchVm(s) => {
                log_line(&format!("PATCH /vm {}", json(&VmStateBody { state: s })));
                state = match s {
                    VmState::Paused => InstanceState::Paused,
                    VmState::Resumed => InstanceState::Running,
                };
                ApiResponse::NoContent
            }
            ApiRequest::CreateSnapshot(body) => {
                log_line(&format!("PUT /snapshot/create {}", json(&body)));
                let fault_file = std::env::var_os("KILN_FAKE_VMM_CREATE_FAULT_IF");
                if mode == "create-fault" || fault_file.is_some_and(|f| Path::new(&f).exists()) {
                    return ApiResponse::fault(CREATE_FAULT);
                }
                std::fs::write(&body.snapshot_path, b"fake vmstate").unwrap();
                std::fs::write(&body.mem_file_path, b"fake memory").unwrap();
                reset_connections();
                ApiResponse::NoContent
            }
            ApiRequest::LoadSnapshot(body) => {
                log_line(&format!("PUT /snapshot/load {}", json(&body)));
                if mode == "load-fault" {
                    return ApiResponse::fault(LOAD_FAULT);
                }
                if let Some(fault) = body
                    .network_overrides
                    .iter()
                    .find_map(|o| tap_missing(&o.host_dev_name))
                {
                    return ApiResponse::fault(fault);
                }
                if let Some(ws) = body.working_set_path.as_ref().filter(|p| !p.is_file()) {
                    return ApiResponse::fault(format!(
                        "working_set_path {}: not found",
                        ws.display()
                    ));
                }
                if let Some(o) = body.vsock_override {
                    let listener = UnixListener::bind(&o.uds_path).unwrap();
                    thread::spawn(move || accept_loop(listener));
                }
                ApiResponse::NoContent
            }
            ApiRequest::SaveWorkingSet(body) => {
                log_line(&format!("PUT /snapshot/working-set {}", json(&body)));
                std::fs::write(&body.path, b"fake working set").unwrap();
                ApiResponse::NoContent
            }
            other => ApiResponse::fault(format!("the fake VMM does not do {other:?}")),
        })
        .unwrap();
}

/// Why the TAP `name` cannot be attached: it is not in this process's network namespace.
fn tap_missing(name: &str) -> Option<String> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads the valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index == 0).then(|| format!("network interface: no TAP {name} in the VMM's namespace"))
}

fn serve_vsock(uds: &Path) {
    accept_loop(UnixListener::bind(uds).unwrap());
}

/// A kernel for the in-process agent that changes nothing on this host.
struct HostSafeKernel;

impl Kernel for HostSafeKernel {
    fn add_entropy(&self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn reseed_crng(&self) -> io::Result<()> {
        Ok(())
    }
    fn realtime_ns(&self) -> io::Result<i128> {
        LinuxKernel.realtime_ns()
    }
    fn set_realtime_ns(&self, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn configure_net(&self, _: &kiln_agent::protocol::Net) -> io::Result<()> {
        Ok(())
    }
}

/// The host's connections to the agent, ended by a snapshot (as a transport reset ends them).
static CONNECTIONS: Mutex<Vec<UnixStream>> = Mutex::new(Vec::new());

/// Ends every host connection to the agent, as kiln-vmm's transport reset does at a snapshot.
fn reset_connections() {
    let conns = std::mem::take(&mut *CONNECTIONS.lock().unwrap_or_else(|p| p.into_inner()));
    for c in conns {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
}

/// Accepts `CONNECT 1024` connections and serves the agent on each, behind the spy.
fn accept_loop(listener: UnixListener) {
    let agent = Arc::new(Agent::new(ShutdownMode::Exit).with_kernel(HostSafeKernel));
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { return };
        let agent = agent.clone();
        thread::spawn(move || {
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while conn.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            if line == b"CONNECT 1025" {
                // The agent's port forwarding, for published ports of a VM without a NIC.
                conn.write_all(b"OK 1073741825\n").unwrap();
                kiln_agent::guest::forward::serve(Socket::from_fd(conn.into()));
                return;
            }
            if line != b"CONNECT 1024" {
                return;
            }
            conn.write_all(b"OK 1073741824\n").unwrap();
            if std::env::var("KILN_FAKE_VMM").as_deref() == Ok("silent-agent") {
                silent_agent(conn);
                return;
            }
            if let Ok(c) = conn.try_clone() {
                CONNECTIONS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(c);
            }
            let (to_agent, agent_end) = UnixStream::pair().unwrap();
            thread::spawn(move || serve_connection(agent, Socket::from_fd(agent_end.into())));
            spy(conn, to_agent);
        });
    }
}

/// Answers the hello, then reads everything and answers nothing.
fn silent_agent(mut conn: UnixStream) {
    if read_frame(&mut conn).is_err() {
        return;
    }
    let hello = Message::Hello(kiln_agent::protocol::Hello {
        version: kiln_agent::protocol::PROTOCOL_VERSION,
        software: "silent".into(),
        revision: 0,
    });
    let _ = conn.write_all(&hello.encode());
    let mut buf = [0u8; 4096];
    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
}

/// Copies the host's frames to the agent and the agent's bytes back, logging `restored` and
/// `exec` requests as `agent OP BODY`.
fn spy(host: UnixStream, agent: UnixStream) {
    let (mut from_agent, mut to_host) = (agent.try_clone().unwrap(), host.try_clone().unwrap());
    thread::spawn(move || {
        let _ = io::copy(&mut from_agent, &mut to_host);
        let _ = to_host.shutdown(std::net::Shutdown::Both);
    });
    let (mut host, mut agent) = (host, agent);
    while let Ok(Some(frame)) = read_frame(&mut host) {
        let bytes = encode_frame(frame.kind, frame.id, &[&frame.payload]);
        match Message::decode(frame) {
            Ok(Message::Request(_, Request::Restored(spec))) => {
                log_line(&format!("agent restored {}", json(&spec)));
            }
            Ok(Message::Request(_, Request::Exec(spec))) => {
                log_line(&format!("agent exec {}", json(&spec.argv)));
            }
            _ => {}
        }
        if agent.write_all(&bytes).is_err() {
            break;
        }
    }
    let _ = agent.shutdown(std::net::Shutdown::Write);
}
