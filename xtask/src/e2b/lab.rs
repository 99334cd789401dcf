//! kilnd in the lab, served to the host: L1 starts kilnd with its E2B listener and its own API on
//! TCP, builds the `base` template, and waits while the host drives it through forwarded ports
//! (the E2B suite, `bench e2b`); then the host sends its status back and L1 exits with it.

use std::process::Command;
use std::time::{Duration, Instant};

use super::{Forwarded, free_port, random_key, venv};
use crate::lab::{self, LabRun, LabStatus};
use crate::util::{self, Result};

/// The port kilnd's E2B listener uses inside L1.
const L1_E2B_PORT: u16 = 3000;
/// The port kilnd's own API (`--listen`, bearer token) uses inside L1.
const L1_API_PORT: u16 = 3002;
/// The port L1 waits on for the host's verdict.
const L1_CONTROL_PORT: u16 = 3001;
/// The line L1 prints after the first command of a shared boot, before its status.
const BEFORE_MARK: &str = "e2b-l1: the lab tests exited ";
/// How long L1 may take to have kilnd and the `base` template ready.
const READY_WITHIN: Duration = Duration::from_secs(900);
/// How long the whole lab run may take.
const LAB_TIMEOUT: Duration = Duration::from_secs(2400);

/// Runs in L1 (from /share): first the command in its arguments if any (the lab tests of a
/// shared boot), then kilnd with its E2B listener on eth0, the `base` template, a file only L1
/// has (the suite checks that no sandbox path reaches it), then waits for the verdict and exits
/// with it. The first command's status is in its output line ([`BEFORE_MARK`]).
const L1_SCRIPT: &str = r#"#!/bin/sh
before=0
if [ $# -gt 0 ]; then
  "$@"
  before=$?
  echo "@BEFORE_MARK@$before"
fi
key=$(cat /share/e2b-api-key)
token=$(cat /share/kilnd-token)
state=/kiln/e2b-state
rm -rf "$state"; mkdir -p "$state"
echo "this file is on L1, never in a sandbox" >/tmp/kiln-l1-only
KILND_E2B_API_KEY="$key" KILND_TOKEN="$token" kilnd --state-dir "$state" --max-vms 16 \
  --e2b-listen 10.0.2.15:@E2B_PORT@ --listen 10.0.2.15:@API_PORT@ 2>"$state.log" &
kilnd=$!
n=0
while [ ! -S "$state/kilnd.sock" ]; do
  n=$((n + 1))
  if [ $n -gt 600 ]; then echo "e2b-l1: kilnd did not start"; cat "$state.log"; exit 3; fi
  sleep 0.1
done
# --json: the result alone (L1's console is a terminal, where kiln would draw its progress).
KILND_SOCKET="$state/kilnd.sock" kiln template build --json /kiln/examples/base.toml || {
  echo "e2b-l1: building the base template failed"; tail -50 "$state.log"; exit 3; }
echo "e2b-l1: kilnd serves E2B on port @E2B_PORT@"
verdict=$(nc -l -p @CONTROL_PORT@ </dev/null | tr -dc 0-9)
kill $kilnd; wait $kilnd
if [ "$verdict" != 0 ]; then
  echo "e2b-l1: the host's run failed; kilnd's last log lines:"
  tail -60 "$state.log"
fi
exit "${verdict:-1}"
"#;

/// A lab run the suite shares its boot with: L1 runs `run.cmd` first, in `run.share` (where the
/// suite adds its own files), with `run.files` and the rest of `run`'s settings; its `timeout` is
/// that command's.
pub struct Before {
    /// The first command's lab run.
    pub run: LabRun,
}

/// How a run on the host ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The host command's status (pytest's, the benchmark's).
    pub suite: u8,
    /// Whether the command of a shared boot ([`Before`]) passed (true without one).
    pub before_passed: bool,
}

/// Where the host reaches kilnd in L1, through ports QEMU forwards.
pub struct Served {
    /// `http://127.0.0.1:PORT` of kilnd's E2B listener (E2B's API and envd).
    pub e2b_url: String,
    /// The API key it was started with.
    pub e2b_key: String,
    /// `http://127.0.0.1:PORT` of kilnd's own API (`--listen`).
    pub kilnd_url: String,
    /// Its bearer token.
    pub kilnd_token: String,
}

impl Served {
    /// Configures `cmd` the way E2B's SDK and Kiln's are configured: by environment only.
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("E2B_API_KEY", &self.e2b_key)
            .env("E2B_API_URL", &self.e2b_url)
            .env("E2B_SANDBOX_URL", &self.e2b_url)
            .env("KILND_URL", &self.kilnd_url)
            .env("KILND_TOKEN", &self.kilnd_token)
            .env_remove("KILND_SOCKET")
            .env_remove("E2B_DOMAIN")
            .env_remove("E2B_DEBUG");
    }
}

/// `cargo xtask test --e2b [FILTER]`: the suite, FILTER passed to pytest's `-k`, in its own L1
/// boot or after `before` in one. The lab failing is an error.
pub fn run_suite(filter: Option<String>, before: Option<Before>) -> Result<Verdict> {
    let venv = venv()?;
    let suite = util::workspace_root().join("tests/e2b");
    serve_in_lab("the E2B suite", before, |served| {
        eprintln!(
            "\n==> xtask e2b: pytest tests/e2b against kilnd in the lab ({})",
            served.e2b_url
        );
        let mut pytest = Command::new(venv.join("bin/python"));
        pytest
            .args(["-m", "pytest", "-v", "-p", "no:cacheprovider"])
            .arg(&suite);
        served.env(&mut pytest);
        if let Some(f) = &filter {
            pytest.args(["-k", f]);
        }
        let status = pytest
            .status()
            .map_err(|e| format!("cannot run pytest: {e}"))?;
        Ok(status.code().unwrap_or(1))
    })
}

/// Boots L1 (after `before`'s command in a shared boot), has kilnd serve there with the `base`
/// template, runs `host` against it and hands its status to L1, which exits with it. `what`
/// names the host's part in messages. The lab failing, or `host` failing to run, is an error.
pub fn serve_in_lab(
    what: &str,
    before: Option<Before>,
    host: impl FnOnce(&Served) -> Result<i32>,
) -> Result<Verdict> {
    let (mut run, before_cmd, before_timeout) = match before {
        Some(b) => {
            let mut run = b.run;
            let cmd = std::mem::take(&mut run.cmd);
            let timeout = run.timeout;
            (run, cmd, timeout)
        }
        None => (LabRun::default(), Vec::new(), Duration::ZERO),
    };
    let shared = !before_cmd.is_empty();
    let share = match &run.share {
        Some(s) => s.clone(),
        None => {
            let s = util::cache_dir().join("e2b-share");
            let _ = std::fs::remove_dir_all(&s);
            s
        }
    };
    util::mkdir(&share)?;
    let (key, token) = (random_key()?, random_key()?);
    util::write_atomic(&share.join("e2b-api-key"), key.as_bytes())?;
    util::write_atomic(&share.join("kilnd-token"), token.as_bytes())?;
    util::write_atomic(
        &share.join("e2b-l1.sh"),
        L1_SCRIPT
            .replace("@E2B_PORT@", &L1_E2B_PORT.to_string())
            .replace("@API_PORT@", &L1_API_PORT.to_string())
            .replace("@CONTROL_PORT@", &L1_CONTROL_PORT.to_string())
            .replace("@BEFORE_MARK@", BEFORE_MARK)
            .as_bytes(),
    )?;
    let (e2b, api, control) = (
        Forwarded(free_port()?),
        Forwarded(free_port()?),
        Forwarded(free_port()?),
    );
    run.share = Some(share);
    run.cmd = ["sh", "/share/e2b-l1.sh"]
        .into_iter()
        .map(String::from)
        .chain(before_cmd)
        .collect();
    run.forwards = vec![
        (e2b.0, L1_E2B_PORT),
        (api.0, L1_API_PORT),
        (control.0, L1_CONTROL_PORT),
    ];
    run.timeout = before_timeout + LAB_TIMEOUT;
    let lab_thread = std::thread::spawn(move || lab::run(&run));
    // Ready when kilnd in L1 lists the base template through the forwarded port.
    let end = Instant::now() + before_timeout + READY_WITHIN;
    let ready = loop {
        if lab_thread.is_finished() {
            break false;
        }
        if let Some((200, body)) = e2b.get("/templates", &[("X-API-Key", &key)])
            && body.contains("\"base\"")
        {
            break true;
        }
        if Instant::now() > end {
            break false;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let served = Served {
        e2b_url: format!("http://127.0.0.1:{}", e2b.0),
        e2b_key: key,
        kilnd_url: format!("http://127.0.0.1:{}", api.0),
        kilnd_token: token,
    };
    let hosted = ready.then(|| host(&served));
    let verdict = match &hosted {
        Some(Ok(v)) => *v,
        Some(Err(_)) => 1,
        None => -1,
    };
    if verdict >= 0 {
        // A send that raced L1 reaching its listener is lost without a sign: send again until
        // L1 goes down.
        for _ in 0..6 {
            let _ = control.send(&format!("{verdict}\n"), Duration::from_secs(60));
            let sent = Instant::now();
            while !lab_thread.is_finished() && sent.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(200));
            }
            if lab_thread.is_finished() {
                break;
            }
        }
    }
    let outcome = lab_thread
        .join()
        .map_err(|_| "the lab thread panicked".to_string())??;
    if let Some(Err(e)) = hosted {
        return Err(format!("{what}: {e}"));
    }
    let before_passed = !shared
        || outcome
            .output
            .lines()
            .any(|l| l.trim_end() == format!("{BEFORE_MARK}0"));
    match (&outcome.status, verdict) {
        (LabStatus::Exited(code), v) if v >= 0 && *code == v => Ok(Verdict {
            suite: u8::try_from(v).unwrap_or(1),
            before_passed,
        }),
        (LabStatus::Exited(code), -1) => Err(format!(
            "kilnd in the lab never served {what} (the L1 script exited {code}; its output is above)"
        )),
        (LabStatus::Exited(code), v) => Err(format!(
            "{what} exited {v} but L1 reported {code} (did the verdict reach it?)"
        )),
        (LabStatus::Failed(why), _) => {
            outcome.print_diagnosis();
            Err(format!("the lab failed, not {what}: {why}"))
        }
    }
}
