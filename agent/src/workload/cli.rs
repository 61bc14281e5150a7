//! `sigil-agent api …`: a Workload API client for operators.

use std::path::PathBuf;

/// Arguments of `sigil-agent api fetch x509`.
#[derive(Debug, clap::Args)]
pub struct FetchX509Args {
    /// Path of the Workload API socket.
    #[arg(long, default_value = "/run/sigil/agent/api.sock")]
    pub socket_path: PathBuf,
    /// Write svid.N.pem, svid.N.key and bundle.N.pem into this directory.
    #[arg(long)]
    pub write: Option<PathBuf>,
}

/// Arguments of `sigil-agent api watch`.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Path of the Workload API socket.
    #[arg(long, default_value = "/run/sigil/agent/api.sock")]
    pub socket_path: PathBuf,
}

/// Fetches the caller's X.509-SVIDs once and prints them.
pub async fn fetch_x509(args: FetchX509Args) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("not built yet")
}

/// Prints every update of the caller's X.509-SVIDs until interrupted.
pub async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("not built yet")
}
