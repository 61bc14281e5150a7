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
    /// Exits 0 only when the agent serves the Workload API.
    Healthcheck(workload::health::HealthcheckArgs),
    /// Checks the configuration as `run` does, without starting anything.
    Validate(Box<RunArgs>),
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
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Run(args) => return run(*args),
        Command::Api { command } => command,
        Command::Healthcheck(args) => return healthcheck(&args),
        Command::Validate(args) => return validate(*args),
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

/// `sigil-agent healthcheck`: `Agent is healthy` and 0, or a one-line
/// error and 1.
fn healthcheck(args: &workload::health::HealthcheckArgs) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
        .and_then(|rt| rt.block_on(workload::health::check(args)));
    match result {
        Ok(()) => {
            println!("Agent is healthy");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `sigil-agent validate`: `Configuration is valid` and 0, or every problem
/// on its own line and 1.
fn validate(args: RunArgs) -> ExitCode {
    match Config::load(args) {
        Ok(_) => {
            println!("Configuration is valid");
            ExitCode::SUCCESS
        }
        Err(e) => {
            for problem in &e.problems {
                eprintln!("{problem}");
            }
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
