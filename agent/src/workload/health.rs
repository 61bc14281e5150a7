//! `sigil-agent healthcheck`: succeeds only when the agent serves the
//! Workload API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use sigil::proto::workload::X509BundlesRequest;
use sigil::transport::error_chain;
use tonic::Code;

use super::client;
use crate::config::DEFAULT_SOCKET_PATH;

/// How long the agent may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Arguments of `sigil-agent healthcheck`.
#[derive(Debug, clap::Args)]
pub(crate) struct HealthcheckArgs {
    /// Path of the Workload API socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET_PATH)]
    pub(crate) socket_path: PathBuf,
}

/// Calls `FetchX509Bundles` with the security header. Any gRPC answer, even
/// PERMISSION_DENIED for a caller without SVIDs, proves that the agent
/// serves; no connection, UNAVAILABLE or no answer in time does not.
pub(crate) async fn check(args: &HealthcheckArgs) -> anyhow::Result<()> {
    let path = args.socket_path.as_path();
    tokio::time::timeout(TIMEOUT, call(path))
        .await
        .map_err(|_| {
            anyhow!(
                "the Workload API at {} did not answer within {}s",
                path.display(),
                TIMEOUT.as_secs()
            )
        })?
}

async fn call(path: &Path) -> anyhow::Result<()> {
    let mut client = client::connect(path).await.map_err(|e| {
        anyhow!(
            "cannot reach the Workload API at {}: {}",
            path.display(),
            error_chain(&e)
        )
    })?;
    match client.fetch_x509_bundles(X509BundlesRequest {}).await {
        Err(status) if status.code() == Code::Unavailable => Err(anyhow!(
            "the Workload API at {} is unavailable: {}",
            path.display(),
            status.message()
        )),
        Ok(_) | Err(_) => Ok(()),
    }
}
