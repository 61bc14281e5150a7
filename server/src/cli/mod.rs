//! The command line: `run` starts the server; `entry`, `token`, `bundle`
//! and `agent` are admin commands that talk to a running server over its admin socket.
//!
//! Exit codes: 0 success, 1 failure (printed as `Error: …` on stderr),
//! 2 usage or configuration error.

mod agent;
mod bundle;
pub(crate) mod client;
mod entry;
mod healthcheck;
mod output;
mod token;
mod x509;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, DEFAULT_ADMIN_SOCKET, RunArgs};

/// The Sigil server: the certificate authority of one SPIFFE trust domain.
#[derive(Debug, Parser)]
#[command(name = "sigil-server", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the server.
    Run(RunArgs),
    /// Manages registration entries.
    #[command(subcommand)]
    Entry(entry::EntryCommand),
    /// Manages join tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Shows the trust bundle.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Lists, evicts and bans attested agents.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Issues X.509-SVIDs without an entry.
    #[command(subcommand)]
    X509(x509::X509Command),
    /// Exits 0 only when the server answers on its admin socket.
    Healthcheck(healthcheck::HealthcheckArgs),
    /// Checks the configuration as `run` does, without starting anything.
    Validate(RunArgs),
}

/// The admin socket option shared by every admin command.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SocketArg {
    /// Path of the server's admin socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET)]
    pub(crate) socket_path: PathBuf,
}

/// How admin commands print their results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub(crate) enum Output {
    /// Human-readable text.
    #[default]
    Text,
    /// JSON.
    Json,
}

/// Parses the command line and runs the command.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(&args),
        Command::Entry(cmd) => admin(entry::run(cmd)),
        Command::Token(cmd) => admin(token::run(cmd)),
        Command::Bundle(cmd) => admin(bundle::run(cmd)),
        Command::Agent(cmd) => admin(agent::run(cmd)),
        Command::X509(cmd) => admin(x509::run(cmd)),
        Command::Healthcheck(args) => admin(healthcheck::run(args)),
        Command::Validate(args) => validate(&args),
    }
}

fn run(args: &RunArgs) -> ExitCode {
    let config = match config::load(args) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("Error: {errors}");
            return ExitCode::from(2);
        }
    };
    crate::logging::init(&config.log_level, config.log_format);
    let result = runtime().and_then(|rt| rt.block_on(crate::serve::run(config)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `validate`: every problem on its own line and exit code 1, or
/// `Configuration is valid`.
fn validate(args: &RunArgs) -> ExitCode {
    match config::load(args) {
        Ok(_) => {
            emit("Configuration is valid\n");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for problem in &errors.0 {
                eprintln!("{problem}");
            }
            ExitCode::FAILURE
        }
    }
}

fn admin(command: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    match runtime().and_then(|rt| rt.block_on(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Writes a command's output to stdout. A closed pipe (`| head`) is not an
/// error worth reporting.
pub(crate) fn emit(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

/// The message of a refusal from the server.
pub(crate) fn refused(status: &tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", status.message())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
