//! `sigil-server bundle show|set|list|delete`: the server's own bundle, and
//! other trust domains' bundles kept for federation.

use rustls_pki_types::CertificateDer;
use sigil::TrustDomain;
use sigil::bundle::X509Bundle;
use std::path::PathBuf;

use anyhow::Context;
use sigil::proto::sigil::admin::v1::{
    DeleteFederatedBundleRequest, GetBundleRequest, ListFederatedBundlesRequest,
    SetFederatedBundleRequest,
};
use sigil::proto::sigil::types::v1 as pb;

use super::{SocketArg, client, emit, refused};

/// How long consumers of a SPIFFE bundle should wait before polling again.
const REFRESH_HINT_SECS: u64 = 300;

/// The bundle subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum BundleCommand {
    /// Prints the trust bundle.
    Show(ShowArgs),
    /// Stores or replaces another trust domain's bundle.
    Set(SetArgs),
    /// Prints the stored bundles of other trust domains.
    List(ListArgs),
    /// Deletes another trust domain's bundle.
    Delete(DeleteArgs),
}

/// Bundle encodings.
#[derive(Debug, Clone, Copy, Default, clap::ValueEnum)]
pub(crate) enum Format {
    /// PEM certificates.
    #[default]
    Pem,
    /// A SPIFFE bundle document (JWK Set).
    Spiffe,
}

/// `bundle show`.
#[derive(Debug, clap::Args)]
pub(crate) struct ShowArgs {
    /// Encoding.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    #[command(flatten)]
    socket: SocketArg,
}

/// `bundle set`.
#[derive(Debug, clap::Args)]
pub(crate) struct SetArgs {
    /// The trust domain's ID, e.g. `spiffe://other.org`.
    #[arg(long, value_name = "ID")]
    id: String,
    /// The bundle file.
    #[arg(long, value_name = "FILE")]
    path: PathBuf,
    /// The file's encoding.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    #[command(flatten)]
    socket: SocketArg,
}

/// `bundle list`.
#[derive(Debug, clap::Args)]
pub(crate) struct ListArgs {
    /// Encoding.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    #[command(flatten)]
    socket: SocketArg,
}

/// `bundle delete`.
#[derive(Debug, clap::Args)]
pub(crate) struct DeleteArgs {
    /// The trust domain's ID, e.g. `spiffe://other.org`.
    #[arg(long, value_name = "ID")]
    id: String,
    #[command(flatten)]
    socket: SocketArg,
}

/// Runs a bundle subcommand.
pub(crate) async fn run(command: BundleCommand) -> anyhow::Result<()> {
    match command {
        BundleCommand::Show(args) => show(args).await,
        BundleCommand::Set(args) => set(args).await,
        BundleCommand::List(args) => list(args).await,
        BundleCommand::Delete(args) => delete(args).await,
    }
}

/// The trust domain of `--id`: `spiffe://<name>` (a bare name is accepted).
fn trust_domain_of(id: &str) -> anyhow::Result<TrustDomain> {
    let name = id.strip_prefix("spiffe://").unwrap_or(id);
    TrustDomain::new(name).map_err(|e| anyhow::anyhow!("--id {id:?}: {e}"))
}

async fn set(args: SetArgs) -> anyhow::Result<()> {
    let td = trust_domain_of(&args.id)?;
    let bytes = std::fs::read(&args.path)
        .with_context(|| format!("--path {}: cannot read", args.path.display()))?;
    let (bundle, sequence) = match args.format {
        Format::Pem => (X509Bundle::from_pem(td.clone(), &bytes), None),
        Format::Spiffe => match X509Bundle::from_spiffe_json(td.clone(), &bytes) {
            Ok((bundle, sequence)) => (Ok(bundle), sequence),
            Err(e) => (Err(e), None),
        },
    };
    let bundle = bundle.with_context(|| format!("--path {}", args.path.display()))?;
    let mut client = client::connect(&args.socket.socket_path).await?;
    let stored = client
        .set_federated_bundle(SetFederatedBundleRequest {
            bundle: Some(pb::Bundle {
                trust_domain: td.name().to_owned(),
                x509_authorities: bundle.authorities().iter().map(|c| c.to_vec()).collect(),
                sequence: sequence.unwrap_or(0),
            }),
        })
        .await
        .map_err(|s| refused(&s))?
        .into_inner();
    emit(&format!(
        "Bundle set for {} ({} certificates)\n",
        td.id_string(),
        stored.x509_authorities.len()
    ));
    Ok(())
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let mut client = client::connect(&args.socket.socket_path).await?;
    let bundles = client
        .list_federated_bundles(ListFederatedBundlesRequest {})
        .await
        .map_err(|s| refused(&s))?
        .into_inner()
        .bundles;
    let mut text = String::new();
    let mut docs = serde_json::Map::new();
    for bundle in bundles {
        let sequence = bundle.sequence;
        let x509 = from_proto(bundle)?;
        let id = x509.trust_domain().id_string();
        match args.format {
            Format::Pem => {
                text.push_str(&format!("# {id}\n{}\n", x509.to_pem()));
            }
            Format::Spiffe => {
                let doc: serde_json::Value =
                    serde_json::from_str(&x509.to_spiffe_json(sequence, REFRESH_HINT_SECS)?)?;
                docs.insert(id, doc);
            }
        }
    }
    if let Format::Spiffe = args.format {
        text = format!("{}\n", serde_json::to_string_pretty(&docs)?);
    }
    emit(&text);
    Ok(())
}

async fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let td = trust_domain_of(&args.id)?;
    let mut client = client::connect(&args.socket.socket_path).await?;
    client
        .delete_federated_bundle(DeleteFederatedBundleRequest {
            trust_domain: td.name().to_owned(),
        })
        .await
        .map_err(|s| refused(&s))?;
    emit(&format!("Bundle deleted for {}\n", td.id_string()));
    Ok(())
}

/// A bundle from the server, checked.
fn from_proto(bundle: pb::Bundle) -> anyhow::Result<X509Bundle> {
    let td = TrustDomain::new(&bundle.trust_domain)
        .map_err(|e| anyhow::anyhow!("the server sent a bad trust domain: {e}"))?;
    let authorities = bundle
        .x509_authorities
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    Ok(X509Bundle::new(td, authorities))
}

async fn show(args: ShowArgs) -> anyhow::Result<()> {
    let mut client = client::connect(&args.socket.socket_path).await?;
    let bundle = client
        .get_bundle(GetBundleRequest {})
        .await
        .map_err(|s| refused(&s))?
        .into_inner();
    let sequence = bundle.sequence;
    let x509 = from_proto(bundle)?;
    let text = match args.format {
        Format::Pem => x509.to_pem(),
        Format::Spiffe => format!("{}\n", x509.to_spiffe_json(sequence, REFRESH_HINT_SECS)?),
    };
    emit(&text);
    Ok(())
}
