//! `sigil-server token generate`.

use sigil::proto::sigil::admin::v1::CreateJoinTokenRequest;

use super::{Output, SocketArg, client, emit, refused};
use crate::clock;

/// The token subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum TokenCommand {
    /// Creates a one-time join token for a new agent.
    Generate(GenerateArgs),
}

/// `token generate`.
#[derive(Debug, clap::Args)]
pub(crate) struct GenerateArgs {
    /// The SPIFFE ID the agent gets [default: spiffe://<td>/sigil/agent/join_token/<token-id>].
    #[arg(long, value_name = "ID")]
    spiffe_id: Option<String>,
    /// Seconds until the token expires.
    #[arg(long, value_name = "SECONDS", default_value_t = 600, value_parser = clap::value_parser!(i32).range(1..))]
    ttl: i32,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    socket: SocketArg,
}

/// Runs a token subcommand.
pub(crate) async fn run(command: TokenCommand) -> anyhow::Result<()> {
    let TokenCommand::Generate(args) = command;
    let agent_id = match &args.spiffe_id {
        Some(id) => {
            id.parse::<sigil::SpiffeId>()
                .map_err(|e| anyhow::anyhow!("--spiffe-id {id:?}: {e}"))?;
            id.clone()
        }
        None => String::new(),
    };
    let mut client = client::connect(&args.socket.socket_path).await?;
    let token = client
        .create_join_token(CreateJoinTokenRequest {
            agent_id,
            ttl: args.ttl,
        })
        .await
        .map_err(|s| refused(&s))?
        .into_inner();
    let expires_at = clock::rfc3339(token.expires_at);
    let text = match args.output {
        Output::Text => format!(
            "Token: {}\nAgent ID: {}\nExpires at: {expires_at}\n",
            token.token, token.agent_id
        ),
        Output::Json => {
            let doc = serde_json::json!({
                "token": token.token,
                "agent_id": token.agent_id,
                "expires_at": expires_at,
            });
            format!("{}\n", serde_json::to_string_pretty(&doc)?)
        }
    };
    emit(&text);
    Ok(())
}
