//! The first contact with a restored VM in one round trip (`client::restore_and_exec`), against
//! an agent in this process behind a stand-in for the VMM's vsock socket: the clone step and
//! the first command travel in the same write as `CONNECT` and the hello, the command sees the
//! clone step's environment, a failed clone step keeps the command from running at all, and a
//! guest that is not listening yet is waited for.
//!
//! Every child of this test binary goes through the agent's reaper: nothing here may use
//! `std::process`.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kiln_agent::client::{self, Error, ExecOutput};
use kiln_agent::guest::restore::Kernel;
use kiln_agent::guest::{Agent, ShutdownMode, serve_connection};
use kiln_agent::link::Socket;
use kiln_agent::protocol::{ErrorKind, ExecSpec, ExitStatus};

/// A kernel whose clock is recorded, not stepped, and whose RNG reseed can be made to fail.
#[derive(Clone, Default)]
struct TestKernel {
    fail_reseed: bool,
    clock_set_to: Arc<Mutex<Vec<u64>>>,
}

impl Kernel for TestKernel {
    fn add_entropy(&self, _bytes: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn reseed_crng(&self) -> io::Result<()> {
        if self.fail_reseed {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        } else {
            Ok(())
        }
    }
    fn realtime_ns(&self) -> io::Result<i128> {
        Ok(1_000_000_000_000_000_000)
    }
    fn set_realtime_ns(&self, ns: u64) -> io::Result<()> {
        self.clock_set_to.lock().unwrap().push(ns);
        Ok(())
    }
    fn configure_net(&self, _: &kiln_agent::protocol::Net) -> io::Result<()> {
        Ok(())
    }
}

/// What the stand-in vsock socket saw.
#[derive(Default)]
struct Seen {
    /// Bytes already waiting behind each accepted CONNECT line when it was read.
    queued_behind_connect: Mutex<Vec<usize>>,
    /// Connections refused so far.
    refused: AtomicUsize,
}

/// Stands in for a VMM's vsock socket at `path`: refuses (closes) the first `refuse`
/// connections as a guest that is not listening yet would, then answers `OK` and hands the
/// stream, bytes behind the CONNECT line included, to `agent`.
fn vsock_socket(path: &Path, agent: Arc<Agent>, refuse: usize) -> Arc<Seen> {
    let listener = UnixListener::bind(path).unwrap();
    let seen = Arc::new(Seen::default());
    let seen2 = seen.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut line = Vec::new();
            let mut byte = [0u8];
            while conn.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            assert_eq!(line, b"CONNECT 1024");
            if seen2.refused.load(Ordering::SeqCst) < refuse {
                seen2.refused.fetch_add(1, Ordering::SeqCst);
                continue; // dropped: the client sees the connection close
            }
            // The client wrote everything in one go: give it a moment to land, then count.
            thread::sleep(Duration::from_millis(50));
            let mut buf = [0u8; 4096];
            // SAFETY: a non-blocking peek into a local buffer of its full length.
            let queued = unsafe {
                libc::recv(
                    conn.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            seen2
                .queued_behind_connect
                .lock()
                .unwrap()
                .push(queued.max(0) as usize);
            conn.write_all(b"OK 1025\n").unwrap();
            let agent = agent.clone();
            thread::spawn(move || serve_connection(agent, Socket::from_fd(conn.into())));
        }
    });
    seen
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-pipelined-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_clone_step_and_the_first_command_go_with_the_hello() {
    let dir = scratch("ok");
    let kernel = TestKernel::default();
    let agent = Arc::new(Agent::new(ShutdownMode::Exit).with_kernel(kernel.clone()));
    let uds = dir.join("v.sock");
    let seen = vsock_socket(&uds, agent, 0);

    let spec = ExecSpec::new(["sh", "-c", "echo \"clone $WHO\""]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = client::restore_and_exec(&uds, deadline, env(&[("WHO", "a")]), None, spec)
        .expect("restore and exec");
    assert_eq!(
        first.restored.entropy_bytes as usize,
        client::RESTORE_ENTROPY
    );
    assert_eq!(kernel.clock_set_to.lock().unwrap().len(), 1);
    let mut stdout = Vec::new();
    let mut exec = first.exec.expect("the command started");
    let status = loop {
        match exec.next_output().unwrap() {
            Some(ExecOutput::Stdout(b)) => stdout.extend(b),
            Some(ExecOutput::Stderr(_)) => {}
            Some(ExecOutput::Exit(s)) => break s,
            None => panic!("no exit"),
        }
    };
    assert_eq!(
        (status, stdout.as_slice()),
        (ExitStatus::Exited(0), &b"clone a\n"[..])
    );
    // Hello and both requests were already behind the CONNECT line: one write, one round trip.
    let queued = seen.queued_behind_connect.lock().unwrap().clone();
    assert_eq!(queued.len(), 1);
    assert!(queued[0] > 100, "only {} bytes followed CONNECT", queued[0]);
    // The client stays usable for later requests.
    assert_eq!(first.client.ping().unwrap(), env!("CARGO_PKG_VERSION"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_clone_step_keeps_the_command_from_running() {
    let dir = scratch("fail");
    let kernel = TestKernel {
        fail_reseed: true,
        ..Default::default()
    };
    let agent = Arc::new(Agent::new(ShutdownMode::Exit).with_kernel(kernel));
    let uds = dir.join("v.sock");
    vsock_socket(&uds, agent.clone(), 0);
    let marker = dir.join("ran");
    let spec = ExecSpec::new(["touch", marker.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    match client::restore_and_exec(&uds, deadline, BTreeMap::new(), None, spec.clone()) {
        Err(Error::Agent { kind, message, .. }) => {
            assert_eq!(kind, ErrorKind::PermissionDenied);
            assert!(message.contains("RNDRESEEDCRNG"), "{message}");
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("the clone step cannot have succeeded"),
    }
    // The exec sent along did not run, and none runs later, on any connection.
    thread::sleep(Duration::from_millis(200));
    assert!(
        !marker.exists(),
        "the command ran in a clone that was not reseeded"
    );
    let (ours, theirs) = UnixStream::pair().unwrap();
    thread::spawn(move || serve_connection(agent, Socket::from_fd(theirs.into())));
    let c = client::from_socket(Socket::from_fd(ours.into()), Duration::from_secs(10)).unwrap();
    match c.run(spec) {
        Err(Error::CouldNotStart { message, .. }) => {
            assert!(message.contains("post-restore step failed"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(!marker.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_guest_not_listening_yet_is_waited_for() {
    let dir = scratch("wait");
    let agent = Arc::new(Agent::new(ShutdownMode::Exit).with_kernel(TestKernel::default()));
    let uds = dir.join("v.sock");
    let seen = vsock_socket(&uds, agent, 3);
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = client::restore_and_exec(
        &uds,
        deadline,
        BTreeMap::new(),
        None,
        ExecSpec::new(["true"]),
    )
    .expect("restore and exec after three refusals");
    assert_eq!(seen.refused.load(Ordering::SeqCst), 3);
    assert_eq!(
        first.exec.unwrap().output().unwrap().status,
        ExitStatus::Exited(0)
    );
    // A socket where nothing ever answers runs out of time with the last reason.
    let nowhere = dir.join("nothing.sock");
    match client::restore_and_exec(
        &nowhere,
        Instant::now() + Duration::from_millis(300),
        BTreeMap::new(),
        None,
        ExecSpec::new(["true"]),
    ) {
        Err(Error::NotReady { .. }) => {}
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("nothing listens there"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}
