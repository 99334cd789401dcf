//! The post-restore step end to end, with the agent in this process (so its kernel can be a
//! recording one: the host's clock is never stepped) serving socket pairs: the clock is set to
//! the time sent, the environment reaches later execs on every connection, and bad requests are
//! refused naming the field. The RNG ioctls run for real as root (harmless: they add to the
//! host's pool and reseed it).
//!
//! Every child of this test binary goes through the agent's reaper: nothing here may use
//! `std::process`.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_agent::client::{self, Client, Error};
use kiln_agent::guest::restore::{Kernel, LinuxKernel};
use kiln_agent::guest::{Agent, ShutdownMode, serve_connection};
use kiln_agent::link::Socket;
use kiln_agent::protocol::frame::encode_frame;
use kiln_agent::protocol::message::KIND_REQUEST;
use kiln_agent::protocol::{
    ErrorKind, Event, ExecSpec, Hello, Message, PROTOCOL_VERSION, read_frame,
};

fn root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Real RNG ioctls when root (recorded otherwise); a clock that reads `now_ns` and records.
#[derive(Clone, Default)]
struct TestKernel {
    entropy: Arc<Mutex<Vec<usize>>>,
    clock_set_to: Arc<Mutex<Vec<u64>>>,
}

const FAKE_NOW_NS: i128 = 1_000_000_000_000_000_000;

impl Kernel for TestKernel {
    fn add_entropy(&self, bytes: &[u8]) -> io::Result<()> {
        self.entropy.lock().unwrap().push(bytes.len());
        if root() {
            LinuxKernel.add_entropy(bytes)?;
        }
        Ok(())
    }
    fn reseed_crng(&self) -> io::Result<()> {
        if root() {
            LinuxKernel.reseed_crng()?;
        }
        Ok(())
    }
    fn realtime_ns(&self) -> io::Result<i128> {
        Ok(FAKE_NOW_NS)
    }
    fn set_realtime_ns(&self, ns: u64) -> io::Result<()> {
        self.clock_set_to.lock().unwrap().push(ns);
        Ok(())
    }
}

/// A new connection to `agent`, served on a thread of this process.
fn connect(agent: &Arc<Agent>) -> UnixStream {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let agent = agent.clone();
    thread::spawn(move || serve_connection(agent, Socket::from_fd(theirs.into())));
    ours
}

fn client(agent: &Arc<Agent>) -> Client {
    client::from_socket(
        Socket::from_fd(connect(agent).into()),
        Duration::from_secs(10),
    )
    .unwrap()
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn stdout_of(c: &Client, spec: ExecSpec) -> String {
    let out = c.run(spec).unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn restored_sets_the_clock_and_the_env_of_later_execs() {
    let kernel = TestKernel::default();
    let agent = Arc::new(Agent::new(ShutdownMode::Exit).with_kernel(kernel.clone()));
    let c = client(&agent);

    let time = UNIX_EPOCH + Duration::new(1_700_000_000, 123);
    let done = c
        .restored(&[9; 48], time, env(&[("A", "1"), ("B", "2")]))
        .unwrap();
    let sent_ns = 1_700_000_000_000_000_123u64;
    assert_eq!(done.entropy_bytes, 48);
    assert_eq!(
        i128::from(done.clock_step_ns),
        i128::from(sent_ns) - FAKE_NOW_NS
    );
    assert_eq!(*kernel.clock_set_to.lock().unwrap(), [sent_ns]);
    assert_eq!(*kernel.entropy.lock().unwrap(), [48]);

    // The environment sits over the built-in variables and under each exec's own, and holds
    // for every connection, not only the one that sent it.
    let mut spec = ExecSpec::new(["sh", "-c", "echo \"$A|$B|$PATH\""]);
    spec.env.insert("B".into(), "mine".into());
    let path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    assert_eq!(stdout_of(&c, spec.clone()), format!("1|mine|{path}\n"));
    let other = client(&agent);
    assert_eq!(stdout_of(&other, spec), format!("1|mine|{path}\n"));

    // The convenience sends fresh host entropy and the host's time; a later restored replaces
    // the environment.
    let before = SystemTime::now();
    let done = other.restored_now(env(&[("PATH", "/bin")])).unwrap();
    let after = SystemTime::now();
    assert_eq!(done.entropy_bytes as usize, client::RESTORE_ENTROPY);
    let set = *kernel.clock_set_to.lock().unwrap().last().unwrap();
    let ns = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    assert!(ns(before) <= set && set <= ns(after), "{set}");
    let spec = ExecSpec::new(["sh", "-c", "echo \"$A|$PATH\""]);
    assert_eq!(stdout_of(&c, spec), "|/bin\n");
}

/// A raw connection that already exchanged hellos.
fn raw(agent: &Arc<Agent>) -> UnixStream {
    let mut s = connect(agent);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        software: "restored test".into(),
        revision: 0,
    });
    s.write_all(&hello.encode()).unwrap();
    let first = Message::decode(read_frame(&mut s).unwrap().unwrap()).unwrap();
    assert!(matches!(first, Message::Hello(_)));
    s
}

#[test]
fn bad_restored_requests_name_the_field() {
    let kernel = TestKernel::default();
    let agent = Arc::new(Agent::new(ShutdownMode::Exit).with_kernel(kernel.clone()));
    let mut s = raw(&agent);
    let hex32 = "ab".repeat(32);
    let cases = [
        (r#"{"op":"restored","time_ns":1}"#.to_string(), "entropy"),
        (
            format!(r#"{{"op":"restored","entropy":"{hex32}"}}"#),
            "time_ns",
        ),
        (
            format!(
                r#"{{"op":"restored","entropy":"{}","time_ns":1}}"#,
                "ab".repeat(16)
            ),
            "entropy: 16 bytes",
        ),
        (
            format!(r#"{{"op":"restored","entropy":"{hex32}","time_ns":1,"envv":{{}}}}"#),
            "envv",
        ),
        (
            format!(r#"{{"op":"restored","entropy":"{hex32}","time_ns":1,"env":{{"A=":"x"}}}}"#),
            "env: variable name \"A=\"",
        ),
    ];
    for (id, (body, named)) in (1..).zip(&cases) {
        s.write_all(&encode_frame(KIND_REQUEST, id, &[body.as_bytes()]))
            .unwrap();
        let reply = Message::decode(read_frame(&mut s).unwrap().unwrap()).unwrap();
        match reply {
            Message::Event(got, Event::Error(info))
                if got == id && info.kind == ErrorKind::BadRequest =>
            {
                assert!(info.message.contains(named), "{body}: {}", info.message);
            }
            other => panic!("{body}: {other:?}"),
        }
    }
    assert!(kernel.clock_set_to.lock().unwrap().is_empty());
    assert!(kernel.entropy.lock().unwrap().is_empty());
    assert!(agent.default_env().is_empty());

    // Through the client: the agent's answer comes back as a bad request.
    let c = client(&agent);
    match c.restored(&[1; 8], SystemTime::now(), BTreeMap::new()) {
        Err(Error::Agent { kind, message, .. }) => {
            assert_eq!(kind, ErrorKind::BadRequest);
            assert_eq!(message, "entropy: 8 bytes; 32 to 512 are needed");
        }
        other => panic!("{other:?}"),
    }
}
