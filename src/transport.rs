//! gRPC channels to Sigil's endpoints: over a Unix socket (the Workload API,
//! the admin API) and over TCP with rustls (the agent API).

use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::ServerName;
use tonic::transport::{Channel, Endpoint, Uri};

/// The TLS server name agents use for the server. Certificates are checked
/// by SPIFFE ID, not by name (see [`crate::tls::SpiffeServerVerifier`]).
pub const SERVER_NAME: &str = "sigil-server";

/// A channel to a gRPC server on a Unix socket. Connects at once, so a
/// missing socket is reported here.
pub async fn unix_channel(path: impl Into<PathBuf>) -> Result<Channel, tonic::transport::Error> {
    let path = path.into();
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    // The authority is a placeholder: gRPC needs one, the socket ignores it.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
}

/// A channel to `address` (`host:port`) over TLS with `config`, connecting
/// lazily (on the first call, and again after a lost connection). Each new
/// connection uses the configuration's current trust roots and client
/// certificate, so rotations apply without rebuilding the channel.
pub fn tls_channel(address: String, config: Arc<rustls::ClientConfig>) -> Channel {
    let connector = tower::service_fn(move |_: Uri| {
        let address = address.clone();
        let config = config.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(SERVER_NAME).map_err(std::io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Endpoint::from_static("http://sigil-server").connect_with_connector_lazy(connector)
}
