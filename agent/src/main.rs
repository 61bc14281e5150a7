//! `sigil-agent`: the node agent of a Sigil trust domain.

mod cache;
mod certs;
mod cli;
mod client;
mod config;
mod logging;
mod manager;
mod node;
mod retry;
mod run;
mod sync;
#[cfg(test)]
mod testing;
mod workload;

fn main() -> std::process::ExitCode {
    cli::main()
}
