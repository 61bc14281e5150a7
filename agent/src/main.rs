//! `sigil-agent`: the node agent of a Sigil trust domain.

mod cache;
mod cli;
mod workload;

fn main() -> std::process::ExitCode {
    cli::main()
}
