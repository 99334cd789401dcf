//! `cargo xtask lab [OPTIONS] -- CMD [ARGS...]`: runs CMD inside the nested lab, an L1 Linux VM under
//! QEMU TCG whose CPU has SVM, so kvm-amd gives L1 a real /dev/kvm and Kiln can boot L2 guests there.
//!
//! Setup reads top to bottom in [`run`]: packages, the L1 kernel ([`l1_kernel`]), the L1 initramfs
//! (its /init from [`init`], packed by `crate::initramfs`), the guest kernel and rootfs, the work image
//! ([`image`]), then the boot itself ([`qemu`]). `test` and `bench` call [`run`]; people call [`main`].

mod image;
mod init;
mod kvm_pin;
mod l1_kernel;
mod passed;
mod qemu;
mod qemu_package;
mod watch;

#[cfg(test)]
pub(crate) use passed::PASSED_MARK;
pub(crate) use passed::note_console_line;
pub use passed::passed_so_far;

use crate::util::{self, Result};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// One command to run in the lab.
#[derive(Debug, Clone)]
pub struct LabRun {
    /// A host folder copied into the image; L1 copies it to a tmpfs at /share and runs CMD there.
    pub share: Option<PathBuf>,
    /// Extra `(host path, path below /kiln)` to put in the image (a folder is copied whole).
    pub files: Vec<(PathBuf, String)>,
    /// Also put QEMU, its libraries and firmware in the image (~55 MB), for QEMU peers inside L1.
    pub with_qemu: bool,
    /// Also put strace and its libraries in the image (to derive kiln-vmm's seccomp filters).
    pub with_strace: bool,
    /// Also put the Debian image of kilnd's bundled `python` template (numpy, pandas) in
    /// /kiln/images, debootstrapping it on the host first if the cache lacks it.
    pub with_python: bool,
    /// Build the workspace's release binaries and put them in /kiln/bin (on PATH in L1).
    pub build_bins: bool,
    /// CMD's argv; run by `/bin/sh` in L1 with no stdin.
    pub cmd: Vec<String>,
    /// L1 memory in MiB.
    pub mem_mib: u32,
    /// L1 vCPUs.
    pub cpus: u32,
    /// How long CMD may run once L1 is ready.
    pub timeout: Duration,
    /// Copy L1's console to stdout live (markers removed).
    pub echo: bool,
    /// `(host port, L1 port)` forwards: L1 gets a virtio-net device on QEMU's user network,
    /// restricted to these, at 10.0.2.15; each host port on 127.0.0.1 reaches L1's port.
    pub forwards: Vec<(u16, u16)>,
}

impl Default for LabRun {
    fn default() -> Self {
        LabRun {
            share: None,
            files: Vec::new(),
            with_qemu: false,
            with_strace: false,
            with_python: false,
            build_bins: true,
            cmd: Vec::new(),
            mem_mib: 4096,
            cpus: L1_CPUS,
            timeout: Duration::from_secs(1800),
            echo: true,
            forwards: Vec::new(),
        }
    }
}

/// How a lab run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabStatus {
    /// CMD ran and exited with this status (127: not found, 128+N: killed by signal N).
    Exited(i32),
    /// The lab itself failed; the command's status is unknown.
    Failed(LabFailure),
}

/// Why the lab failed rather than the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabFailure {
    /// QEMU could not start or quit before L1 printed anything.
    QemuStart(String),
    /// L1 printed no ready marker within the watchdog.
    NoReady(Duration),
    /// L1's init gave up (a module failed to load, no /dev/kvm, the work image did not mount).
    Init(String),
    /// QEMU exited before CMD finished (an L1 panic, say).
    QemuExited(String),
    /// CMD was still running when the timeout expired; L1 had booted.
    Timeout(Duration),
    /// L1's heartbeat stopped for this long: its userspace no longer runs (a hung L1 kernel).
    Hung(Duration),
}

impl fmt::Display for LabFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabFailure::QemuStart(why) => write!(f, "QEMU did not start L1: {why}"),
            LabFailure::NoReady(after) => {
                write!(f, "L1 was not ready after {} s (watchdog)", after.as_secs())
            }
            LabFailure::Init(why) => write!(f, "L1's init failed: {why}"),
            LabFailure::QemuExited(why) => {
                write!(f, "L1 stopped before the command finished: {why}")
            }
            LabFailure::Timeout(after) => write!(
                f,
                "the command was still running after {} s",
                after.as_secs()
            ),
            LabFailure::Hung(silent) => write!(
                f,
                "L1 hung: its heartbeat stopped {} s ago (its kernel no longer runs userspace)",
                silent.as_secs()
            ),
        }
    }
}

/// The result of [`run`].
#[derive(Debug, Clone)]
// `output` and `log` are for the `test` and `bench` commands; `main` streams the console instead.
#[allow(dead_code)]
pub struct LabOutcome {
    /// CMD's exit status, or why the lab failed.
    pub status: LabStatus,
    /// Console text while CMD ran (its stdout and stderr only); `\r\n` read as `\n`.
    pub output: String,
    /// All console text, boot included, markers removed.
    pub log: String,
    /// L1's kernel messages, kept apart from CMD's output.
    pub kernel_log: String,
    /// When the lab failed: where L1's CPUs were and its last kernel messages.
    pub diagnosis: Option<String>,
    /// Host-side preparation: packages, kernels, initramfs, work image.
    pub setup: Duration,
    /// From starting QEMU to L1's ready marker.
    pub boot: Option<Duration>,
    /// From the ready marker to CMD's exit.
    pub command: Option<Duration>,
}

impl LabOutcome {
    /// The command's status as an xtask exit status (1 when it does not fit in a byte), or an error
    /// saying the lab, not `what`, failed, with what L1 was doing.
    pub fn exit_status(self, what: &str) -> Result<u8> {
        match &self.status {
            LabStatus::Exited(code) => Ok(u8::try_from(*code).unwrap_or(1)),
            LabStatus::Failed(why) => {
                self.print_diagnosis();
                Err(format!("the lab failed, not the {what}: {why}"))
            }
        }
    }

    /// Prints the diagnosis of a failed lab (L1's CPUs and last kernel messages) to stderr, and
    /// where the whole kernel log was kept.
    pub fn print_diagnosis(&self) {
        if let Some(d) = &self.diagnosis {
            eprintln!("xtask lab: {d}");
        }
        eprintln!(
            "xtask lab: L1's whole kernel log: {}",
            util::cache_dir()
                .join("lab")
                .join(LAST_KERNEL_LOG)
                .display()
        );
    }
}

/// Debugging knobs, read from the environment so that they reach runs started by `test` and `bench`.
struct Knobs {
    /// `KILN_LAB_FAULT`: `kernel` boots a missing kernel (QEMU fails), `module` makes init fail an
    /// insmod, `hang` makes init never get ready.
    fault: String,
    /// `KILN_LAB_READY_TIMEOUT`: watchdog seconds for the ready marker.
    ready_within: Duration,
    /// `KILN_LAB_VERBOSE` non-empty: boot L1 without `quiet`.
    verbose: bool,
    /// `KILN_LAB_APPEND`: extra words for L1's kernel command line.
    append: String,
    /// `KILN_LAB_STALL_SECS`: how long L1's heartbeat may be silent before L1 counts as hung.
    stall_after: Duration,
}

impl Knobs {
    fn from_env() -> Result<Knobs> {
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        let fault = var("KILN_LAB_FAULT");
        if !["", "kernel", "module", "hang"].contains(&fault.as_str()) {
            return Err(format!(
                "KILN_LAB_FAULT={fault:?}: expected kernel, module or hang"
            ));
        }
        let ready_within = match var("KILN_LAB_READY_TIMEOUT").as_str() {
            "" => READY_WITHIN,
            secs => Duration::from_secs(secs.parse().map_err(|_| {
                format!("KILN_LAB_READY_TIMEOUT={secs:?} is not a number of seconds")
            })?),
        };
        let stall_after =
            match var("KILN_LAB_STALL_SECS").as_str() {
                "" => STALL_AFTER,
                secs => Duration::from_secs(secs.parse().map_err(|_| {
                    format!("KILN_LAB_STALL_SECS={secs:?} is not a number of seconds")
                })?),
            };
        let mut append = var("KILN_LAB_APPEND");
        if fault == "module" || fault == "hang" {
            append.push_str(&format!(" kiln.fault={fault}"));
        }
        Ok(Knobs {
            fault,
            ready_within,
            verbose: !var("KILN_LAB_VERBOSE").is_empty(),
            append: append.trim().to_string(),
            stall_after,
        })
    }
}

/// L1's vCPUs by default: one. With two, QEMU's multi-threaded TCG now and then lets a
/// reschedule IPI in while kvm-amd in L1 has GIF clear and the guest's GS base loaded (inside
/// `svm_vcpu_enter_exit`), and L1's kernel dies on recursive page faults ("stack guard page was
/// hit", `sysvec_reschedule_ipi` over `svm_vcpu_enter_exit`). CI lost whole lab stages to it, twice
/// in one run, under QEMU 7.2 and again under bookworm-backports' QEMU 10.0. One vCPU sends no IPIs;
/// the whole lab suite took about as long with one as with two (TCG's second thread mostly
/// contended with the first on this 2-core host): balloon 284 s vs 242 s, cycles 251 s vs 266 s,
/// kilnd 238 s vs 214 s, net 79 s vs 89 s.
pub const L1_CPUS: u32 = 1;

/// Default watchdog: L1 is ready in a few seconds, but TCG on a loaded 2-core machine is slow.
const READY_WITHIN: Duration = Duration::from_secs(180);
/// Default hang watchdog: init's heartbeat comes every few seconds; two minutes of silence means
/// L1's kernel stopped running userspace, not that the host is busy.
const STALL_AFTER: Duration = Duration::from_secs(120);

/// L1's kernel messages of the latest run, under `<cache>/lab/`.
pub const LAST_KERNEL_LOG: &str = "last-l1-kernel.log";

/// Debian's cloud-kernel bzImage (L1's own kernel), which lab tests also boot under kiln-vmm to
/// cover the bzImage loader with a kernel Kiln did not build.
pub fn debian_bzimage() -> Result<PathBuf> {
    Ok(l1_kernel::ensure()?.vmlinuz)
}

/// Prepares the lab and runs `lab.cmd` in it. `Err` means setup failed on the host (nothing booted);
/// an L1 failure is `Ok` with [`LabStatus::Failed`].
pub fn run(lab: &LabRun) -> Result<LabOutcome> {
    if lab.cmd.is_empty() {
        return Err("lab: no command given".into());
    }
    let started = Instant::now();
    let knobs = Knobs::from_env()?;
    qemu_package::ensure()?;
    util::ensure_packages(&["busybox-static", "e2fsprogs", "kmod", "util-linux"])?;
    let lab_cache = util::cache_dir().join("lab");

    let l1 = l1_kernel::ensure()?;
    // The initramfs holds L1's modules and kvm-pin beside busybox and init.
    let mut initrd_files = Vec::new();
    let mut names = Vec::new();
    for path in &l1.modules {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        initrd_files.push((path.clone(), format!("{}/{name}", init::MODULE_DIR)));
        names.push(name);
    }
    initrd_files.push((kvm_pin::build()?, kvm_pin::IN_INITRAMFS.into()));
    let initrd = crate::initramfs::cached(
        &init::init_script(&names),
        &initrd_files,
        &lab_cache.join("initramfs"),
    )?;
    let guest_kernel = crate::guest_kernel::build()?;
    // Every lab has the guest rootfs at /kiln/rootfs.ext4 (where `kiln run` looks for it). The
    // image holds a copy, so what guests write never reaches the cache.
    let mut files = lab.files.clone();
    files.push((crate::rootfs::build()?, "rootfs.ext4".into()));
    // For kilnd: the static agent it writes into templates, its bundled example specs, and the
    // Debian images made ahead (L1 has no network for debootstrap), named as kilnd looks them up.
    files.push((crate::rootfs::static_agent()?, "kiln-agent.static".into()));
    files.push((
        util::workspace_root().join("pool/examples"),
        "examples".into(),
    ));
    let links = lab_cache.join("links");
    util::mkdir(&links)?;
    let base_name = crate::rootfs::debian_image_name(&["python3"]);
    let base_link = links.join(&base_name);
    let _ = std::fs::remove_file(&base_link);
    std::os::unix::fs::symlink("../rootfs.ext4", &base_link)
        .map_err(|e| format!("cannot create {}: {e}", base_link.display()))?;
    files.push((base_link, format!("images/{base_name}")));
    if lab.with_python {
        let packages = crate::rootfs::PYTHON_PACKAGES;
        files.push((
            crate::rootfs::build_with_packages(packages)?,
            format!("images/{}", crate::rootfs::debian_image_name(packages)),
        ));
    }

    let run_dir = RunDir::create(&lab_cache.join("runs"))?;
    let image = image::build(
        &image::ImageSpec {
            cmd: &lab.cmd,
            guest_kernel: Some(&guest_kernel),
            share: lab.share.as_deref(),
            files: &files,
            build_bins: lab.build_bins,
            with_qemu: lab.with_qemu,
            with_strace: lab.with_strace,
        },
        &run_dir.0,
    )?;

    let mut cmdline_extra = knobs.append.clone();
    let save_kallsyms = !l1.kallsyms.exists();
    if save_kallsyms {
        cmdline_extra.push_str(" kiln.kallsyms=1");
    }
    let kernel = if knobs.fault == "kernel" {
        run_dir.0.join("no-such-bzImage")
    } else {
        l1.vmlinuz.clone()
    };
    let setup = started.elapsed();
    let console = qemu::boot(&qemu::Boot {
        kernel: &kernel,
        initrd: &initrd,
        image: &image,
        mem_mib: lab.mem_mib,
        cpus: lab.cpus,
        cmdline_extra: cmdline_extra.trim(),
        verbose: knobs.verbose,
        ready_within: knobs.ready_within,
        timeout: lab.timeout,
        echo: lab.echo,
        run_dir: &run_dir.0,
        kallsyms: &l1.kallsyms,
        stall_after: knobs.stall_after,
        forwards: &lab.forwards,
    });
    if save_kallsyms && !console.kernel_log.is_empty() {
        keep_kallsyms(&image, &console.kernel_log, &l1.kallsyms);
    }
    // Kept after the run folder goes, for a person looking into a failure.
    let _ = std::fs::write(lab_cache.join(LAST_KERNEL_LOG), &console.kernel_log);
    Ok(LabOutcome {
        status: console.status,
        output: console.output,
        log: console.log,
        kernel_log: console.kernel_log,
        diagnosis: console.diagnosis,
        setup,
        boot: console.boot,
        command: console.command,
    })
}

/// Copies the symbols L1's init wrote to the work image into the L1 kernel's cache entry (once per
/// L1 kernel). Best effort: without them a hung L1's addresses are just not named.
fn keep_kallsyms(image: &std::path::Path, kernel_log: &str, to: &std::path::Path) {
    let raw = to.with_extension("raw");
    let dumped = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /l1-kallsyms {}", raw.display()))
        .arg(image)
        .stderr(std::process::Stdio::null())
        .status();
    if let (Ok(st), Ok(text)) = (dumped, std::fs::read_to_string(&raw))
        && st.success()
        && !text.is_empty()
    {
        let _ = util::write_atomic(to, watch::save_kallsyms(&text, kernel_log).as_bytes());
    }
    let _ = std::fs::remove_file(&raw);
}

/// A per-run folder under `<cache>/lab/runs/`, removed when dropped. Folders left by runs that were
/// killed (their process is gone) are removed when the next run starts.
struct RunDir(PathBuf);

impl RunDir {
    fn create(runs: &std::path::Path) -> Result<RunDir> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        for entry in std::fs::read_dir(runs).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().unwrap_or_default();
            if !pid.is_empty() && !std::path::Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = runs.join(format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        util::mkdir(&dir)?;
        Ok(RunDir(dir))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const USAGE: &str = "usage: cargo xtask lab [OPTIONS] -- CMD [ARGS...]

Runs CMD with /bin/sh inside the nested lab VM (L1, with a real /dev/kvm) and exits with its status.
In L1: /kiln/bin (workspace release binaries, on PATH), /kiln/vmlinux (the guest kernel), /share.

options:
  --share DIR            copy DIR into L1 at /share and run CMD there
  --file HOST=PATH       also put HOST (file or folder) in the image at /kiln/PATH
  --with-qemu            also put QEMU and its firmware in the image (~55 MB)
  --with-strace          also put strace in the image
  --no-bins              do not build the workspace binaries
  --mem MIB              L1 memory (default 4096)
  --cpus N               L1 vCPUs (default 1: see L1_CPUS in xtask/src/lab/mod.rs)
  --timeout SECS         how long CMD may run once L1 is up (default 1800)

exit status: CMD's status; 124 if CMD timed out; 125 if the lab failed (setup or the L1 boot), in which
case CMD did not run or its status is unknown.
environment: KILN_LAB_FAULT=kernel|module|hang, KILN_LAB_READY_TIMEOUT=SECS, KILN_LAB_VERBOSE=1,
  KILN_LAB_APPEND='more L1 kernel command-line words'
";

/// Parses the command line into a [`LabRun`].
fn parse(args: &[String]) -> Result<LabRun> {
    let mut lab = LabRun::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--" => break,
            "--share" => lab.share = Some(PathBuf::from(value("--share")?)),
            "--file" => {
                let v = value("--file")?;
                let (host, path) = v
                    .rsplit_once('=')
                    .ok_or_else(|| format!("--file {v:?}: expected HOST=PATH"))?;
                lab.files.push((PathBuf::from(host), path.to_string()));
            }
            "--with-qemu" => lab.with_qemu = true,
            "--with-strace" => lab.with_strace = true,
            "--no-bins" => lab.build_bins = false,
            "--mem" => lab.mem_mib = number("--mem", &value("--mem")?)?,
            "--cpus" => lab.cpus = number("--cpus", &value("--cpus")?)?,
            "--timeout" => {
                lab.timeout = Duration::from_secs(number("--timeout", &value("--timeout")?)?.into())
            }
            "-h" | "--help" => return Err(String::new()),
            other if other.starts_with('-') => return Err(format!("unknown option {other}")),
            first => {
                lab.cmd.push(first.to_string());
                break;
            }
        }
    }
    lab.cmd.extend(it.cloned());
    if lab.cmd.is_empty() {
        return Err("no command given".into());
    }
    Ok(lab)
}

fn number(name: &str, v: &str) -> Result<u32> {
    v.parse()
        .map_err(|_| format!("{name} {v:?}: expected a whole number"))
}

/// `cargo xtask lab`: runs the command, streaming L1's console, and exits with its status (see USAGE).
pub fn main(args: &[String]) -> Result<u8> {
    let lab = match parse(args) {
        Ok(lab) => lab,
        Err(msg) if msg.is_empty() => {
            print!("{USAGE}");
            return Ok(0);
        }
        Err(msg) => {
            eprint!("xtask lab: {msg}\n{USAGE}");
            return Ok(2);
        }
    };
    let outcome = match run(&lab) {
        Ok(outcome) => outcome,
        Err(msg) => {
            eprintln!("xtask lab: LAB SETUP FAILED, the command did not run: {msg}");
            return Ok(125);
        }
    };
    let secs =
        |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1} s", d.as_secs_f64()));
    eprintln!(
        "xtask lab: setup {}, L1 boot {}, command {}",
        secs(Some(outcome.setup)),
        secs(outcome.boot),
        secs(outcome.command)
    );
    Ok(match outcome.status {
        LabStatus::Exited(code) => u8::try_from(code).unwrap_or(255),
        LabStatus::Failed(ref why @ LabFailure::Timeout(_)) => {
            outcome.print_diagnosis();
            eprintln!("xtask lab: {why} (L1 had booted fine); QEMU was killed");
            124
        }
        LabStatus::Failed(ref why) => {
            outcome.print_diagnosis();
            let when = if outcome.boot.is_some() {
                "while the command ran"
            } else {
                "before the command ran"
            };
            eprintln!("xtask lab: L1 FAILED ({when}); this is not the command's status: {why}");
            125
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_stop_at_double_dash_or_first_word() {
        let lab = parse(&args(&["--share", "/tmp/d", "--", "sh", "-c", "exit 3"])).unwrap();
        assert_eq!(lab.share, Some(PathBuf::from("/tmp/d")));
        assert_eq!(lab.cmd, ["sh", "-c", "exit 3"]);
        let lab = parse(&args(&["--mem", "2048", "uname", "-a", "--", "x"])).unwrap();
        assert_eq!(
            (lab.mem_mib, lab.cmd.clone()),
            (2048, args(&["uname", "-a", "--", "x"]))
        );
        let lab = parse(&args(&["--file", "/a=b=c/d", "--with-qemu", "--", "true"])).unwrap();
        assert_eq!(lab.files, [(PathBuf::from("/a=b"), "c/d".to_string())]);
        assert!(lab.with_qemu && !lab.with_strace);
        assert!(
            parse(&args(&["--with-strace", "true"]))
                .unwrap()
                .with_strace
        );
    }

    #[test]
    fn bad_command_lines_are_refused() {
        assert!(parse(&args(&["--share"])).is_err());
        assert!(parse(&args(&["--bogus", "--", "x"])).is_err());
        assert!(parse(&args(&["--"])).is_err());
        assert!(parse(&args(&["--cpus", "two", "x"])).is_err());
    }
}
