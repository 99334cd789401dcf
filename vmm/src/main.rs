//! The `kiln-vmm` binary: parse, validate, build, run, and turn the outcome into an exit status
//! (0 guest reset or power-off, 1 VMM/KVM failure or triple fault, 2 bad input, 148 a system call
//! a seccomp filter forbids, from its SIGSYS handler, and Firecracker's statuses for fatal signals
//! from `kiln_vmm::signals`). Each thread installs its seccomp filter
//! where `kiln_vmm::seccomp` says, unless `--no-seccomp` was given. Firecracker's process options
//! (`--id`, `--log-path`, `--metrics-path`, `--boot-timer`, ...) set up the [`Instance`].

use std::io::Write;
use std::process::ExitCode;

use kiln_vmm::api::ApiStartError;
use kiln_vmm::config::{Command, ProcessOptions, VmConfig, parse_args};
use kiln_vmm::instance::{DEFAULT_INSTANCE_ID, Instance, Timestamp};
use kiln_vmm::seccomp::SeccompFilters;
use kiln_vmm::{Vmm, api};
use vmm_sys_util::terminal::Terminal;

const EXIT_VMM_ERROR: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;

fn main() -> ExitCode {
    // Before anything allocates much and before any thread exists: malloc then uses only the
    // system calls every thread's seccomp filter allows (see kiln_vmm::seccomp::malloc).
    if let Err(e) = kiln_vmm::seccomp::malloc::configure() {
        return fail(&e.to_string(), EXIT_VMM_ERROR);
    }
    // Before any thread stack exists: a 2 MiB stack must not become a 2 MiB huge page (see
    // kiln_vmm::memory::thp). Failing that costs memory, not correctness.
    if let Err(e) = kiln_vmm::memory::thp::disable_for_process() {
        eprintln!("kiln-vmm: cannot turn transparent huge pages off for its own memory: {e}");
    }
    let process_start = Timestamp::now();
    // Firecracker's signals: SIGPIPE counted, SIGBUS, SIGSEGV, ... reported with their statuses.
    if let Err(e) = kiln_vmm::signals::install_handlers() {
        return fail(&e.to_string(), EXIT_VMM_ERROR);
    }
    kiln_vmm::logger::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (config, api_sock, serial, no_seccomp, process) = match parse_args(&args) {
        Ok(Command::Run {
            config,
            api_sock,
            serial,
            no_seccomp,
            process,
        }) => (config, api_sock, serial, no_seccomp, process),
        Ok(Command::Help) => {
            println!("{}", kiln_vmm::config::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("kiln-vmm {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Command::DescribeSnapshot(path)) => {
            return match kiln_vmm::persist::describe(&path) {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.to_string(), EXIT_BAD_INPUT),
            };
        }
        Err(msg) => return fail(&msg, EXIT_BAD_INPUT),
    };
    let mut instance = match instance(&process, config.as_deref(), process_start) {
        Ok(instance) => instance,
        Err(msg) => return fail(&msg, EXIT_BAD_INPUT),
    };
    let seccomp = if no_seccomp {
        eprintln!(
            "kiln-vmm: warning: --no-seccomp: no seccomp filters; every thread may make any system call"
        );
        SeccompFilters::disabled()
    } else {
        let filters = match &process.seccomp_filter {
            Some(path) => SeccompFilters::from_file(path),
            None => SeccompFilters::embedded(),
        };
        match filters {
            Ok(filters) => filters,
            Err(e @ kiln_vmm::seccomp::SeccompError::File { .. }) => {
                return fail(&e.to_string(), EXIT_BAD_INPUT);
            }
            Err(e) => return fail(&e.to_string(), EXIT_VMM_ERROR),
        }
    };
    // The API socket listens before anything else, so a client can connect right away.
    let max_payload = process
        .max_payload
        .unwrap_or(kiln_api::http::DEFAULT_MAX_PAYLOAD);
    let api = match api_sock
        .as_deref()
        .map(|p| api::start(p, &seccomp, max_payload))
        .transpose()
    {
        Ok(api) => api,
        Err(e @ ApiStartError::Bind(_)) => return fail(&e.to_string(), EXIT_BAD_INPUT),
        Err(e) => return fail(&e.to_string(), EXIT_VMM_ERROR),
    };
    record_startup(&instance, process.parent_cpu_time_us.unwrap_or(0));
    let (mut vmm, api) = match (config, api) {
        (Some(config), api) => match build(&config, &instance) {
            Ok(vmm) => (vmm, api),
            Err(code) => return code,
        },
        (None, Some(link)) => match api::preboot::configure(&link, serial, &mut instance) {
            Some(vmm) => (vmm, Some(link)),
            None => {
                return fail(
                    "the API thread stopped before InstanceStart",
                    EXIT_VMM_ERROR,
                );
            }
        },
        (None, None) => {
            return fail(
                "nothing to run: give --kernel, --config-file or --api-sock",
                EXIT_BAD_INPUT,
            );
        }
    };
    vmm.set_instance(instance);
    if let Some(link) = api {
        vmm.serve_api(link);
    }
    vmm.set_seccomp(seccomp);
    // Keystrokes go to the guest as they are typed (Ctrl-C included), as on Firecracker's console.
    let raw = RawTerminal::enable();
    let reason = vmm.run();
    vmm.flush_api(std::time::Duration::from_millis(500));
    // The last metrics line, as Firecracker writes one when it exits.
    if vmm.instance().metrics.path().is_some()
        && let Err(e) = vmm.flush_metrics()
    {
        log::warn!("{e}");
    }
    raw.restore();
    let _ = std::io::stdout().flush();
    let code = if reason.is_clean() {
        log::info!("{reason}");
        0
    } else {
        eprintln!("kiln-vmm: {reason}");
        i32::from(EXIT_VMM_ERROR)
    };
    // vCPU threads may still be inside KVM_RUN; exiting the process (with `vmm` still alive, so
    // guest memory stays mapped until then) ends them all at once.
    std::process::exit(code)
}

/// The process-level state from the command line and the config file: the id, the log and
/// metrics files, the boot timer and MMDS limits, and when the process started.
fn instance(
    p: &ProcessOptions,
    config: Option<&VmConfig>,
    process_start: Timestamp,
) -> Result<Instance, String> {
    let started = Timestamp {
        wall_us: p.start_time_us.unwrap_or(process_start.wall_us),
        cpu_us: p.start_time_cpu_us.unwrap_or(process_start.cpu_us),
    };
    let payload = p.max_payload.unwrap_or(kiln_api::http::DEFAULT_MAX_PAYLOAD);
    let id = p.id.as_deref().unwrap_or(DEFAULT_INSTANCE_ID);
    let mut instance = Instance::new(id, started, p.mmds_size_limit.unwrap_or(payload));
    instance.boot_timer = p.boot_timer;
    kiln_vmm::logger::set_instance_id(id);
    // Firecracker logs at Info by default, and the boot timer's line is an Info line.
    if p.boot_timer && p.logger.level.is_none() && !kiln_vmm::logger::level_from_environment() {
        kiln_vmm::logger::set_level(log::LevelFilter::Info);
    }
    let logger = match (p.has_logger(), config.and_then(|c| c.logger.clone())) {
        (true, _) => Some(p.logger.clone()),
        (false, from_file) => from_file,
    };
    if let Some(logger) = logger {
        kiln_vmm::logger::configure(&logger).map_err(|e| e.to_string())?;
        instance.logger = Some(logger);
    }
    let metrics = match (&p.metrics_path, config.and_then(|c| c.metrics.clone())) {
        (Some(path), _) => Some(kiln_api::requests::metrics::Metrics {
            metrics_path: path.clone(),
        }),
        (None, from_file) => from_file,
    };
    if let Some(m) = metrics {
        instance
            .metrics
            .configure(&m.metrics_path)
            .map_err(|e| e.to_string())?;
        instance.metrics_config = Some(m);
    }
    if let Some(mmds) = config.and_then(|c| c.mmds_config.clone()) {
        let ifaces: Vec<&str> = config
            .map(|c| {
                c.network_interfaces
                    .iter()
                    .map(|n| n.iface_id.as_str())
                    .collect()
            })
            .unwrap_or_default();
        let answer = kiln_vmm::api::put_mmds_config(&mut instance, mmds, &ifaces);
        if answer.status() >= 400 {
            return Err(format!("config file: {}", answer.body()));
        }
    }
    Ok(instance)
}

/// Firecracker's start-up metrics: from the process's start (or `--start-time-us`) to the API
/// listening, in wall and CPU time.
fn record_startup(instance: &Instance, parent_cpu_us: u64) {
    let now = Timestamp::now();
    kiln_vmm::metrics::STARTUP_US.set(now.wall_us.saturating_sub(instance.started.wall_us));
    kiln_vmm::metrics::STARTUP_CPU_US.set(
        now.cpu_us
            .saturating_sub(instance.started.cpu_us)
            .saturating_add(parent_cpu_us),
    );
}

/// Stdin switched to raw mode while the guest runs, when it is a terminal.
struct RawTerminal(bool);

impl RawTerminal {
    fn enable() -> Self {
        let stdin = std::io::stdin();
        // SAFETY: isatty only inspects descriptor 0.
        let tty = unsafe { libc::isatty(0) } == 1;
        Self(tty && stdin.lock().set_raw_mode().is_ok())
    }

    /// Puts the terminal back in canonical mode (the process exits without running destructors).
    fn restore(&self) {
        if self.0 && std::io::stdin().lock().set_canon_mode().is_err() {
            eprintln!("kiln-vmm: cannot restore the terminal; run `reset`");
        }
    }
}

/// Validates and builds the VM `config` describes; on failure, prints why and gives the status.
fn build(config: &VmConfig, instance: &Instance) -> Result<Vmm, ExitCode> {
    if let Err(e) = config.validate() {
        return Err(fail(&e.to_string(), EXIT_BAD_INPUT));
    }
    kiln_vmm::builder::build(config, instance).map_err(|e| {
        let code = if e.is_bad_input() {
            EXIT_BAD_INPUT
        } else {
            EXIT_VMM_ERROR
        };
        fail(&e.to_string(), code)
    })
}

fn fail(msg: &str, code: u8) -> ExitCode {
    eprintln!("kiln-vmm: {msg}");
    ExitCode::from(code)
}
