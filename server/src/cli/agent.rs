//! `sigil-server agent list|show|count|evict|ban|unban`.

use std::fmt::Write;

use sigil::proto::sigil::admin::v1::{Agent, AgentIdRequest, ListAgentsRequest};

use super::entry::{check_selector, parse_expiry};
use super::{Output, SocketArg, client, emit, refused};
use crate::clock;

/// The agent subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum AgentCommand {
    /// Lists attested agents.
    List(ListArgs),
    /// Shows one attested agent.
    Show(IdArgs),
    /// Counts attested agents.
    Count(ListArgs),
    /// Deletes an agent's record: the agent must attest again.
    Evict(IdArgs),
    /// Bans an agent: it can neither renew, sync, get SVIDs signed nor
    /// attest again until unbanned.
    Ban(IdArgs),
    /// Lifts an agent's ban.
    Unban(IdArgs),
}

/// `agent list` and `agent count`.
#[derive(Debug, clap::Args)]
pub(crate) struct ListArgs {
    /// Only agents attested with this node attestor, e.g. join_token.
    #[arg(long, value_name = "TYPE")]
    attestation_type: Option<String>,
    /// Only agents with this node selector (TYPE:VALUE); repeatable, all must match.
    #[arg(long, value_name = "SELECTOR")]
    selector: Vec<String>,
    /// Only agents whose SVID expires before TIME (RFC 3339 in UTC, or
    /// seconds since the Unix epoch).
    #[arg(long, value_name = "TIME", value_parser = parse_expiry)]
    expires_before: Option<i64>,
    /// Only banned (true) or only not banned (false) agents.
    #[arg(long, value_name = "BOOL")]
    banned: Option<bool>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    socket: SocketArg,
}

/// Commands that name one agent.
#[derive(Debug, clap::Args)]
pub(crate) struct IdArgs {
    /// The agent's SPIFFE ID.
    #[arg(long, value_name = "ID")]
    spiffe_id: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    socket: SocketArg,
}

/// Runs an agent subcommand.
pub(crate) async fn run(command: AgentCommand) -> anyhow::Result<()> {
    match command {
        AgentCommand::List(args) => list(args, false).await,
        AgentCommand::Count(args) => list(args, true).await,
        AgentCommand::Show(args) => one(args, Action::Show).await,
        AgentCommand::Evict(args) => one(args, Action::Evict).await,
        AgentCommand::Ban(args) => one(args, Action::Ban).await,
        AgentCommand::Unban(args) => one(args, Action::Unban).await,
    }
}

impl ListArgs {
    fn to_request(&self) -> anyhow::Result<ListAgentsRequest> {
        Ok(ListAgentsRequest {
            by_attestation_type: self.attestation_type.clone().unwrap_or_default(),
            by_selectors: self
                .selector
                .iter()
                .map(|s| check_selector(s))
                .collect::<anyhow::Result<_>>()?,
            by_expires_before: self.expires_before.unwrap_or(0),
            by_banned: self.banned,
        })
    }
}

async fn list(args: ListArgs, count_only: bool) -> anyhow::Result<()> {
    let request = args.to_request()?;
    let mut client = client::connect(&args.socket.socket_path).await?;
    if count_only {
        let count = client
            .count_agents(request)
            .await
            .map_err(|s| refused(&s))?
            .into_inner()
            .count;
        match args.output {
            Output::Text if count == 1 => emit("1 agent\n"),
            Output::Text => emit(&format!("{count} agents\n")),
            Output::Json => emit(&format!("{}\n", serde_json::json!({ "count": count }))),
        }
        return Ok(());
    }
    let agents = client
        .list_agents(request)
        .await
        .map_err(|s| refused(&s))?
        .into_inner()
        .agents;
    let text = match args.output {
        Output::Text => {
            let header = if agents.len() == 1 {
                "Found 1 attested agent".to_owned()
            } else {
                format!("Found {} attested agents", agents.len())
            };
            let blocks: Vec<String> = agents.iter().map(agent_text).collect();
            if blocks.is_empty() {
                format!("{header}\n")
            } else {
                format!("{header}:\n\n{}", blocks.join("\n"))
            }
        }
        Output::Json => {
            let values: Vec<serde_json::Value> = agents.iter().map(agent_json).collect();
            format!("{}\n", serde_json::to_string_pretty(&values)?)
        }
    };
    emit(&text);
    Ok(())
}

/// What to do with one agent.
#[derive(Debug, Clone, Copy)]
enum Action {
    Show,
    Evict,
    Ban,
    Unban,
}

/// Runs a call naming one agent and prints the agent (`show`) or what
/// happened to it.
async fn one(args: IdArgs, action: Action) -> anyhow::Result<()> {
    args.spiffe_id
        .parse::<sigil::SpiffeId>()
        .map_err(|e| anyhow::anyhow!("--spiffe-id {:?}: {e}", args.spiffe_id))?;
    let mut client = client::connect(&args.socket.socket_path).await?;
    let request = AgentIdRequest {
        spiffe_id: args.spiffe_id.clone(),
    };
    let (answer, done) = match action {
        Action::Show => (client.get_agent(request).await, ""),
        Action::Evict => (client.evict_agent(request).await, "evicted"),
        Action::Ban => (client.ban_agent(request).await, "banned"),
        Action::Unban => (client.unban_agent(request).await, "unbanned"),
    };
    let agent = answer.map_err(|s| refused(&s))?.into_inner();
    let text = match args.output {
        Output::Text if done.is_empty() => agent_text(&agent),
        Output::Text => format!("Agent {} {done}\n", agent.spiffe_id),
        Output::Json => format!("{}\n", serde_json::to_string_pretty(&agent_json(&agent))?),
    };
    emit(&text);
    Ok(())
}

/// One agent as a text block.
fn agent_text(a: &Agent) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: &dyn std::fmt::Display| {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{label:<17}: {value}");
    };
    line("SPIFFE ID", &a.spiffe_id);
    line("Attestation type", &a.attestation_type);
    line("Expiration time", &clock::rfc3339(a.expires_at));
    line("Serial number", &a.serial);
    line("Attested at", &clock::rfc3339(a.created_at));
    line("Banned", &a.banned);
    for s in &a.selectors {
        line("Selector", &format!("{}:{}", s.r#type, s.value));
    }
    out
}

/// One agent as a JSON object.
fn agent_json(a: &Agent) -> serde_json::Value {
    serde_json::json!({
        "spiffe_id": a.spiffe_id,
        "attestation_type": a.attestation_type,
        "expires_at": clock::rfc3339(a.expires_at),
        "serial": a.serial,
        "created_at": clock::rfc3339(a.created_at),
        "banned": a.banned,
        "selectors": a
            .selectors
            .iter()
            .map(|s| serde_json::json!({ "type": s.r#type, "value": s.value }))
            .collect::<Vec<_>>(),
    })
}
