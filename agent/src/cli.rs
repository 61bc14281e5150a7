//! The command line of `sigil-agent`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, RunArgs};
use crate::workload;

/// The node agent of a Sigil trust domain.
#[derive(Debug, Parser)]
#[command(name = "sigil-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the agent: attests to the server, keeps the workload SVIDs
    /// rotated and serves the Workload API.
    Run(Box<RunArgs>),
    /// Calls the Workload API as a workload would.
    Api {
        #[command(subcommand)]
        command: ApiCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ApiCommand {
    /// Fetches once.
    Fetch {
        #[command(subcommand)]
        what: FetchWhat,
    },
    /// Prints every update of the caller's X.509-SVIDs.
    Watch(workload::cli::WatchArgs),
}

#[derive(Debug, Subcommand)]
enum FetchWhat {
    /// The caller's X.509-SVIDs and bundles.
    X509(workload::cli::FetchX509Args),
}

/// Parses the command line and runs the command.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Run(args) => return run(*args),
        Command::Api { command } => command,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            ApiCommand::Fetch {
                what: FetchWhat::X509(args),
            } => workload::cli::fetch_x509(args).await,
            ApiCommand::Watch(args) => workload::cli::watch(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `sigil-agent run`: exit code 2 for a bad configuration, 1 for a fatal
/// error, 0 after SIGINT or SIGTERM.
fn run(args: RunArgs) -> ExitCode {
    let config = match Config::load(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::from(2);
        }
    };
    crate::logging::init(&config.log_level, config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::run::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
