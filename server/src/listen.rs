//! The listeners: the agent API's TCP socket with TLS handshakes done
//! concurrently, and the admin API's Unix socket.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::SocketGroup;
use crate::shutdown::Shutdown;

/// Longest a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connections whose handshake is done, waiting for the gRPC server.
const QUEUE: usize = 128;

/// Why the admin socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ListenError {
    /// A file operation failed.
    #[error("admin socket {path}: {what}: {source}")]
    Io {
        /// The socket path.
        path: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// Something else is at the socket path.
    #[error("admin socket {0}: the path exists and is not a socket")]
    NotASocket(String),
    /// Another server answers on the socket.
    #[error("admin socket {0}: another server is listening on it")]
    InUse(String),
}

/// Accepts TCP connections and completes their TLS handshakes, each in its
/// own task, until shutdown; yields the established streams.
pub(crate) fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    mut shutdown: Shutdown,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = shutdown.wait() => break,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "agent API: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            // Small gRPC frames (a pushed entry change, a signed batch) go
            // out at once instead of waiting for Nagle's algorithm.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(peer = %peer, error = %e, "agent API: TCP_NODELAY not set");
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        // The receiver is gone only when the server stopped.
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %peer, error = %e, "agent API: TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::debug!(peer = %peer, "agent API: TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Binds the admin socket at `path`: creates its directory (0700) if
/// missing, replaces a stale socket, and sets mode 0600, or 0660 with
/// `group`.
pub(crate) async fn bind_admin_socket(
    path: &Path,
    group: Option<&SocketGroup>,
) -> Result<UnixListener, ListenError> {
    let shown = path.display().to_string();
    let io_err = |what: &'static str| {
        let path = shown.clone();
        move |source| ListenError::Io { path, what, source }
    };

    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("creating its directory"))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(ListenError::InUse(shown));
            }
            std::fs::remove_file(path).map_err(io_err("removing the stale socket"))?;
        }
        Ok(_) => return Err(ListenError::NotASocket(shown)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspecting the path")(e)),
    }

    let listener = UnixListener::bind(path).map_err(io_err("binding"))?;
    let mode = match group {
        Some(group) => {
            std::os::unix::fs::chown(path, None, Some(group.gid))
                .map_err(io_err("setting its group"))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("setting its mode"))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_admin_socket_is_private_and_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/admin.sock");
        let first = bind_admin_socket(&path, None).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);

        // While it is served, a second server is refused.
        let err = bind_admin_socket(&path, None).await.unwrap_err();
        assert!(matches!(err, ListenError::InUse(_)), "{err}");

        // Once the first is gone, its socket file is stale and replaced.
        drop(first);
        bind_admin_socket(&path, None).await.unwrap();
    }

    #[tokio::test]
    async fn a_regular_file_is_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        std::fs::write(&path, b"data").unwrap();
        let err = bind_admin_socket(&path, None).await.unwrap_err();
        assert!(matches!(err, ListenError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }
}
