//! `sigil-server x509 mint`: an X.509-SVID without an entry, for operators.
//! The key is generated here and never leaves this process but for the
//! files or the output it is written to; the server signs a CSR.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sigil::SpiffeId;
use sigil::bundle::cert_to_pem;
use sigil::keys::{PrivateKey, write_public_file, write_secret_file};
use sigil::proto::sigil::admin::v1::MintX509SvidRequest;

use super::{Output, SocketArg, client, emit, refused};
use crate::clock;

/// The x509 subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum X509Command {
    /// Creates a key and has the server sign an X.509-SVID for it.
    Mint(MintArgs),
}

/// `x509 mint`.
#[derive(Debug, clap::Args)]
pub(crate) struct MintArgs {
    /// The SVID's SPIFFE ID, in the server's trust domain.
    #[arg(long, value_name = "ID")]
    spiffe_id: String,
    /// Lifetime in seconds [default: the server's default_x509_svid_ttl].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(i32).range(1..))]
    ttl: Option<i32>,
    /// A DNS name for the SVID (repeatable).
    #[arg(long = "dns-name", value_name = "NAME")]
    dns_names: Vec<String>,
    /// Write svid.pem, key.pem (mode 0600) and bundle.pem into this directory
    /// instead of printing them.
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    socket: SocketArg,
}

/// A minted SVID in PEM form (no `Debug`: it holds the key).
struct Minted {
    spiffe_id: SpiffeId,
    expires_at: String,
    svid_pem: String,
    key_pem: zeroize::Zeroizing<String>,
    bundle_pem: String,
}

/// Runs an x509 subcommand.
pub(crate) async fn run(command: X509Command) -> anyhow::Result<()> {
    let X509Command::Mint(args) = command;
    let minted = mint(&args).await?;
    let text = match &args.write {
        Some(dir) => {
            let paths = write(&minted, dir)?;
            match args.output {
                Output::Text => format!(
                    "SPIFFE ID: {}\nExpires at: {}\nWrote {}\nWrote {}\nWrote {}\n",
                    minted.spiffe_id,
                    minted.expires_at,
                    paths[0].display(),
                    paths[1].display(),
                    paths[2].display()
                ),
                Output::Json => json(&serde_json::json!({
                    "spiffe_id": minted.spiffe_id.as_str(),
                    "expires_at": minted.expires_at,
                    "svid_path": paths[0],
                    "key_path": paths[1],
                    "bundle_path": paths[2],
                }))?,
            }
        }
        None => match args.output {
            Output::Text => format!(
                "{}{}{}",
                minted.svid_pem,
                minted.key_pem.as_str(),
                minted.bundle_pem
            ),
            Output::Json => json(&serde_json::json!({
                "spiffe_id": minted.spiffe_id.as_str(),
                "expires_at": minted.expires_at,
                "svid_pem": minted.svid_pem,
                "key_pem": minted.key_pem.as_str(),
                "bundle_pem": minted.bundle_pem,
            }))?,
        },
    };
    emit(&text);
    Ok(())
}

fn json(value: &serde_json::Value) -> anyhow::Result<String> {
    Ok(format!("{}\n", serde_json::to_string_pretty(value)?))
}

/// Generates the key, sends the CSR and collects the answer.
async fn mint(args: &MintArgs) -> anyhow::Result<Minted> {
    let spiffe_id: SpiffeId = args
        .spiffe_id
        .parse()
        .map_err(|e| anyhow::anyhow!("--spiffe-id {:?}: {e}", args.spiffe_id))?;
    let key = PrivateKey::generate_p256().context("generating a key")?;
    let pair = key.key_pair().context("generating a key")?;
    let csr = sigil::x509::build_csr(&pair, Some(&spiffe_id)).context("building the CSR")?;

    let mut client = client::connect(&args.socket.socket_path).await?;
    let response = client
        .mint_x509_svid(MintX509SvidRequest {
            csr,
            ttl: args.ttl.unwrap_or(0),
            dns_names: args.dns_names.clone(),
        })
        .await
        .map_err(|s| refused(&s))?
        .into_inner();
    if response.cert_chain.is_empty() {
        anyhow::bail!("the server sent no certificate");
    }
    let bundle = response
        .bundle
        .ok_or_else(|| anyhow::anyhow!("the server sent no bundle"))?;
    Ok(Minted {
        spiffe_id,
        expires_at: clock::rfc3339(response.expires_at),
        svid_pem: response.cert_chain.iter().map(|c| cert_to_pem(c)).collect(),
        key_pem: key.to_pem(),
        bundle_pem: bundle
            .x509_authorities
            .iter()
            .map(|c| cert_to_pem(c))
            .collect(),
    })
}

/// Writes svid.pem, key.pem (0600) and bundle.pem into `dir`, creating it.
fn write(minted: &Minted, dir: &Path) -> anyhow::Result<[PathBuf; 3]> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let paths = [
        dir.join("svid.pem"),
        dir.join("key.pem"),
        dir.join("bundle.pem"),
    ];
    write_public_file(&paths[0], minted.svid_pem.as_bytes())
        .with_context(|| format!("writing {}", paths[0].display()))?;
    write_secret_file(&paths[1], minted.key_pem.as_bytes())
        .with_context(|| format!("writing {}", paths[1].display()))?;
    write_public_file(&paths[2], minted.bundle_pem.as_bytes())
        .with_context(|| format!("writing {}", paths[2].display()))?;
    Ok(paths)
}
