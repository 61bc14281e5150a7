//! The command line: `run` starts the server; `entry`, `token`, `bundle`
//! and `agent` are admin commands that talk to a running server over its
//! admin socket or, with the global `--server-address`, over mTLS as an
//! admin workload.
//!
//! Exit codes: 0 success, 1 failure (printed as `Error: …` on stderr),
//! 2 usage or configuration error.

mod agent;
mod bundle;
pub(crate) mod client;
mod entry;
mod healthcheck;
mod localauthority;
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
    #[command(flatten)]
    remote: RemoteArgs,
    #[command(subcommand)]
    command: Command,
}

/// The global options that send admin commands over the network instead
/// of the admin socket.
#[derive(Debug, Clone, Default, clap::Args)]
struct RemoteArgs {
    /// Talk to the server at HOST:PORT (its agent API port) over mTLS as an
    /// admin workload, instead of over the admin socket.
    #[arg(long, value_name = "HOST:PORT", global = true)]
    server_address: Option<String>,
    /// Directory with the admin workload's SVID, as `sigil-agent api fetch
    /// x509 --write DIR` writes it (svid.0.pem, svid.0.key, bundle.0.pem).
    #[arg(long, value_name = "DIR", global = true, conflicts_with_all = ["cert", "key", "bundle"])]
    svid_dir: Option<PathBuf>,
    /// The admin workload's X509-SVID chain (PEM), instead of --svid-dir.
    #[arg(long, value_name = "FILE", global = true, requires_all = ["key", "bundle"])]
    cert: Option<PathBuf>,
    /// The SVID's private key (PEM), with --cert.
    #[arg(long, value_name = "FILE", global = true, requires = "cert")]
    key: Option<PathBuf>,
    /// The trust domain's bundle (PEM), with --cert.
    #[arg(long, value_name = "FILE", global = true, requires = "cert")]
    bundle: Option<PathBuf>,
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
    /// Shows, prepares, activates, taints and revokes the signing
    /// authorities.
    #[command(subcommand, name = "localauthority")]
    LocalAuthority(localauthority::LocalAuthorityCommand),
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
    let server_command = matches!(cli.command, Command::Run(_) | Command::Validate(_));
    match remote(cli.remote, server_command) {
        Ok(Some(remote)) => client::use_remote(remote),
        Ok(None) => {}
        Err(e) => e.exit(),
    }
    match cli.command {
        Command::Run(args) => run(&args),
        Command::Entry(cmd) => admin(entry::run(cmd)),
        Command::Token(cmd) => admin(token::run(cmd)),
        Command::Bundle(cmd) => admin(bundle::run(cmd)),
        Command::Agent(cmd) => admin(agent::run(cmd)),
        Command::X509(cmd) => admin(x509::run(cmd)),
        Command::LocalAuthority(cmd) => admin(localauthority::run(cmd)),
        Command::Healthcheck(args) => admin(healthcheck::run(args)),
        Command::Validate(args) => validate(&args),
    }
}

/// The remote server the global options choose, if any; `server_command`
/// (`run`, `validate`) takes none.
fn remote(args: RemoteArgs, server_command: bool) -> Result<Option<client::Remote>, clap::Error> {
    use clap::CommandFactory;
    use clap::error::ErrorKind;

    let identity_given = args.svid_dir.is_some() || args.cert.is_some();
    let Some(address) = args.server_address else {
        if identity_given {
            return Err(Cli::command().error(
                ErrorKind::MissingRequiredArgument,
                "--svid-dir and --cert are used with --server-address",
            ));
        }
        return Ok(None);
    };
    if server_command {
        return Err(Cli::command().error(
            ErrorKind::ArgumentConflict,
            "--server-address is for admin commands, not for `run` or `validate`",
        ));
    }
    match (args.svid_dir, args.cert, args.key, args.bundle) {
        (Some(dir), None, None, None) => Ok(Some(client::Remote::from_svid_dir(address, &dir))),
        (None, Some(cert), Some(key), Some(bundle)) => Ok(Some(client::Remote {
            address,
            cert,
            key,
            bundle,
        })),
        _ => Err(Cli::command().error(
            ErrorKind::MissingRequiredArgument,
            "--server-address needs --svid-dir DIR, or --cert, --key and --bundle",
        )),
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

    fn remote_of(args: &[&str]) -> Result<Option<client::Remote>, clap::error::ErrorKind> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.kind())?;
        let server_command = matches!(cli.command, Command::Run(_) | Command::Validate(_));
        remote(cli.remote, server_command).map_err(|e| e.kind())
    }

    #[test]
    fn the_remote_flags_apply_to_every_admin_command() {
        let expected = client::Remote::from_svid_dir("h:8081".into(), std::path::Path::new("/s"));
        for args in [
            &[
                "sigil-server",
                "entry",
                "show",
                "--server-address",
                "h:8081",
                "--svid-dir",
                "/s",
            ][..],
            &[
                "sigil-server",
                "--server-address",
                "h:8081",
                "--svid-dir",
                "/s",
                "agent",
                "list",
            ],
            &[
                "sigil-server",
                "bundle",
                "--server-address",
                "h:8081",
                "show",
                "--svid-dir",
                "/s",
            ],
        ] {
            assert_eq!(remote_of(args).unwrap(), Some(expected.clone()), "{args:?}");
        }
        let explicit = remote_of(&[
            "sigil-server",
            "token",
            "generate",
            "--server-address",
            "h:1",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
            "--bundle",
            "b.pem",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(explicit.cert, PathBuf::from("c.pem"));
        assert_eq!(explicit.key, PathBuf::from("k.pem"));
        assert_eq!(explicit.bundle, PathBuf::from("b.pem"));
        assert_eq!(remote_of(&["sigil-server", "entry", "show"]).unwrap(), None);
    }

    #[test]
    fn incomplete_or_misplaced_remote_flags_are_usage_errors() {
        use clap::error::ErrorKind;
        let cases: [&[&str]; 5] = [
            &["sigil-server", "entry", "show", "--server-address", "h:1"],
            &["sigil-server", "entry", "show", "--svid-dir", "/s"],
            &[
                "sigil-server",
                "entry",
                "show",
                "--server-address",
                "h:1",
                "--cert",
                "c",
            ],
            &[
                "sigil-server",
                "entry",
                "show",
                "--server-address",
                "h:1",
                "--svid-dir",
                "/s",
                "--cert",
                "c",
                "--key",
                "k",
                "--bundle",
                "b",
            ],
            &[
                "sigil-server",
                "run",
                "--server-address",
                "h:1",
                "--svid-dir",
                "/s",
            ],
        ];
        for args in cases {
            let kind = remote_of(args).unwrap_err();
            assert!(
                matches!(
                    kind,
                    ErrorKind::MissingRequiredArgument | ErrorKind::ArgumentConflict
                ),
                "{args:?}: {kind:?}"
            );
        }
    }
}
