//! `sigil-server bundle show`.

use rustls_pki_types::CertificateDer;
use sigil::TrustDomain;
use sigil::bundle::X509Bundle;
use sigil::proto::sigil::admin::v1::GetBundleRequest;

use super::{SocketArg, client, emit, refused};

/// How long consumers of a SPIFFE bundle should wait before polling again.
const REFRESH_HINT_SECS: u64 = 300;

/// The bundle subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum BundleCommand {
    /// Prints the trust bundle.
    Show(ShowArgs),
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

/// Runs a bundle subcommand.
pub(crate) async fn run(command: BundleCommand) -> anyhow::Result<()> {
    let BundleCommand::Show(args) = command;
    let mut client = client::connect(&args.socket.socket_path).await?;
    let bundle = client
        .get_bundle(GetBundleRequest {})
        .await
        .map_err(|s| refused(&s))?
        .into_inner();
    let td = TrustDomain::new(&bundle.trust_domain)
        .map_err(|e| anyhow::anyhow!("the server sent a bad trust domain: {e}"))?;
    let authorities = bundle
        .x509_authorities
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let x509 = X509Bundle::new(td, authorities);
    let text = match args.format {
        Format::Pem => x509.to_pem(),
        Format::Spiffe => format!(
            "{}\n",
            x509.to_spiffe_json(bundle.sequence, REFRESH_HINT_SECS)?
        ),
    };
    emit(&text);
    Ok(())
}
