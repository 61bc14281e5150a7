//! `sigil-server`: the certificate authority of one SPIFFE trust domain.
//!
//! It keeps the registration entries, attests node agents, and signs their
//! SVIDs and their workloads' SVIDs. Agents reach it over the agent API
//! (TCP, mTLS); operators over the admin API on a local Unix socket, through
//! the admin commands of this same binary, and admin workloads over the
//! admin API on the agent API's port (mTLS). Changes are audited.

mod api;
mod attest;
mod audit;
mod ca;
mod cli;
mod clock;
mod config;
mod listen;
mod logging;
mod registry;
mod serve;
mod shutdown;
mod store;
mod tokens;

fn main() -> std::process::ExitCode {
    cli::main()
}
