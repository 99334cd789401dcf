//! The `kiln-vmm` binary: parse, validate, build, run, and turn the outcome into an exit status
//! (0 guest reset or power-off, 1 VMM/KVM failure or triple fault, 2 bad input).

use std::io::Write;
use std::process::ExitCode;

use kiln_vmm::Vmm;
use kiln_vmm::config::{Command, parse_args};
use vmm_sys_util::terminal::Terminal;

const EXIT_VMM_ERROR: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;

fn main() -> ExitCode {
    kiln_vmm::logger::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match parse_args(&args) {
        Ok(Command::Run(config)) => config,
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
    if let Err(e) = config.validate() {
        return fail(&e.to_string(), EXIT_BAD_INPUT);
    }
    let mut vmm = match Vmm::try_from(&*config) {
        Ok(vmm) => vmm,
        Err(e) => {
            let code = if e.is_bad_input() {
                EXIT_BAD_INPUT
            } else {
                EXIT_VMM_ERROR
            };
            return fail(&e.to_string(), code);
        }
    };
    // Keystrokes go to the guest as they are typed (Ctrl-C included), as on Firecracker's console.
    let raw = RawTerminal::enable();
    let reason = vmm.run();
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

fn fail(msg: &str, code: u8) -> ExitCode {
    eprintln!("kiln-vmm: {msg}");
    ExitCode::from(code)
}
