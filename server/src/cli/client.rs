//! The admin client: a gRPC channel over the server's Unix socket.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use hyper_util::rt::TokioIo;
use sigil::proto::sigil::admin::v1::admin_client::AdminClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects to the admin socket at `path`.
pub(crate) async fn connect(path: &Path) -> anyhow::Result<AdminClient<Channel>> {
    let unreachable = |cause: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "cannot reach the server's admin socket {}: {cause}",
            path.display()
        )
    };
    // Connect once here so that the error names the socket's own problem
    // (missing, permission denied, refused); the channel reuses the stream.
    let first = UnixStream::connect(path)
        .await
        .map_err(|e| unreachable(&e))?;
    let first = Arc::new(Mutex::new(Some(first)));
    let socket = path.to_owned();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let first = Arc::clone(&first);
            let socket = socket.clone();
            async move {
                let reused = first.lock().unwrap_or_else(PoisonError::into_inner).take();
                let stream = match reused {
                    Some(stream) => stream,
                    None => UnixStream::connect(&socket).await?,
                };
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| unreachable(&error_chain(&e)))?;
    Ok(AdminClient::new(channel))
}

/// An error and its sources, joined by `: `.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
