//! A kiln-vmm serving its API socket, as the API-driven tests drive it: started with extra
//! arguments and its output thrown away, shown or collected, asked over the socket with
//! `kiln_api`'s client, and killed and reaped when dropped (so a failing test leaves no VMM
//! behind).

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kiln_api::client::request;
use serde_json::Value;

/// How long the API socket may take to appear on a loaded 2-core machine.
const SOCKET_LIMIT: Duration = Duration::from_secs(60);

/// Where one of kiln-vmm's output streams goes.
#[derive(Clone, Copy)]
pub enum Stream {
    /// Thrown away.
    Null,
    /// Straight to the test's own stream, as the VMM writes it.
    Inherit,
    /// Read by a thread as it comes (so a full pipe never blocks the VMM), for
    /// [`ApiVmm::stdout`] and [`ApiVmm::stderr`].
    Collect,
}

impl Stream {
    fn stdio(self) -> Stdio {
        match self {
            Stream::Null => Stdio::null(),
            Stream::Inherit => Stdio::inherit(),
            Stream::Collect => Stdio::piped(),
        }
    }
}

/// How to start an [`ApiVmm`]; from [`ApiVmm::options`].
pub struct ApiVmmOptions {
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    stdout: Stream,
    stderr: Stream,
}

impl ApiVmmOptions {
    /// One more command-line argument after `--api-sock PATH`.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// An environment variable for the VMM.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Where stdout (the guest's console) goes; thrown away unless set.
    pub fn stdout(mut self, stream: Stream) -> Self {
        self.stdout = stream;
        self
    }

    /// Where stderr (the VMM's log) goes; collected unless set.
    pub fn stderr(mut self, stream: Stream) -> Self {
        self.stderr = stream;
        self
    }

    /// Starts kiln-vmm serving `dir/NAME.sock` and waits for the socket to appear.
    pub fn start(self, dir: &Path, name: &str) -> ApiVmm {
        let sock = dir.join(format!("{name}.sock"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-vmm"))
            .arg("--api-sock")
            .arg(&sock)
            .args(&self.args)
            .envs(self.envs)
            .stdin(Stdio::null())
            .stdout(self.stdout.stdio())
            .stderr(self.stderr.stdio())
            .spawn()
            .expect("start kiln-vmm");
        // Owned by the ApiVmm before anything can fail, so a failure still kills the process.
        let mut vmm = ApiVmm {
            stdout: Collected::new(child.stdout.take()),
            stderr: Collected::new(child.stderr.take()),
            child,
            sock,
        };
        let start = Instant::now();
        while !vmm.sock.exists() {
            vmm.assert_alive("waiting for the API socket");
            assert!(
                start.elapsed() < SOCKET_LIMIT,
                "the API socket never appeared; stderr:\n{}",
                vmm.stderr()
            );
            thread::sleep(Duration::from_millis(5));
        }
        vmm
    }
}

/// A running `kiln-vmm --api-sock`.
pub struct ApiVmm {
    child: Child,
    sock: PathBuf,
    stdout: Collected,
    stderr: Collected,
}

impl ApiVmm {
    /// Starts kiln-vmm serving `dir/NAME.sock`, stdout thrown away and stderr collected.
    pub fn start(dir: &Path, name: &str) -> Self {
        Self::options().start(dir, name)
    }

    /// Options to start one with other arguments or output.
    pub fn options() -> ApiVmmOptions {
        ApiVmmOptions {
            args: Vec::new(),
            envs: Vec::new(),
            stdout: Stream::Null,
            stderr: Stream::Collect,
        }
    }

    /// The API socket's path.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One request (no body when `body` is empty); the status and the answer's body.
    pub fn call(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let body = (!body.is_empty()).then_some(body);
        request(&self.sock, method, path, body).expect("API call")
    }

    /// A request that must get 204 No Content, as every accepted PUT and PATCH does.
    pub fn ok(&self, method: &str, path: &str, body: &str) {
        let (code, text) = self.call(method, path, body);
        assert_eq!(code, 204, "{method} {path} {body}: {text}");
    }

    /// A request that must get any 2xx; the answer's body.
    pub fn success(&self, method: &str, path: &str, body: &str) -> String {
        let (code, text) = self.call(method, path, body);
        assert!((200..300).contains(&code), "{method} {path}: {code} {text}");
        text
    }

    /// `GET path`, which must get 200 with JSON.
    pub fn json(&self, path: &str) -> Value {
        let (code, text) = self.call("GET", path, "");
        assert_eq!(code, 200, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// A request that must be refused with 400; its `fault_message`.
    pub fn fault(&self, method: &str, path: &str, body: &str) -> String {
        let (code, text) = self.call(method, path, body);
        assert_eq!(code, 400, "{method} {path} {body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        v["fault_message"].as_str().unwrap().to_string()
    }

    /// `PUT /snapshot/create` of kind `kind` ("Full" or "Diff") to `dir/NAME.state` and
    /// `dir/NAME.mem`, which must get 204; those two paths.
    pub fn snapshot(&self, dir: &Path, name: &str, kind: &str) -> (PathBuf, PathBuf) {
        let (state, mem) = (
            dir.join(format!("{name}.state")),
            dir.join(format!("{name}.mem")),
        );
        let body = format!(
            r#"{{"snapshot_type": "{kind}", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            mem.display()
        );
        self.ok("PUT", "/snapshot/create", &body);
        (state, mem)
    }

    /// Fails the test, with the collected stderr (a seccomp stop says which call), if the
    /// process has ended.
    pub fn assert_alive(&mut self, phase: &str) {
        if let Some(status) = self.child.try_wait().expect("wait for kiln-vmm") {
            self.stderr.finish();
            panic!(
                "{phase}: kiln-vmm ended ({status}); stderr:\n{}",
                self.stderr()
            );
        }
    }

    /// Waits up to `limit` for the process to end by itself; its exit status. From then on the
    /// collected output is complete.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for kiln-vmm") {
                self.stdout.finish();
                self.stderr.finish();
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "kiln-vmm did not end within {limit:?}; stderr:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process and reaps it; from then on the collected output is complete.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stdout.finish();
        self.stderr.finish();
    }

    /// What stdout has collected so far (empty unless [`Stream::Collect`]).
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    /// What stderr has collected so far (empty unless [`Stream::Collect`]).
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }
}

impl Drop for ApiVmm {
    fn drop(&mut self) {
        // Not `kill()`: a reader left waiting on a pipe some other process holds must not hang
        // the test here.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One output stream, read by a thread of its own as it comes.
struct Collected {
    bytes: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
}

impl Collected {
    fn new(pipe: Option<impl Read + Send + 'static>) -> Self {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let reader = pipe.map(|mut pipe| {
            let sink = bytes.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        });
        Self { bytes, reader }
    }

    /// Waits for the reader to reach the end of the pipe (the process has ended).
    fn finish(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).into_owned()
    }
}
