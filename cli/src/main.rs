//! `kiln`: boot a Kiln microVM with `kiln-vmm`, run one command in it through the guest agent
//! (`kiln-agent`'s client), stream its output, and exit with its status.
//!
//! [`args`] parses the command line, [`vm`] owns the VMM process and its temp dir, [`run`] is
//! the flow from boot (or snapshot restore) to shutdown; [`signals`], [`term`] and [`cleanup`]
//! make every way out (Ctrl-C included) leave no VM, temp dir or raw terminal behind.
//! [`snapshot`] is `kiln snapshot` (create, load, merge), talking to a VMM through [`api`].
//! [`kilnd`] is `kiln template`, `kiln sandbox` and `kiln run --template`, through kilnd.

mod api;
mod args;
mod cleanup;
mod kilnd;
mod run;
mod signals;
mod snapshot;
mod term;
mod vm;

use args::Command;

fn help(words: &[String]) -> bool {
    words.iter().any(|w| w == "-h" || w == "--help")
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let code = match args::parse(&argv) {
        Ok(Command::Help) => {
            println!("{}", args::USAGE);
            0
        }
        Ok(Command::Version) => {
            println!("kiln {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok(Command::Run(a)) => run::run(&a),
        Ok(Command::Snapshot(words)) => snapshot::main(&words),
        Ok(Command::Template(words)) if help(&words) => {
            println!("{}", kilnd::args::USAGE);
            0
        }
        Ok(Command::Sandbox(words)) if help(&words) => {
            println!("{}", kilnd::args::USAGE);
            0
        }
        Ok(Command::Template(words)) => kilnd::template(&words),
        Ok(Command::Sandbox(words)) => kilnd::sandbox(&words),
        Err(msg) => {
            eprintln!("kiln: {msg}");
            run::EXIT_KILN
        }
    };
    cleanup::exit(code);
}
