//! The node agent of a Sigil trust domain, as a library: the `sigil-agent`
//! binary runs [`cli::main`], and the benchmarks in `benches/` call the
//! workload attestors directly.

mod cache;
mod certs;
pub mod cli;
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
pub mod workload;
