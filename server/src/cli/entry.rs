//! `sigil-server entry create|show|count|update|delete`.
//!
//! Create, update and delete take one entry from flags, or several from a
//! JSON file (`--data FILE`, see [`data`]); every entry of a file is answered
//! with its own status line, and the command fails if any entry failed.

mod data;

use std::path::PathBuf;

use sigil::proto::sigil::admin::v1::{
    BatchCreateEntryRequest, BatchDeleteEntryRequest, BatchEntryResponse, BatchUpdateEntryRequest,
    CountEntriesRequest, GetEntryRequest, ListEntriesRequest, SelectorMatch,
};
use sigil::proto::sigil::types::v1 as pb;
use sigil::{Selector, SpiffeId, TrustDomain};

use super::{Output, SocketArg, client, emit, output, refused};

/// The entry subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum EntryCommand {
    /// Registers new entries.
    Create(CreateArgs),
    /// Shows the entries matching the filters.
    Show(ShowArgs),
    /// Counts the entries matching the filters.
    Count(CountArgs),
    /// Replaces the fields of entries.
    Update(UpdateArgs),
    /// Deletes entries.
    Delete(DeleteArgs),
}

/// The fields of an entry.
#[derive(Debug, clap::Args)]
#[group(id = "fields", multiple = true)]
pub(crate) struct EntryFields {
    /// The SPIFFE ID of the SVIDs issued for the entry.
    #[arg(long, value_name = "ID", required_unless_present = "data")]
    spiffe_id: Option<String>,
    /// The SPIFFE ID of the agent (or entry) the workloads run under.
    #[arg(long, value_name = "ID", required_unless_present = "data")]
    parent_id: Option<String>,
    /// A selector the workload must have, `type:value` (repeatable).
    #[arg(
        long = "selector",
        value_name = "TYPE:VALUE",
        required_unless_present = "data"
    )]
    selectors: Vec<String>,
    /// Lifetime of the entry's X509-SVIDs in seconds (0: the server's default).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(i32).range(0..))]
    x509_svid_ttl: Option<i32>,
    /// Lifetime of the entry's JWT-SVIDs in seconds (0: the server's default).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(i32).range(0..))]
    jwt_svid_ttl: Option<i32>,
    /// A DNS name for the SVIDs (repeatable).
    #[arg(long = "dns-name", value_name = "NAME")]
    dns_names: Vec<String>,
    /// A label passed to workloads with the SVID.
    #[arg(long, value_name = "TEXT")]
    hint: Option<String>,
    /// A trust domain whose bundle the workloads also receive (repeatable).
    #[arg(long = "federates-with", value_name = "TRUST_DOMAIN")]
    federates_with: Vec<String>,
    /// The workloads may call the admin API.
    #[arg(long)]
    admin: bool,
    /// The workloads may mint SVIDs for others.
    #[arg(long)]
    downstream: bool,
    /// When the entry expires: RFC 3339 in UTC (`2030-01-01T00:00:00Z`) or
    /// seconds since the Unix epoch (0: never).
    #[arg(long, value_name = "TIME", value_parser = parse_expiry)]
    entry_expiry: Option<i64>,
}

/// `entry create`.
#[derive(Debug, clap::Args)]
pub(crate) struct CreateArgs {
    /// The new entry's ID (letters, digits, `-`, `_`, `.`; at most 255
    /// bytes); the server picks one by default. An ID that exists is refused,
    /// so a create can be retried safely.
    #[arg(long, value_name = "ID")]
    entry_id: Option<String>,
    #[command(flatten)]
    fields: EntryFields,
    /// Creates the entries of a JSON file, `{"entries": [...]}`, each entry
    /// shaped like the entries of `--output json`.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["fields", "entry_id"])]
    data: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    socket: SocketArg,
}

/// The filters of `entry show` and `entry count`.
#[derive(Debug, clap::Args)]
pub(crate) struct FilterArgs {
    /// Only the entry with this ID.
    #[arg(long, value_name = "ID")]
    entry_id: Option<String>,
    /// Only entries with this SPIFFE ID.
    #[arg(long, value_name = "ID")]
    spiffe_id: Option<String>,
    /// Only entries with this parent ID.
    #[arg(long, value_name = "ID")]
    parent_id: Option<String>,
    /// Only entries federating with this trust domain (repeatable: with all).
    #[arg(long = "federates-with", value_name = "TRUST_DOMAIN")]
    federates_with: Vec<String>,
    /// Only entries with exactly this hint.
    #[arg(long, value_name = "TEXT")]
    hint: Option<String>,
    /// Only entries whose selectors match these (repeatable; see `--match`).
    #[arg(long = "selector", value_name = "TYPE:VALUE")]
    selectors: Vec<String>,
    /// How `--selector` matches: the entry has exactly these selectors
    /// (`exact`), only some of them (`subset`), all of them and maybe more
    /// (`superset`, the default), or any of them (`any`).
    #[arg(
        long = "match",
        value_enum,
        value_name = "MODE",
        requires = "selectors"
    )]
    match_mode: Option<MatchMode>,
}

/// How a selector filter matches an entry's selectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum MatchMode {
    /// Exactly the given selectors.
    Exact,
    /// Only selectors among the given ones.
    Subset,
    /// All the given selectors, and maybe more.
    Superset,
    /// At least one of the given selectors.
    Any,
}

/// `entry show`.
#[derive(Debug, clap::Args)]
pub(crate) struct ShowArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    socket: SocketArg,
}

/// `entry count`.
#[derive(Debug, clap::Args)]
pub(crate) struct CountArgs {
    #[command(flatten)]
    filter: FilterArgs,
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
    #[arg(long, value_name = "ID", required_unless_present = "data")]
    entry_id: Option<String>,
    #[command(flatten)]
    fields: EntryFields,
    /// Replaces the entries of a JSON file, `{"entries": [...]}`, each entry
    /// shaped like the entries of `--output json` and naming its `id`.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["fields", "entry_id"])]
    data: Option<PathBuf>,
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
    #[arg(long, value_name = "ID", required_unless_present = "data")]
    entry_id: Option<String>,
    /// Deletes the entries of a JSON file, `{"entries": [{"id": ...}, ...]}`;
    /// only their `id` is used.
    #[arg(long, value_name = "FILE", conflicts_with = "entry_id")]
    data: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    socket: SocketArg,
}

/// Runs an entry subcommand.
pub(crate) async fn run(command: EntryCommand) -> anyhow::Result<()> {
    match command {
        EntryCommand::Create(args) => create(args).await,
        EntryCommand::Show(args) => show(args).await,
        EntryCommand::Count(args) => count(args).await,
        EntryCommand::Update(args) => update(args).await,
        EntryCommand::Delete(args) => delete(args).await,
    }
}

async fn create(args: CreateArgs) -> anyhow::Result<()> {
    let (entries, batch) = match &args.data {
        Some(path) => (data::read(path)?, true),
        None => {
            let id = args.entry_id.clone().unwrap_or_default();
            (vec![args.fields.to_proto(id)?], false)
        }
    };
    let mut client = client::connect(&args.socket.socket_path).await?;
    let response = client
        .batch_create_entry(BatchCreateEntryRequest { entries })
        .await
        .map_err(|s| refused(&s))?
        .into_inner();
    finish(response, batch, "entries", "created", args.output)
}

async fn update(args: UpdateArgs) -> anyhow::Result<()> {
    let (entries, batch) = match &args.data {
        Some(path) => (data::read(path)?, true),
        None => {
            let id = args.entry_id.clone().unwrap_or_default();
            (vec![args.fields.to_proto(id)?], false)
        }
    };
    let mut client = client::connect(&args.socket.socket_path).await?;
    let response = client
        .batch_update_entry(BatchUpdateEntryRequest { entries })
        .await
        .map_err(|s| refused(&s))?
        .into_inner();
    finish(response, batch, "entries", "updated", args.output)
}

async fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let (ids, batch) = match &args.data {
        Some(path) => {
            let ids = data::read(path)?.into_iter().map(|e| e.id).collect();
            (ids, true)
        }
        None => (vec![args.entry_id.clone().unwrap_or_default()], false),
    };
    let mut client = client::connect(&args.socket.socket_path).await?;
    let response = client
        .batch_delete_entry(BatchDeleteEntryRequest { ids })
        .await
        .map_err(|s| refused(&s))?
        .into_inner();
    if batch {
        return finish(response, true, "ids", "deleted", args.output);
    }

    let deleted = single_result(response)?;
    match args.output {
        Output::Text => emit(&format!(
            "Deleted entry {}\n",
            args.entry_id.unwrap_or_default()
        )),
        Output::Json => emit(&format!("{}\n", output::entries_json(&deleted))),
    }
    Ok(())
}

async fn show(args: ShowArgs) -> anyhow::Result<()> {
    let request = args.filter.to_request()?;
    let mut client = client::connect(&args.socket.socket_path).await?;

    // An unknown ID is an error, not an empty result.
    if !request.by_id.is_empty() {
        client
            .get_entry(GetEntryRequest {
                id: request.by_id.clone(),
            })
            .await
            .map_err(|s| refused(&s))?;
    }

    let mut entries = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_entries(ListEntriesRequest {
                page_token,
                ..request.clone()
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
    print_entries(&entries, args.output, true);
    Ok(())
}

async fn count(args: CountArgs) -> anyhow::Result<()> {
    let request = args.filter.to_request()?;
    let mut client = client::connect(&args.socket.socket_path).await?;
    let count = client
        .count_entries(CountEntriesRequest {
            filter: Some(request),
        })
        .await
        .map_err(|s| refused(&s))?
        .into_inner()
        .count;
    match args.output {
        Output::Text if count == 1 => emit("1 entry\n"),
        Output::Text => emit(&format!("{count} entries\n")),
        Output::Json => emit(&format!("{}\n", serde_json::json!({ "count": count }))),
    }
    Ok(())
}

/// Prints the outcome of a batch request and fails if any item failed. A
/// request from flags prints the entry, or fails with the item's message; a
/// request from a file prints one status line per item.
fn finish(
    response: BatchEntryResponse,
    batch: bool,
    item: &str,
    action: &str,
    format: Output,
) -> anyhow::Result<()> {
    if !batch {
        print_entries(&single_result(response)?, format, false);
        return Ok(());
    }

    let total = response.results.len();
    let failed = response
        .results
        .iter()
        .filter(|r| r.status.as_ref().is_some_and(|s| s.code != 0))
        .count();
    let text = match format {
        Output::Json => format!("{}\n", output::results_json(&response.results)),
        Output::Text => output::results_text(&response.results, item, action),
    };
    emit(&text);
    if failed > 0 {
        anyhow::bail!("{failed} of {total} entries failed");
    }
    Ok(())
}

impl EntryFields {
    /// Validates the flags (before the server is contacted) and builds the
    /// wire entry.
    fn to_proto(&self, id: String) -> anyhow::Result<pb::Entry> {
        if !id.is_empty() {
            sigil::entry::validate_entry_id(&id)
                .map_err(|e| anyhow::anyhow!("--entry-id {id:?}: {e}"))?;
        }
        let spiffe_id = check_id("--spiffe-id", self.spiffe_id.as_deref().unwrap_or_default())?;
        let parent_id = check_id("--parent-id", self.parent_id.as_deref().unwrap_or_default())?;
        let selectors = self
            .selectors
            .iter()
            .map(|s| check_selector(s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for name in &self.dns_names {
            sigil::entry::validate_dns_name(name)
                .map_err(|e| anyhow::anyhow!("--dns-name {name:?}: {e}"))?;
        }
        for name in &self.federates_with {
            check_trust_domain(name)?;
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
            jwt_svid_ttl: self.jwt_svid_ttl.unwrap_or(0),
            federates_with: self.federates_with.clone(),
            admin: self.admin,
            downstream: self.downstream,
            expires_at: self.entry_expiry.unwrap_or(0),
        })
    }
}

impl FilterArgs {
    /// Validates the filters and builds the list request (first page).
    fn to_request(&self) -> anyhow::Result<ListEntriesRequest> {
        let by_spiffe_id = self
            .spiffe_id
            .as_deref()
            .map(|v| check_id("--spiffe-id", v))
            .transpose()?
            .unwrap_or_default();
        let by_parent_id = self
            .parent_id
            .as_deref()
            .map(|v| check_id("--parent-id", v))
            .transpose()?
            .unwrap_or_default();
        let by_selectors = self
            .selectors
            .iter()
            .map(|s| check_selector(s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for name in &self.federates_with {
            check_trust_domain(name)?;
        }
        let selector_match = match self.match_mode.unwrap_or(MatchMode::Superset) {
            MatchMode::Exact => SelectorMatch::Exact,
            MatchMode::Subset => SelectorMatch::Subset,
            MatchMode::Superset => SelectorMatch::Superset,
            MatchMode::Any => SelectorMatch::Any,
        };

        Ok(ListEntriesRequest {
            by_spiffe_id,
            by_parent_id,
            page_size: 0,
            page_token: String::new(),
            by_id: self.entry_id.clone().unwrap_or_default(),
            by_federates_with: self.federates_with.clone(),
            by_hint: self.hint.clone().unwrap_or_default(),
            by_selectors,
            selector_match: selector_match.into(),
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

/// Checks a `--selector` flag and returns its wire form.
pub(super) fn check_selector(value: &str) -> anyhow::Result<pb::Selector> {
    let selector: Selector = value
        .parse()
        .map_err(|e| anyhow::anyhow!("--selector {value:?}: {e}"))?;
    Ok(pb::Selector {
        r#type: selector.kind().to_owned(),
        value: selector.value().to_owned(),
    })
}

/// Checks a `--federates-with` flag.
fn check_trust_domain(value: &str) -> anyhow::Result<()> {
    TrustDomain::new(value)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("--federates-with {value:?}: {e}"))
}

/// Parses `--entry-expiry`: seconds since the Unix epoch, or RFC 3339 in UTC.
pub(super) fn parse_expiry(value: &str) -> Result<i64, String> {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value
            .parse()
            .map_err(|_| "is too large for seconds since the Unix epoch".to_owned());
    }
    data::parse_rfc3339(value).map_err(|e| {
        format!("{e}: give RFC 3339 in UTC (2030-01-01T00:00:00Z) or seconds since the Unix epoch")
    })
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
mod tests;
