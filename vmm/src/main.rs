//! The `kiln-vmm` binary: parse, validate, build, run, and turn the outcome into an exit status
//! (0 guest reset or power-off, 1 VMM/KVM failure or triple fault, 2 bad input, 148 a system call
//! a seccomp filter forbids, from its SIGSYS handler). Each thread installs its seccomp filter
//! where `kiln_vmm::seccomp` says, unless `--no-seccomp` was given.

use std::io::Write;
use std::process::ExitCode;

use kiln_vmm::api::ApiStartError;
use kiln_vmm::config::{Command, VmConfig, parse_args};
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
    kiln_vmm::logger::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (config, api_sock, serial, no_seccomp) = match parse_args(&args) {
        Ok(Command::Run {
            config,
            api_sock,
            serial,
            no_seccomp,
        }) => (config, api_sock, serial, no_seccomp),
        Ok(Command::Help) => {
            println!("{}", kiln_vmm::config::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("kiln-vmm {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(msg) => return fail(&msg, EXIT_BAD_INPUT),
    };
    let seccomp = if no_seccomp {
        eprintln!(
            "kiln-vmm: warning: --no-seccomp: no seccomp filters; every thread may make any system call"
        );
        SeccompFilters::disabled()
    } else {
        match SeccompFilters::embedded() {
            Ok(filters) => filters,
            Err(e) => return fail(&e.to_string(), EXIT_VMM_ERROR),
        }
    };
    // The API socket listens before anything else, so a client can connect right away.
    let api = match api_sock
        .as_deref()
        .map(|p| api::start(p, &seccomp))
        .transpose()
    {
        Ok(api) => api,
        Err(e @ ApiStartError::Bind(_)) => return fail(&e.to_string(), EXIT_BAD_INPUT),
        Err(e) => return fail(&e.to_string(), EXIT_VMM_ERROR),
    };
    let (mut vmm, api) = match (config, api) {
        (Some(config), api) => match build(&config) {
            Ok(vmm) => (vmm, api),
            Err(code) => return code,
        },
        (None, Some(link)) => match api::preboot::configure(&link, serial) {
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
    if let Some(link) = api {
        vmm.serve_api(link);
    }
    vmm.set_seccomp(seccomp);
    // Keystrokes go to the guest as they are typed (Ctrl-C included), as on Firecracker's console.
    let raw = RawTerminal::enable();
    let reason = vmm.run();
    vmm.flush_api(std::time::Duration::from_millis(500));
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
fn build(config: &VmConfig) -> Result<Vmm, ExitCode> {
    if let Err(e) = config.validate() {
        return Err(fail(&e.to_string(), EXIT_BAD_INPUT));
    }
    Vmm::try_from(config).map_err(|e| {
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
