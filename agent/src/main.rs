//! `kiln-agent`: Kiln's guest agent (see `kiln_agent::guest`).

fn main() -> std::process::ExitCode {
    kiln_agent::guest::main()
}
