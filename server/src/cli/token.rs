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
    /// Also registers ALIAS_ID as a node alias of the agent: an entry with
    /// this SPIFFE ID, the server's ID as parent and the selector
    /// `spiffe_id:<agent ID>`, so that entries whose parent is ALIAS_ID
    /// apply to this agent.
    #[arg(long, value_name = "ALIAS_ID")]
    alias: Option<String>,
    /// Seconds until the token expires.
    #[arg(long, value_name = "SECONDS", default_value_t = 600, value_parser = clap::value_parser!(i32).range(1..))]
    ttl: i32,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    socket: SocketArg,
}

/// Checks an ID given on the command line; `flag` names the option.
fn checked_id(flag: &str, id: Option<&String>) -> anyhow::Result<String> {
    match id {
        Some(id) => {
            id.parse::<sigil::SpiffeId>()
                .map_err(|e| anyhow::anyhow!("{flag} {id:?}: {e}"))?;
            Ok(id.clone())
        }
        None => Ok(String::new()),
    }
}

/// Runs a token subcommand.
pub(crate) async fn run(command: TokenCommand) -> anyhow::Result<()> {
    let TokenCommand::Generate(args) = command;
    let agent_id = checked_id("--spiffe-id", args.spiffe_id.as_ref())?;
    let alias_id = checked_id("--alias", args.alias.as_ref())?;
    let mut client = client::connect(&args.socket.socket_path).await?;
    let token = client
        .create_join_token(CreateJoinTokenRequest {
            agent_id,
            ttl: args.ttl,
            alias_id: alias_id.clone(),
        })
        .await
        .map_err(|s| refused(&s))?
        .into_inner();
    let expires_at = clock::rfc3339(token.expires_at);
    let text = match args.output {
        Output::Text => {
            let mut text = format!(
                "Token: {}\nAgent ID: {}\nExpires at: {expires_at}\n",
                token.token, token.agent_id
            );
            if !token.alias_entry_id.is_empty() {
                text.push_str(&format!(
                    "Alias: {alias_id}\nAlias entry ID: {}\n",
                    token.alias_entry_id
                ));
            }
            text
        }
        Output::Json => {
            let mut doc = serde_json::json!({
                "token": token.token,
                "agent_id": token.agent_id,
                "expires_at": expires_at,
            });
            if !token.alias_entry_id.is_empty() {
                doc["alias_id"] = alias_id.into();
                doc["alias_entry_id"] = token.alias_entry_id.into();
            }
            format!("{}\n", serde_json::to_string_pretty(&doc)?)
        }
    };
    emit(&text);
    Ok(())
}
