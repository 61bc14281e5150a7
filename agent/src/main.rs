//! `sigil-agent`: the node agent of a Sigil trust domain.

fn main() -> std::process::ExitCode {
    sigil_agent::cli::main()
}
