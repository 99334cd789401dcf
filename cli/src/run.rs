//! `kiln run`: boot (or restore a snapshot and give the clone its own entropy, clock and
//! environment), wait for the agent, run the command streaming its output, shut the VM down, and
//! turn the outcome into an exit status.

use std::io::{self, Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use kiln_agent::client::{
    self, Client, DEFAULT_REPLY_TIMEOUT, Error, ExecOutput, ExecStdin, MAX_COLLECTED_STDERR,
    MAX_COLLECTED_STDOUT, REPORT_GRACE, collect_capped,
};
use kiln_agent::protocol::{ExecSpec, ExitStatus};

use crate::args::{Images, RunArgs};
use crate::net::Network;
use crate::snapshot::SnapshotFiles;
use crate::vm::{Vm, find_vmm};
use crate::{signals, term};

/// kiln's own failures (bad input, VMM, boot).
pub const EXIT_KILN: i32 = 125;
/// The command could not be started.
pub const EXIT_NOT_STARTED: i32 = 127;
/// The command timed out.
pub const EXIT_TIMED_OUT: i32 = 124;

/// How long past `--timeout` the guest may take to report before the host gives up on it.
const GUEST_REPORT_GRACE: Duration = REPORT_GRACE;
/// How long the VMM may take to exit after the shutdown request.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(8);

/// A failure of kiln itself: the message and the exit status.
struct Failure(String, i32);

fn kiln_failure(message: impl Into<String>) -> Failure {
    Failure(message.into(), EXIT_KILN)
}

/// Runs `kiln run`; returns the exit status.
pub fn run(args: &RunArgs) -> i32 {
    if let Some(template) = &args.template {
        let what = match &args.code {
            Some(code) => crate::kilnd::RunWhat::Code(code.clone()),
            None => crate::kilnd::RunWhat::Command(args.command.clone()),
        };
        let opts = crate::kilnd::args::ExecOpts {
            env: args.env.clone(),
            cwd: args.cwd.clone(),
            user: args.user.clone(),
            timeout_s: args.timeout.map(|t| t.as_secs().max(1)),
            stdin: !term::is_tty(0),
        };
        // `--net` and its kin are the sandbox's policy; without them, its template's default.
        let network = crate::kilnd::args::network_request(
            args.net.nic,
            &args.net.domains,
            args.net.allow_net,
            &args.net.publish,
        );
        return crate::kilnd::run_template(
            args.kilnd.clone(),
            template,
            args.lang.as_deref(),
            what,
            &opts,
            network,
            args.json,
        );
    }
    match try_run(args) {
        Ok(code) => code,
        Err(Failure(message, code)) => {
            eprintln!("kiln: {message}");
            code
        }
    }
}

/// What the command did.
struct Outcome {
    status: Option<ExitStatus>,
    error: Option<String>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Bytes past the `--json` caps, read and dropped.
    stdout_dropped: u64,
    stderr_dropped: u64,
    boot_ms: u128,
    exec_ms: u128,
}

/// Where the VM comes from.
enum Machine {
    /// Booted from a kernel and a rootfs.
    Boot(Images),
    /// Restored from a snapshot.
    Restore(SnapshotFiles),
}

fn try_run(args: &RunArgs) -> Result<i32, Failure> {
    // Every file the command line names is checked before anything starts.
    let machine = match &args.snapshot {
        Some(dir) => Machine::Restore(SnapshotFiles::existing(dir).map_err(kiln_failure)?),
        None => {
            Machine::Boot(Images::resolve(args, |v| std::env::var(v).ok()).map_err(kiln_failure)?)
        }
    };
    let vmm = find_vmm(std::env::var("KILN_VMM").ok()).map_err(kiln_failure)?;
    let tty = args.tty && term::is_tty(0);
    signals::install();

    let boot_start = Instant::now();
    // The network before the VM: kiln-vmm starts inside the sandbox's namespace.
    let mut network = Network::create(&args.net, &format!("kiln-{}", std::process::id()))
        .map_err(kiln_failure)?;
    let mut vm = match &machine {
        Machine::Boot(images) => Vm::boot(&vmm, images, args, &network),
        Machine::Restore(files) => {
            Vm::restore(&vmm, files, boot_start + args.boot_timeout, &network)
        }
    }
    .map_err(kiln_failure)?;
    if let Err(e) = network.publish(&args.net, &vm.uds) {
        return Err(kiln_failure(vm.failure(&e)));
    }

    let mut spec = ExecSpec::new(args.command.iter().cloned());
    spec.env = args.env.iter().cloned().collect();
    spec.cwd = args.cwd.clone();
    spec.user = args.user.clone();
    spec.timeout_ms = args.timeout.map(|t| t.as_millis() as u64);
    spec.tty = tty.then(term::size);
    spec.stdin = true;

    let (client, started, boot_ms, exec_start) = match machine {
        Machine::Boot(_) => {
            let client = wait_for_agent(&mut vm, boot_start, args.boot_timeout)?;
            let boot_ms = boot_start.elapsed().as_millis();
            // `--timeout` covers the whole call from here: a silent agent cannot hold the start.
            let exec_start = Instant::now();
            let started_by = exec_start
                + args.timeout.map_or(DEFAULT_REPLY_TIMEOUT, |t| {
                    (t + GUEST_REPORT_GRACE).min(DEFAULT_REPLY_TIMEOUT)
                });
            let started = client.exec_until(spec, started_by);
            (client, started, boot_ms, exec_start)
        }
        // A clone must not share its snapshot's RNG state and clock: the post-restore step goes
        // first, with the command right behind it in the same round trip.
        Machine::Restore(_) => {
            let env = args.env.iter().cloned().collect();
            let net = network.guest_net_spec();
            let first = restore_and_exec(&mut vm, boot_start, args.boot_timeout, env, net, spec)?;
            let at = Instant::now();
            (
                first.client,
                first.exec,
                at.duration_since(boot_start).as_millis(),
                at,
            )
        }
    };

    let mut outcome = Outcome {
        status: None,
        error: None,
        stdout: Vec::new(),
        stderr: Vec::new(),
        stdout_dropped: 0,
        stderr_dropped: 0,
        boot_ms,
        exec_ms: 0,
    };
    match started {
        Ok(mut exec) => {
            if let Some(stdin) = exec.take_stdin() {
                thread::spawn(move || forward_stdin(stdin));
            }
            let raw_mode = tty.then(term::RawMode::enter).flatten();
            if tty {
                let control = exec.control();
                signals::on_winch(Some(Box::new(move || {
                    let _ = control.resize(term::size());
                })));
            }
            let deadline = args.timeout.map(|t| exec_start + t + GUEST_REPORT_GRACE);
            let streamed = stream(&mut exec, deadline, args.json, &mut outcome);
            signals::on_winch(None);
            match streamed {
                Ok(status) => outcome.status = Some(status),
                Err(Error::Timeout(_)) => {
                    drop(raw_mode);
                    vm.kill();
                    return Err(Failure(
                        format!(
                            "the guest did not report the command's end within {:?} of its \
                             timeout; the VM was stopped",
                            GUEST_REPORT_GRACE
                        ),
                        EXIT_TIMED_OUT,
                    ));
                }
                Err(e) => {
                    drop(raw_mode);
                    return Err(kiln_failure(vm.failure(&format!("lost the command: {e}"))));
                }
            }
        }
        Err(Error::CouldNotStart { message, .. }) => outcome.error = Some(message),
        Err(e) => {
            return Err(kiln_failure(
                vm.failure(&format!("starting the command: {e}")),
            ));
        }
    }
    outcome.exec_ms = exec_start.elapsed().as_millis();
    match machine {
        Machine::Boot(_) => shut_down(&client, &mut vm),
        // A clone is thrown away: nothing in it is worth a clean shutdown, and the snapshot's
        // files are only read.
        Machine::Restore(_) => vm.kill(),
    }
    let code = report(args.json, &outcome, network.report());
    drop(network);
    Ok(code)
}

/// The first contact with a restored VM: the post-restore step and the command in one round trip
/// (`client::restore_and_exec`), retried until `limit` after `start` while the agent is not there
/// yet, watching for the VMM dying first. How the command fared is in the answer's `exec`; any
/// failure of the connection or the step is fatal for the VM.
fn restore_and_exec(
    vm: &mut Vm,
    start: Instant,
    limit: Duration,
    env: std::collections::BTreeMap<String, String>,
    net: Option<kiln_agent::protocol::NetSpec>,
    spec: ExecSpec,
) -> Result<client::RestoredExec, Failure> {
    let end = start + limit;
    loop {
        let slice = (Instant::now() + Duration::from_millis(500)).min(end);
        match client::restore_and_exec(&vm.uds, slice, env.clone(), net.clone(), spec.clone()) {
            Ok(first) => return Ok(first),
            Err(Error::NotReady { last, .. }) => {
                if let Some(st) = vm.try_exit() {
                    return Err(kiln_failure(vm.failure(&format!(
                        "the VM stopped before its agent answered ({st})"
                    ))));
                }
                if Instant::now() >= end {
                    return Err(kiln_failure(vm.failure(&format!(
                        "the guest agent did not answer within {limit:?} (last attempt: {last})"
                    ))));
                }
            }
            Err(e) => {
                return Err(kiln_failure(vm.failure(&format!(
                    "the guest's post-restore step (entropy, clock, environment): {e}"
                ))));
            }
        }
    }
}

/// Retries the agent until it answers, `limit` after `start`, watching for the VMM dying first.
fn wait_for_agent(vm: &mut Vm, start: Instant, limit: Duration) -> Result<Client, Failure> {
    let end = start + limit;
    loop {
        let slice = (Instant::now() + Duration::from_millis(500)).min(end);
        match client::wait_ready(&vm.uds, slice) {
            Ok(c) => return Ok(c),
            Err(Error::NotReady { last, .. }) => {
                if let Some(st) = vm.try_exit() {
                    return Err(kiln_failure(vm.failure(&format!(
                        "the VM stopped before its agent answered ({st})"
                    ))));
                }
                if Instant::now() >= end {
                    return Err(kiln_failure(vm.failure(&format!(
                        "the guest agent did not answer within {limit:?} (last attempt: {last})"
                    ))));
                }
            }
            Err(e) => return Err(kiln_failure(vm.failure(&format!("the guest agent: {e}")))),
        }
    }
}

/// Streams (or, for `--json`, collects) the output until the exit.
fn stream(
    exec: &mut client::Exec,
    deadline: Option<Instant>,
    json: bool,
    out: &mut Outcome,
) -> Result<ExitStatus, Error> {
    let mut stdout_gone = false;
    loop {
        let next = match deadline {
            Some(d) => exec.next_output_until(d)?,
            None => exec.next_output()?,
        };
        match next {
            Some(ExecOutput::Stdout(b)) if json => collect_capped(
                &mut out.stdout,
                &mut out.stdout_dropped,
                MAX_COLLECTED_STDOUT,
                &b,
            ),
            Some(ExecOutput::Stderr(b)) if json => collect_capped(
                &mut out.stderr,
                &mut out.stderr_dropped,
                MAX_COLLECTED_STDERR,
                &b,
            ),
            Some(ExecOutput::Stdout(b)) => {
                if !stdout_gone && write_flush(&mut io::stdout().lock(), &b).is_err() {
                    // Our reader went away (`kiln run ... | head`): stop the command like a
                    // pipe would, and keep draining until it ends.
                    stdout_gone = true;
                    let _ = exec.control().signal(libc::SIGPIPE);
                }
            }
            Some(ExecOutput::Stderr(b)) => {
                let _ = write_flush(&mut io::stderr().lock(), &b);
            }
            Some(ExecOutput::Exit(status)) => return Ok(status),
            None => return Err(Error::Protocol("the exec ended without a status".into())),
        }
    }
}

fn write_flush(w: &mut impl Write, b: &[u8]) -> io::Result<()> {
    w.write_all(b)?;
    w.flush()
}

/// Copies our stdin to the command's, closing it at end of file.
fn forward_stdin(mut to: ExecStdin) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut stdin = io::stdin().lock();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    to.close();
}

/// Asks the agent to shut the guest down and waits for the VMM; kills it when it lingers.
fn shut_down(client: &Client, vm: &mut Vm) {
    let _ = client
        .clone()
        .with_reply_timeout(Duration::from_secs(5))
        .shutdown();
    match vm.wait_exit(SHUTDOWN_LIMIT) {
        Some(st) if st.success() => {}
        Some(st) => eprintln!(
            "kiln: warning: kiln-vmm exited with {st} after the command ended; {}",
            vm.failure("console log kept")
        ),
        None => {
            vm.kill();
            eprintln!(
                "kiln: warning: the VM did not stop within {SHUTDOWN_LIMIT:?} of the shutdown \
                 request and was killed"
            );
        }
    }
}

/// Prints the result (JSON, with `network` when the VM had a network or published ports, or the
/// could-not-start reason) and returns the exit status.
fn report(json: bool, o: &Outcome, network: Option<serde_json::Value>) -> i32 {
    let code = o.status.map_or(EXIT_NOT_STARTED, ExitStatus::shell_code);
    if json {
        let (exit_code, signal) = match o.status {
            Some(ExitStatus::Exited(c)) => (Some(c), None),
            Some(ExitStatus::Signaled(s)) => (None, Some(s)),
            Some(ExitStatus::TimedOut) => (None, None),
            None => (Some(EXIT_NOT_STARTED), None),
        };
        let mut value = serde_json::json!({
            "stdout": String::from_utf8_lossy(&o.stdout),
            "stderr": String::from_utf8_lossy(&o.stderr),
            "exit_code": exit_code,
            "signal": signal,
            "timed_out": o.status == Some(ExitStatus::TimedOut),
            "stdout_dropped_bytes": o.stdout_dropped,
            "stderr_dropped_bytes": o.stderr_dropped,
            "error": o.error,
            "timings": {"boot_ms": o.boot_ms as u64, "exec_ms": o.exec_ms as u64},
        });
        if let Some(n) = network {
            value["network"] = n;
        }
        println!("{value}");
    } else if let Some(e) = &o.error {
        eprintln!("kiln: {e}");
    } else if o.status == Some(ExitStatus::TimedOut) {
        eprintln!("kiln: the command timed out and was killed");
    }
    code
}
