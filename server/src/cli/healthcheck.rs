//! `sigil-server healthcheck`: succeeds only when the server answers on its
//! admin socket.

use std::time::Duration;

use sigil::proto::sigil::admin::v1::GetBundleRequest;

use super::{SocketArg, client};

/// How long the server may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// `healthcheck`.
#[derive(Debug, clap::Args)]
pub(crate) struct HealthcheckArgs {
    #[command(flatten)]
    socket: SocketArg,
}

/// Calls an admin RPC; any answer from the server (even a refusal) proves
/// that it serves.
pub(crate) async fn run(args: HealthcheckArgs) -> anyhow::Result<()> {
    let path = &args.socket.socket_path;
    let call = async {
        let mut client = client::connect(path).await?;
        match client.get_bundle(GetBundleRequest {}).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == tonic::Code::Unavailable => Err(anyhow::anyhow!(
                "the server at {} is unavailable: {}",
                path.display(),
                status.message()
            )),
            Err(_) => Ok(()),
        }
    };
    tokio::time::timeout(TIMEOUT, call).await.map_err(|_| {
        anyhow::anyhow!(
            "the server at {} did not answer within {}s",
            path.display(),
            TIMEOUT.as_secs()
        )
    })??;
    super::emit("Server is healthy\n");
    Ok(())
}
