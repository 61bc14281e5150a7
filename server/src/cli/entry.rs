//! `sigil-server entry create|show|update|delete`.

use sigil::proto::sigil::admin::v1::{
    BatchCreateEntryRequest, BatchDeleteEntryRequest, BatchEntryResponse, BatchUpdateEntryRequest,
    GetEntryRequest, ListEntriesRequest,
};
use sigil::proto::sigil::types::v1 as pb;
use sigil::{Selector, SpiffeId};

use super::{Output, SocketArg, client, emit, output, refused};

/// The entry subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum EntryCommand {
    /// Registers a new entry.
    Create(CreateArgs),
    /// Shows one entry, or the entries matching the filters.
    Show(ShowArgs),
    /// Replaces the fields of an entry.
    Update(UpdateArgs),
    /// Deletes an entry.
    Delete(DeleteArgs),
}

/// The fields of an entry.
#[derive(Debug, clap::Args)]
pub(crate) struct EntryFields {
    /// The SPIFFE ID of the SVIDs issued for the entry.
    #[arg(long, value_name = "ID")]
    spiffe_id: String,
    /// The SPIFFE ID of the agent (or entry) the workloads run under.
    #[arg(long, value_name = "ID")]
    parent_id: String,
    /// A selector the workload must have, `type:value` (repeatable).
    #[arg(long = "selector", value_name = "TYPE:VALUE", required = true)]
    selectors: Vec<String>,
    /// Lifetime of the entry's X509-SVIDs in seconds (0: the server's default).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(i32).range(0..))]
    x509_svid_ttl: Option<i32>,
    /// A DNS name for the SVIDs (repeatable).
    #[arg(long = "dns-name", value_name = "NAME")]
    dns_names: Vec<String>,
    /// A label passed to workloads with the SVID.
    #[arg(long, value_name = "TEXT")]
    hint: Option<String>,
}

/// `entry create`.
#[derive(Debug, clap::Args)]
pub(crate) struct CreateArgs {
    #[command(flatten)]
    fields: EntryFields,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    socket: SocketArg,
}

/// `entry show`.
#[derive(Debug, clap::Args)]
pub(crate) struct ShowArgs {
    /// Only the entry with this ID.
    #[arg(long, value_name = "ID")]
    entry_id: Option<String>,
    /// Only entries with this SPIFFE ID.
    #[arg(long, value_name = "ID")]
    spiffe_id: Option<String>,
    /// Only entries with this parent ID.
    #[arg(long, value_name = "ID")]
    parent_id: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    socket: SocketArg,
}

/// `entry update`.
#[derive(Debug, clap::Args)]
pub(crate) struct UpdateArgs {
    /// The ID of the entry to replace.
    #[arg(long, value_name = "ID")]
    entry_id: String,
    #[command(flatten)]
    fields: EntryFields,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    socket: SocketArg,
}

/// `entry delete`.
#[derive(Debug, clap::Args)]
pub(crate) struct DeleteArgs {
    /// The ID of the entry to delete.
    #[arg(long, value_name = "ID")]
    entry_id: String,
    #[command(flatten)]
    socket: SocketArg,
}

/// Runs an entry subcommand.
pub(crate) async fn run(command: EntryCommand) -> anyhow::Result<()> {
    match command {
        EntryCommand::Create(args) => create(args).await,
        EntryCommand::Show(args) => show(args).await,
        EntryCommand::Update(args) => update(args).await,
        EntryCommand::Delete(args) => delete(args).await,
    }
}

async fn create(args: CreateArgs) -> anyhow::Result<()> {
    let entry = args.fields.to_proto(String::new())?;
    let mut client = client::connect(&args.socket.socket_path).await?;
    let response = client
        .batch_create_entry(BatchCreateEntryRequest {
            entries: vec![entry],
        })
        .await
        .map_err(|s| refused(&s))?;
    print_entries(&single_result(response.into_inner())?, args.output, false);
    Ok(())
}

async fn update(args: UpdateArgs) -> anyhow::Result<()> {
    let entry = args.fields.to_proto(args.entry_id)?;
    let mut client = client::connect(&args.socket.socket_path).await?;
    let response = client
        .batch_update_entry(BatchUpdateEntryRequest {
            entries: vec![entry],
        })
        .await
        .map_err(|s| refused(&s))?;
    print_entries(&single_result(response.into_inner())?, args.output, false);
    Ok(())
}

async fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let mut client = client::connect(&args.socket.socket_path).await?;
    let response = client
        .batch_delete_entry(BatchDeleteEntryRequest {
            ids: vec![args.entry_id.clone()],
        })
        .await
        .map_err(|s| refused(&s))?;
    single_result(response.into_inner())?;
    emit(&format!("Deleted entry {}\n", args.entry_id));
    Ok(())
}

async fn show(args: ShowArgs) -> anyhow::Result<()> {
    let spiffe_id = args
        .spiffe_id
        .as_deref()
        .map(|v| check_id("--spiffe-id", v))
        .transpose()?;
    let parent_id = args
        .parent_id
        .as_deref()
        .map(|v| check_id("--parent-id", v))
        .transpose()?;
    let mut client = client::connect(&args.socket.socket_path).await?;

    let entries = if let Some(id) = args.entry_id {
        let entry = client
            .get_entry(GetEntryRequest { id })
            .await
            .map_err(|s| refused(&s))?
            .into_inner();
        let matches = spiffe_id.as_ref().is_none_or(|v| *v == entry.spiffe_id)
            && parent_id.as_ref().is_none_or(|v| *v == entry.parent_id);
        if matches { vec![entry] } else { Vec::new() }
    } else {
        let mut entries = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = client
                .list_entries(ListEntriesRequest {
                    by_spiffe_id: spiffe_id.clone().unwrap_or_default(),
                    by_parent_id: parent_id.clone().unwrap_or_default(),
                    page_size: 0,
                    page_token,
                })
                .await
                .map_err(|s| refused(&s))?
                .into_inner();
            entries.extend(page.entries);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        entries
    };
    print_entries(&entries, args.output, true);
    Ok(())
}

impl EntryFields {
    /// Validates the flags (before the server is contacted) and builds the
    /// wire entry.
    fn to_proto(&self, id: String) -> anyhow::Result<pb::Entry> {
        let spiffe_id = check_id("--spiffe-id", &self.spiffe_id)?;
        let parent_id = check_id("--parent-id", &self.parent_id)?;
        let selectors = self
            .selectors
            .iter()
            .map(|s| {
                let selector: Selector = s
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--selector {s:?}: {e}"))?;
                Ok(pb::Selector {
                    r#type: selector.kind().to_owned(),
                    value: selector.value().to_owned(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        for name in &self.dns_names {
            sigil::entry::validate_dns_name(name)
                .map_err(|e| anyhow::anyhow!("--dns-name {name:?}: {e}"))?;
        }
        Ok(pb::Entry {
            id,
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl: self.x509_svid_ttl.unwrap_or(0),
            dns_names: self.dns_names.clone(),
            hint: self.hint.clone().unwrap_or_default(),
            revision: 0,
            created_at: 0,
        })
    }
}

/// Checks a SPIFFE ID flag and returns it unchanged.
fn check_id(flag: &str, value: &str) -> anyhow::Result<String> {
    value
        .parse::<SpiffeId>()
        .map(|_| value.to_owned())
        .map_err(|e| anyhow::anyhow!("{flag} {value:?}: {e}"))
}

/// The one item of a batch response, or its refusal.
fn single_result(response: BatchEntryResponse) -> anyhow::Result<Vec<pb::Entry>> {
    let Some(result) = response.results.into_iter().next() else {
        anyhow::bail!("the server returned no result");
    };
    match result.status {
        Some(status) if status.code != tonic::Code::Ok as i32 => {
            anyhow::bail!("{}", status.message)
        }
        _ => Ok(result.entry.into_iter().collect()),
    }
}

fn print_entries(entries: &[pb::Entry], format: Output, header: bool) {
    let text = match format {
        Output::Json => format!("{}\n", output::entries_json(entries)),
        Output::Text if header && entries.is_empty() => format!("{}\n", output::found(0)),
        Output::Text if header => format!(
            "{}\n\n{}",
            output::found(entries.len()),
            output::entries_text(entries)
        ),
        Output::Text => output::entries_text(entries),
    };
    emit(&text);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> EntryFields {
        EntryFields {
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: "spiffe://example.org/agent".into(),
            selectors: vec!["unix:uid:1000".into()],
            x509_svid_ttl: None,
            dns_names: Vec::new(),
            hint: None,
        }
    }

    #[test]
    fn flags_are_validated_with_their_names() {
        let mut f = fields();
        f.spiffe_id = "spiffe://Bad/x".into();
        let err = f.to_proto(String::new()).unwrap_err().to_string();
        assert!(err.starts_with("--spiffe-id \"spiffe://Bad/x\": "), "{err}");

        let mut f = fields();
        f.selectors.push("unix".into());
        assert_eq!(
            f.to_proto(String::new()).unwrap_err().to_string(),
            "--selector \"unix\": must be `type:value`"
        );

        let mut f = fields();
        f.dns_names.push("bad name".into());
        let err = f.to_proto(String::new()).unwrap_err().to_string();
        assert!(err.starts_with("--dns-name \"bad name\": "), "{err}");
    }

    #[test]
    fn valid_flags_become_a_wire_entry() {
        let mut f = fields();
        f.x509_svid_ttl = Some(60);
        f.hint = Some("h".into());
        let e = f.to_proto("id1".into()).unwrap();
        assert_eq!(e.id, "id1");
        assert_eq!(e.selectors[0].r#type, "unix");
        assert_eq!(e.selectors[0].value, "uid:1000");
        assert_eq!(e.x509_svid_ttl, 60);
        assert_eq!(e.hint, "h");
    }
}
