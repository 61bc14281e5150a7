//! The SPIFFE Workload API, served on a Unix socket.

pub mod cli;

use std::future::Future;
use std::path::Path;

use crate::cache::SnapshotReceiver;

/// Serves the Workload API on `socket_path` until `shutdown` completes.
pub async fn serve(
    socket_path: &Path,
    snapshots: SnapshotReceiver,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let _ = (socket_path, snapshots);
    shutdown.await;
    anyhow::bail!("the Workload API is not built yet")
}
