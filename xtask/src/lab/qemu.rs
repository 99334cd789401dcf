//! Runs L1: starts QEMU (TCG, microvm) with its serial console on a pipe, follows the markers init
//! prints, enforces the ready watchdog and the command timeout, and makes sure QEMU never outlives us.
//!
//! QEMU gets no stdin (CI has none, and a terminal on stdin would be put in raw mode). It stays in our
//! process group, so Ctrl-C reaches it too, and it is started through `setpriv --pdeathsig KILL` so it
//! dies with the thread that started it even when we are killed outright.

use super::init::{self, Marker};
use super::watch::{self, KernelLog, SymbolMap};
use super::{LabFailure, LabStatus};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long QEMU may take to power off after CMD's exit marker before it is killed.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);

/// One L1 boot.
pub struct Boot<'a> {
    /// The L1 bzImage.
    pub kernel: &'a Path,
    /// The L1 initramfs.
    pub initrd: &'a Path,
    /// The work image, attached as a virtio-mmio disk.
    pub image: &'a Path,
    /// L1 memory in MiB.
    pub mem_mib: u32,
    /// L1 vCPUs.
    pub cpus: u32,
    /// Extra kernel command-line words (e.g. `kiln.fault=hang`).
    pub cmdline_extra: &'a str,
    /// Drop `quiet`, so every L1 kernel message reaches the console.
    pub verbose: bool,
    /// The watchdog: how long L1 may take to print the ready marker.
    pub ready_within: Duration,
    /// How long CMD may run after the ready marker.
    pub timeout: Duration,
    /// Copy the console (markers removed) to our stdout as it arrives.
    pub echo: bool,
    /// This run's folder: L1's kernel log and the QMP socket live here.
    pub run_dir: &'a Path,
    /// L1's saved code symbols, to name the functions a hung L1 is in.
    pub kallsyms: &'a Path,
    /// How long L1's heartbeat may be silent before L1 counts as hung.
    pub stall_after: Duration,
    /// `(host port, L1 port)`: each host port on 127.0.0.1 forwards to L1's port (QEMU user
    /// networking, restricted to these forwards). Empty: L1 has no network device.
    pub forwards: &'a [(u16, u16)],
}

impl Boot<'_> {
    /// L1's kernel console (ttyS1), as QEMU writes it.
    fn kernel_log_path(&self) -> std::path::PathBuf {
        self.run_dir.join("l1-kernel.log")
    }

    /// QEMU's QMP socket.
    fn qmp_path(&self) -> std::path::PathBuf {
        self.run_dir.join("qmp.sock")
    }
}

/// What the console said.
pub struct Console {
    /// CMD's status, or why there is none.
    pub status: LabStatus,
    /// Console text between the ready and exit markers: CMD's output.
    pub output: String,
    /// All console text, markers removed.
    pub log: String,
    /// L1's kernel messages (its console is ttyS1, apart from CMD's output).
    pub kernel_log: String,
    /// When the lab failed: where L1's CPUs were and its last kernel messages.
    pub diagnosis: Option<String>,
    /// From starting QEMU to the ready marker.
    pub boot: Option<Duration>,
    /// From the ready marker to the exit marker.
    pub command: Option<Duration>,
}

/// How long a halted, silent L1 has after an NMI to beat again before it counts as hung.
const NUDGE_WAIT: Duration = Duration::from_secs(30);
/// NMIs one lab run sends at most: an L1 that keeps halting for good is hung.
const MAX_NUDGES: u32 = 3;

/// The QEMU command line for `b`.
fn command(b: &Boot) -> Command {
    // The kernel's console is ttyS1, a file the host keeps: kernel messages never land in CMD's
    // output on ttyS0. Warnings and the backtraces printed with them (soft lockups) are kept; the
    // rest only when verbose. Without KASLR, System.map names the addresses of a hung L1.
    let mut append =
        String::from("console=ttyS1 panic=-1 nokaslr edd=off softlockup_all_cpu_backtrace=1");
    if !b.verbose {
        append.push_str(" loglevel=5");
    }
    if let Some(khz) = host_tsc_khz() {
        append.push_str(&format!(" tsc_early_khz={khz}"));
    }
    if !b.cmdline_extra.is_empty() {
        append.push(' ');
        append.push_str(b.cmdline_extra);
    }
    if !b.forwards.is_empty() {
        append.push_str(" kiln.net=1");
    }
    // QEMU option values escape a comma by doubling it.
    let image = b.image.to_string_lossy().replace(',', ",,");
    let drive = format!("id=d0,format=raw,if=none,file={image}");
    let kernel_log = b.kernel_log_path().to_string_lossy().replace(',', ",,");
    let qmp = b.qmp_path().to_string_lossy().replace(',', ",,");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--", "qemu-system-x86_64"])
        .args(["-accel", "tcg,thread=multi", "-M", "microvm", "-cpu", "max"])
        .args(["-smp", &b.cpus.to_string(), "-m", &b.mem_mib.to_string()])
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-chardev")
        .arg(format!("file,id=l1log,path={kernel_log}"))
        .args(["-device", "isa-serial,chardev=l1log,iobase=0x2f8,irq=3"])
        .arg("-qmp")
        .arg(format!("unix:{qmp},server=on,wait=off"))
        .arg("-kernel")
        .arg(b.kernel)
        .arg("-initrd")
        .arg(b.initrd)
        .args(["-append", &append])
        .arg("-drive")
        .arg(drive)
        .args(["-device", "virtio-blk-device,drive=d0"]);
    if !b.forwards.is_empty() {
        // restrict=on: L1 reaches nothing outside; only the forwards come in.
        let fwds: Vec<String> = b
            .forwards
            .iter()
            .map(|(host, guest)| format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"))
            .collect();
        cmd.arg("-netdev")
            .arg(format!("user,id=n0,restrict=on{}", fwds.concat()))
            .args(["-device", "virtio-net-device,netdev=n0"]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// The host's TSC rate in kHz, measured against the monotonic clock (median of three 20 ms windows).
///
/// Under TCG, L1's TSC is the host's. L1's kernel calibrates it against the emulated PIT, and on a busy
/// host that calibration fails; the kernel then has no TSC rate, hence no TSC-deadline timer, and hangs
/// before userspace waiting for timer ticks (5 of 6 boots with three busy loops on the host). Given the
/// rate with `tsc_early_khz=` it skips the calibration and boots every time.
fn host_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    fn rdtsc() -> u64 {
        // SAFETY: RDTSC only reads the time-stamp counter; it touches no memory and every x86_64 CPU
        // has it.
        unsafe { std::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    fn rdtsc() -> u64 {
        0
    }
    let mut rates = Vec::new();
    for _ in 0..3 {
        let (t0, c0) = (Instant::now(), rdtsc());
        std::thread::sleep(Duration::from_millis(20));
        let (c1, t1) = (rdtsc(), Instant::now());
        let nanos = u64::try_from((t1 - t0).as_nanos()).ok()?.max(1);
        // Cycles per millisecond is kHz.
        rates.push(c1.wrapping_sub(c0).checked_mul(1_000_000)? / nanos);
    }
    rates.sort_unstable();
    let khz = rates[1];
    (100_000..=10_000_000).contains(&khz).then_some(khz)
}

/// Kills and reaps QEMU when dropped, whatever path we leave by.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where the run is.
enum Phase {
    Booting(Instant),
    Running(Instant),
    Done(Instant),
}

/// Boots L1 and follows its console until CMD's exit marker (or a failure) and QEMU's exit.
pub fn boot(b: &Boot) -> Console {
    let mut console = Console {
        status: LabStatus::Failed(LabFailure::QemuStart(String::new())),
        output: String::new(),
        log: String::new(),
        kernel_log: String::new(),
        diagnosis: None,
        boot: None,
        command: None,
    };
    let mut klog = KernelLog::new(b.kernel_log_path());
    let mut cmd = command(b);
    let start = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            console.status =
                LabStatus::Failed(LabFailure::QemuStart(format!("cannot start QEMU: {e}")));
            return console;
        }
    };
    let (tx, rx) = mpsc::channel::<Option<Vec<u8>>>();
    let mut stdout = child.stdout.take().expect("stdout is piped");
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(Some(buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(None);
    });
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let echo = b.echo;
    let stderr_reader = std::thread::spawn(move || {
        // QEMU's own warnings: passed on as they come, kept for the failure message.
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stderr.read(&mut buf) {
            if echo {
                let _ = std::io::stderr().write_all(&buf[..n]);
            }
            all.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    let mut reaper = Reaper(child);

    let mut phase = Phase::Booting(start);
    let mut pending = Vec::new();
    let mut got_any = false;
    let mut outcome: Option<LabStatus> = None;
    // When L1 was last sent an NMI for being silent with every CPU halted, and how many times.
    let mut nudged: Option<Instant> = None;
    let mut nudges = 0;
    loop {
        let deadline = match phase {
            Phase::Booting(since) => since + b.ready_within,
            Phase::Running(since) => since + b.timeout,
            Phase::Done(at) => at + POWEROFF_GRACE,
        };
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            match phase {
                Phase::Booting(_) => {
                    outcome = Some(LabStatus::Failed(LabFailure::NoReady(b.ready_within)))
                }
                Phase::Running(_) => {
                    outcome = Some(LabStatus::Failed(LabFailure::Timeout(b.timeout)))
                }
                // Powered off too slowly: CMD's status stands, QEMU is killed below.
                Phase::Done(_) => {}
            }
            break;
        };
        klog.poll();
        if let (Some(at), Some(silent)) = (nudged, klog.since_beat())
            && silent < at.elapsed()
        {
            eprintln!("xtask lab: L1 beats again after the NMI");
            nudged = None;
        }
        if let (Phase::Booting(_) | Phase::Running(_), Some(silent)) = (&phase, klog.since_beat())
            && silent > b.stall_after
        {
            match nudged {
                Some(at) if at.elapsed() < NUDGE_WAIT => {}
                None if nudges < MAX_NUDGES && watch::all_halted(&b.qmp_path()) == Some(true) => {
                    // The hang seen in the lab: every CPU halted with interrupts on and the timer's
                    // interrupt pending in its local APIC, never delivered. An NMI takes a CPU out
                    // of hlt; what QEMU's registers said is kept with the note.
                    let map = SymbolMap::load(b.kallsyms);
                    eprintln!(
                        "xtask lab: L1 silent for {}s with every CPU halted; sending it an NMI. \
                         Its CPUs:\n{}",
                        silent.as_secs(),
                        watch::cpu_report(&b.qmp_path(), &map, &klog.text)
                    );
                    if let Err(e) = watch::inject_nmi(&b.qmp_path()) {
                        eprintln!("xtask lab: the NMI could not be sent: {e}");
                    }
                    nudged = Some(Instant::now());
                    nudges += 1;
                }
                _ => {
                    outcome = Some(LabStatus::Failed(LabFailure::Hung(silent)));
                    break;
                }
            }
        }
        let bytes = match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(Some(bytes)) => bytes,
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if !pending.is_empty() {
                    let line = std::mem::take(&mut pending);
                    take_line(&line, b.echo, &mut phase, &mut console, &mut outcome);
                }
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
        };
        got_any = true;
        pending.extend_from_slice(&bytes);
        while let Some(nl) = pending.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            take_line(&line, b.echo, &mut phase, &mut console, &mut outcome);
        }
    }

    if matches!(
        outcome,
        Some(LabStatus::Failed(
            LabFailure::Hung(_) | LabFailure::Timeout(_) | LabFailure::NoReady(_)
        ))
    ) {
        // QEMU still runs: ask it where L1's CPUs are before it goes.
        klog.poll();
        let map = SymbolMap::load(b.kallsyms);
        console.diagnosis = Some(format!(
            "where L1's CPUs were (QEMU's registers; a CPU in an L2 guest shows the guest's \
             address):\n{}\
             L1's last kernel messages:\n{}",
            watch::cpu_report(&b.qmp_path(), &map, &klog.text),
            klog.tail(40)
        ));
    }
    let _ = reaper.0.kill();
    let exit = reaper
        .0
        .wait()
        .map(|s| s.to_string())
        .unwrap_or_else(|e| format!("unknown status ({e})"));
    let stderr = stderr_reader.join().unwrap_or_default();
    klog.poll();
    if console.diagnosis.is_none() && !matches!(outcome, Some(LabStatus::Exited(_))) {
        console.diagnosis = Some(format!("L1's last kernel messages:\n{}", klog.tail(40)));
    }
    let got_any = got_any || !klog.text.is_empty();
    console.kernel_log = std::mem::take(&mut klog.text);
    console.status = outcome.unwrap_or_else(|| {
        let why = format!("QEMU exited ({exit}){}", describe_stderr(&stderr));
        if got_any {
            LabStatus::Failed(LabFailure::QemuExited(format!(
                "{why}; last console lines:\n{}",
                tail(&console.log, 5)
            )))
        } else {
            LabStatus::Failed(LabFailure::QemuStart(why))
        }
    });
    console
}

/// Handles one console line (with or without its newline): records and echoes the text, acts on markers.
fn take_line(
    raw: &[u8],
    echo: bool,
    phase: &mut Phase,
    console: &mut Console,
    outcome: &mut Option<LabStatus>,
) {
    let text = String::from_utf8_lossy(raw);
    let had_newline = text.ends_with('\n');
    // The serial console turns "\n" into "\r\n"; give callers plain lines.
    let line = text.trim_end_matches('\n').trim_end_matches('\r');
    let (before, marker) = init::parse_line(line);
    let marker = match (&phase, marker) {
        // Heartbeats go to ttyS1 (see `watch`); one on ttyS0 is CMD's text.
        (Phase::Booting(_), Some(m @ (Marker::Ready | Marker::Fail(_))))
        | (Phase::Running(_), Some(m @ Marker::Exit(_))) => Some(m),
        // A marker out of place (CMD printing one, say) is just text.
        _ => None,
    };
    let kept = if marker.is_some() { before } else { line };
    if matches!(phase, Phase::Running(_)) {
        super::note_console_line(kept);
    }
    // A marker ends the line for the host; without one, the line keeps its own newline (if it had one).
    let newline = if marker.is_none() && had_newline {
        "\n"
    } else {
        ""
    };
    if !kept.is_empty() || !newline.is_empty() {
        // After the exit (or failure) marker only L1's shutdown chatter is left: logged, not shown.
        if echo && !matches!(phase, Phase::Done(_)) {
            let mut out = std::io::stdout().lock();
            let _ = write!(
                out,
                "{kept}{}",
                if marker.is_some() { "\n" } else { newline }
            );
            let _ = out.flush();
        }
        console.log.push_str(kept);
        // The log is for people: a marker after text ends that line there too.
        console
            .log
            .push_str(if marker.is_some() { "\n" } else { newline });
        if let Phase::Running(_) = phase {
            console.output.push_str(kept);
            console.output.push_str(newline);
        }
    }
    let now = Instant::now();
    match marker {
        Some(Marker::Ready) => {
            if let Phase::Booting(since) = phase {
                console.boot = Some(now - *since);
            }
            *phase = Phase::Running(now);
        }
        Some(Marker::Exit(code)) => {
            if let Phase::Running(since) = phase {
                console.command = Some(now - *since);
            }
            *outcome = Some(LabStatus::Exited(code));
            *phase = Phase::Done(now);
        }
        Some(Marker::Fail(why)) => {
            *outcome = Some(LabStatus::Failed(LabFailure::Init(why)));
            *phase = Phase::Done(now);
        }
        Some(Marker::Beat) | None => {}
    }
}

fn describe_stderr(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(": {s}")
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(chunks: &[&str]) -> (Console, Option<LabStatus>) {
        let mut console = Console {
            status: LabStatus::Exited(-1),
            output: String::new(),
            log: String::new(),
            kernel_log: String::new(),
            diagnosis: None,
            boot: None,
            command: None,
        };
        let mut phase = Phase::Booting(Instant::now());
        let mut outcome = None;
        for chunk in chunks {
            take_line(
                chunk.as_bytes(),
                false,
                &mut phase,
                &mut console,
                &mut outcome,
            );
        }
        (console, outcome)
    }

    #[test]
    fn output_is_exactly_what_cmd_printed() {
        let (c, outcome) = feed(&[
            "[ 0.4] PCI: Fatal\r\n",
            "@@KILN-LAB:READY@@\r\n",
            "line one\r\n",
            "no newline@@KILN-LAB:EXIT 3@@\r\n",
            "reboot: Power down\r\n",
        ]);
        assert_eq!(outcome, Some(LabStatus::Exited(3)));
        assert_eq!(c.output, "line one\nno newline");
        assert_eq!(
            c.log,
            "[ 0.4] PCI: Fatal\nline one\nno newline\nreboot: Power down\n"
        );
        assert!(c.boot.is_some() && c.command.is_some());
    }

    #[test]
    fn markers_out_of_place_are_text() {
        // An exit marker before ready, and a second ready while running, change nothing.
        let (c, outcome) = feed(&[
            "@@KILN-LAB:EXIT 0@@\n",
            "@@KILN-LAB:READY@@\n",
            "@@KILN-LAB:READY@@\n",
            "@@KILN-LAB:FAIL x@@\n",
        ]);
        assert_eq!(outcome, None);
        assert_eq!(c.output, "@@KILN-LAB:READY@@\n@@KILN-LAB:FAIL x@@\n");
    }

    #[test]
    fn init_failure_is_a_lab_failure() {
        let (c, outcome) = feed(&["@@KILN-LAB:FAIL insmod kvm.ko failed@@\r\n"]);
        assert_eq!(
            outcome,
            Some(LabStatus::Failed(LabFailure::Init(
                "insmod kvm.ko failed".into()
            )))
        );
        assert!(c.boot.is_none());
    }
}
