//! `sigil-server localauthority x509 show|prepare|activate|taint|revoke`:
//! the operator's view of the X.509 signing authorities and control over
//! their rotation, taint and revocation.

use std::fmt::Write;
use std::path::Path;

use sigil::proto::sigil::admin::v1::local_authority_client::LocalAuthorityClient;
use sigil::proto::sigil::admin::v1::{
    GetX509AuthoritiesRequest, PrepareX509AuthorityRequest, RevokeX509AuthorityRequest,
    X509Authority, X509AuthorityRequest, X509AuthorityState,
};
use sigil::transport::{error_chain, unix_channel};
use tonic::transport::Channel;

use super::{Output, SocketArg, emit, refused};
use crate::clock;

/// The local authority subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum LocalAuthorityCommand {
    /// The X.509 signing authorities.
    #[command(subcommand)]
    X509(X509AuthorityCommand),
}

/// The X.509 authority subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum X509AuthorityCommand {
    /// Lists the authorities with their state, times and live SVIDs.
    Show(OutputArgs),
    /// Prepares the next authority now: published in the bundle, not yet
    /// signing.
    Prepare(OutputArgs),
    /// Makes the prepared authority the signing one; the one it replaces
    /// stays in the bundle.
    Activate(IdArgs),
    /// Taints a prepared or old authority: agents replace every SVID it
    /// signed.
    Taint(IdArgs),
    /// Removes a tainted authority from the bundle.
    Revoke(RevokeArgs),
}

/// Commands without an authority.
#[derive(Debug, clap::Args)]
pub(crate) struct OutputArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    socket: SocketArg,
}

/// Commands that name one authority.
#[derive(Debug, clap::Args)]
pub(crate) struct IdArgs {
    /// The authority's subject key identifier, in hex.
    #[arg(long, value_name = "SKI")]
    authority_id: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    socket: SocketArg,
}

/// `revoke`.
#[derive(Debug, clap::Args)]
pub(crate) struct RevokeArgs {
    #[command(flatten)]
    id: IdArgs,
    /// Revoke even though SVIDs it signed are still live.
    #[arg(long)]
    force: bool,
}

/// Runs a local authority subcommand.
pub(crate) async fn run(command: LocalAuthorityCommand) -> anyhow::Result<()> {
    let LocalAuthorityCommand::X509(command) = command;
    match command {
        X509AuthorityCommand::Show(args) => show(args).await,
        X509AuthorityCommand::Prepare(args) => {
            let mut client = connect(&args.socket.socket_path).await?;
            let answer = client
                .prepare_x509_authority(PrepareX509AuthorityRequest {})
                .await;
            print_one(answer, "prepared", args.output)
        }
        X509AuthorityCommand::Activate(args) => {
            let request = id_request(&args)?;
            let mut client = connect(&args.socket.socket_path).await?;
            let answer = client.activate_x509_authority(request).await;
            print_one(answer, "activated", args.output)
        }
        X509AuthorityCommand::Taint(args) => {
            let request = id_request(&args)?;
            let mut client = connect(&args.socket.socket_path).await?;
            let answer = client.taint_x509_authority(request).await;
            print_one(answer, "tainted", args.output)
        }
        X509AuthorityCommand::Revoke(args) => {
            let request = RevokeX509AuthorityRequest {
                authority_id: id_request(&args.id)?.authority_id,
                force: args.force,
            };
            let mut client = connect(&args.id.socket.socket_path).await?;
            let answer = client.revoke_x509_authority(request).await;
            print_one(answer, "revoked", args.id.output)
        }
    }
}

async fn connect(path: &Path) -> anyhow::Result<LocalAuthorityClient<Channel>> {
    let channel = unix_channel(path).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the server's admin socket {}: {}",
            path.display(),
            error_chain(&e)
        )
    })?;
    Ok(LocalAuthorityClient::new(channel))
}

fn id_request(args: &IdArgs) -> anyhow::Result<X509AuthorityRequest> {
    let id = args.authority_id.trim();
    if id.is_empty() {
        anyhow::bail!("--authority-id: is required");
    }
    Ok(X509AuthorityRequest {
        authority_id: id.to_owned(),
    })
}

async fn show(args: OutputArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.socket.socket_path).await?;
    let authorities = client
        .get_x509_authorities(GetX509AuthoritiesRequest {})
        .await
        .map_err(|s| refused(&s))?
        .into_inner()
        .authorities;
    let text = match args.output {
        Output::Text => {
            let header = match authorities.len() {
                1 => "Found 1 X.509 authority".to_owned(),
                n => format!("Found {n} X.509 authorities"),
            };
            let blocks: Vec<String> = authorities.iter().map(authority_text).collect();
            if blocks.is_empty() {
                format!("{header}\n")
            } else {
                format!("{header}:\n\n{}", blocks.join("\n"))
            }
        }
        Output::Json => {
            let values: Vec<serde_json::Value> = authorities.iter().map(authority_json).collect();
            format!("{}\n", serde_json::to_string_pretty(&values)?)
        }
    };
    emit(&text);
    Ok(())
}

fn print_one(
    answer: Result<tonic::Response<X509Authority>, tonic::Status>,
    done: &str,
    output: Output,
) -> anyhow::Result<()> {
    let authority = answer.map_err(|s| refused(&s))?.into_inner();
    let text = match output {
        Output::Text => format!(
            "X.509 authority {} {done}\n\n{}",
            authority.authority_id,
            authority_text(&authority)
        ),
        Output::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(&authority_json(&authority))?
        ),
    };
    emit(&text);
    Ok(())
}

/// The lowercase name of a state.
fn state_name(state: i32) -> &'static str {
    match X509AuthorityState::try_from(state) {
        Ok(X509AuthorityState::Prepared) => "prepared",
        Ok(X509AuthorityState::Active) => "active",
        Ok(X509AuthorityState::Old) => "old",
        Ok(X509AuthorityState::Tainted) => "tainted",
        Ok(X509AuthorityState::Revoked) => "revoked",
        Ok(X509AuthorityState::Unspecified) | Err(_) => "unknown",
    }
}

/// A time, or nothing when it is unset (0).
fn time(secs: i64) -> Option<String> {
    (secs != 0).then(|| clock::rfc3339(secs))
}

/// One authority as a text block.
fn authority_text(a: &X509Authority) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: &dyn std::fmt::Display| {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{label:<15}: {value}");
    };
    line("Authority ID", &a.authority_id);
    line("State", &state_name(a.state));
    let times = [
        ("Created at", a.created_at),
        ("Expires at", a.not_after),
        ("Activated at", a.activated_at),
        ("Deactivated at", a.deactivated_at),
        ("Retires at", a.retire_at),
        ("Tainted at", a.tainted_at),
        ("Revoked at", a.revoked_at),
    ];
    for (label, secs) in times {
        if let Some(at) = time(secs) {
            line(label, &at);
        }
    }
    line("Live SVIDs", &a.live_svids);
    for agent in &a.agents {
        let svids = match agent.svids {
            1 => "1 SVID".to_owned(),
            n => format!("{n} SVIDs"),
        };
        line("Agent", &format!("{} ({svids})", agent.agent_id));
    }
    out
}

/// One authority as a JSON object.
fn authority_json(a: &X509Authority) -> serde_json::Value {
    serde_json::json!({
        "authority_id": a.authority_id,
        "state": state_name(a.state),
        "created_at": time(a.created_at),
        "expires_at": time(a.not_after),
        "activated_at": time(a.activated_at),
        "deactivated_at": time(a.deactivated_at),
        "retire_at": time(a.retire_at),
        "tainted_at": time(a.tainted_at),
        "revoked_at": time(a.revoked_at),
        "live_svids": a.live_svids,
        "agents": a
            .agents
            .iter()
            .map(|g| serde_json::json!({ "agent_id": g.agent_id, "svids": g.svids }))
            .collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use sigil::proto::sigil::admin::v1::AgentSvidCount;

    use super::*;

    fn authority() -> X509Authority {
        X509Authority {
            authority_id: "ab01".into(),
            state: X509AuthorityState::Tainted as i32,
            created_at: 1_800_000_000,
            not_after: 1_800_086_400,
            activated_at: 1_800_000_000,
            deactivated_at: 1_800_000_100,
            retire_at: 1_800_014_500,
            tainted_at: 1_800_000_200,
            revoked_at: 0,
            live_svids: 3,
            agents: vec![
                AgentSvidCount {
                    agent_id: "spiffe://example.org/a".into(),
                    svids: 2,
                },
                AgentSvidCount {
                    agent_id: "spiffe://example.org/b".into(),
                    svids: 1,
                },
            ],
            certificate: Vec::new(),
        }
    }

    #[test]
    fn an_authority_reads_with_its_state_times_and_agents() {
        assert_eq!(
            authority_text(&authority()),
            "Authority ID   : ab01\n\
             State          : tainted\n\
             Created at     : 2027-01-15T08:00:00Z\n\
             Expires at     : 2027-01-16T08:00:00Z\n\
             Activated at   : 2027-01-15T08:00:00Z\n\
             Deactivated at : 2027-01-15T08:01:40Z\n\
             Retires at     : 2027-01-15T12:01:40Z\n\
             Tainted at     : 2027-01-15T08:03:20Z\n\
             Live SVIDs     : 3\n\
             Agent          : spiffe://example.org/a (2 SVIDs)\n\
             Agent          : spiffe://example.org/b (1 SVID)\n"
        );
        let json = authority_json(&authority());
        assert_eq!(json["state"], "tainted");
        assert_eq!(json["revoked_at"], serde_json::Value::Null);
        assert_eq!(json["agents"][0]["svids"], 2);
    }
}
