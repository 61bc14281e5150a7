//! The admin client: a gRPC channel over the server's Unix socket.

use std::path::Path;

use sigil::proto::sigil::admin::v1::admin_client::AdminClient;
use sigil::transport::{error_chain, unix_channel};
use tonic::transport::Channel;

/// Connects to the admin socket at `path`.
pub(crate) async fn connect(path: &Path) -> anyhow::Result<AdminClient<Channel>> {
    let channel = unix_channel(path).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the server's admin socket {}: {}",
            path.display(),
            error_chain(&e)
        )
    })?;
    Ok(AdminClient::new(channel))
}
