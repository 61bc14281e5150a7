//! The SPIFFE Workload API, served on a Unix socket.
//!
//! - [`attestor`]: who the caller is, from kernel facts and, when
//!   configured, systemd units, the Docker engine and the kubelet.
//! - [`api`]: the `SpiffeWorkloadAPI` gRPC service.
//! - [`client`]: a client over the socket, for the `api` commands.
//! - [`cli`]: `sigil-agent api fetch x509` and `sigil-agent api watch`.

mod api;
pub mod attestor;
pub(crate) mod cli;
mod client;
pub(crate) mod health;

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;

pub(crate) use self::attestor::{Attestor, AttestorsConfig};
use crate::cache::SnapshotReceiver;

/// Why the Workload API socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BindError {
    /// The socket's directory could not be created.
    #[error("cannot create the directory {path}: {source}", path = .path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Something that is not a socket is in the way.
    #[error("{path} exists and is not a socket", path = .path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Another process accepts connections on the socket.
    #[error("{path} is in use by another process", path = .path.display())]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// Removing the stale socket, binding or setting its mode failed.
    #[error("cannot bind {path}: {source}", path = .path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Creates the socket: its parent directory if missing (mode 0755), a stale
/// socket file removed, and the new socket's mode set to 0777.
///
/// The socket is open to every local user on purpose: any process may call
/// the Workload API, as the SPIFFE Workload Endpoint standard requires, and
/// callers are identified by what the kernel reports about them
/// (SO_PEERCRED and `/proc`), not by who may open the file. A caller that no
/// entry matches gets no identity.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, BindError> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| BindError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
    }
    let bind_error = |source| BindError::Bind {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(bind_error)?;
        }
        Ok(_) => {
            return Err(BindError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).map_err(bind_error)?;
    Ok(listener)
}

/// Serves the Workload API on a listener from [`bind`] to the callers
/// `attestor` attests, until `shutdown` completes. Open streams then end
/// with `UNAVAILABLE` (clients reconnect to the next agent), and the socket
/// file at `socket_path` is removed.
pub(crate) async fn serve_on(
    listener: UnixListener,
    socket_path: &Path,
    snapshots: SnapshotReceiver,
    attestor: Arc<Attestor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let service = api::WorkloadApi::new(snapshots, stop_rx, attestor).into_service();
    let signal = async move {
        shutdown.await;
        stop_tx.send_replace(true);
    };

    tracing::info!(path = %socket_path.display(), "Workload API listening");
    let result = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal)
        .await;

    match std::fs::remove_file(socket_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %socket_path.display(), error = %e, "cannot remove the Workload API socket");
        }
    }
    tracing::info!(path = %socket_path.display(), "Workload API stopped");
    result.map_err(|e| {
        anyhow::anyhow!(
            "the Workload API server failed: {}",
            sigil::transport::error_chain(&e)
        )
    })
}

#[cfg(test)]
pub(crate) mod tests;
