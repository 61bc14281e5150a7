//! gRPC channels to Sigil's endpoints: over a Unix socket (the Workload API,
//! the admin API) and over TCP with rustls (the agent API).
//!
//! TLS is done by the channel's connector, so channel URIs use the `http`
//! scheme. Each new connection uses the rustls configuration's current trust
//! roots and client certificate, so bundle updates and SVID rotations apply
//! to the next connection without rebuilding anything.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::{TcpStream, UnixStream};
use tonic::transport::{Channel, Endpoint, Uri};

/// The TLS server name clients send to the server. Certificates are checked
/// by SPIFFE ID, not by name (see [`crate::tls::SpiffeServerVerifier`]).
pub const SERVER_NAME: &str = "sigil-server";

/// How long a TCP connection plus TLS handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A channel to a gRPC server on a Unix socket. Connects at once, so a
/// missing socket is reported here.
pub async fn unix_channel(path: impl Into<PathBuf>) -> Result<Channel, tonic::transport::Error> {
    let path = path.into();
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
    });
    // The authority is a placeholder: gRPC needs one, the socket ignores it.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
}

/// A channel to `address` (`host:port`) over TLS with `config`, connecting
/// on the first call and again after a lost connection.
pub fn tls_channel(address: &str, config: Arc<rustls::ClientConfig>) -> Channel {
    tls_endpoint().connect_with_connector_lazy(tls_connector(address.to_owned(), config))
}

/// Like [`tls_channel`], but connects now, so that a connection or TLS
/// failure shows at once.
pub async fn tls_channel_now(
    address: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    tls_endpoint()
        .connect_with_connector(tls_connector(address.to_owned(), config))
        .await
}

fn tls_endpoint() -> Endpoint {
    Endpoint::from_static("http://sigil-server")
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
}

/// What the TLS connector yields: a TLS stream in hyper's I/O traits.
type TlsConnection = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

fn tls_connector(
    address: String,
    config: Arc<rustls::ClientConfig>,
) -> impl tower::Service<Uri, Response = TlsConnection, Error = std::io::Error, Future: Send>
+ Send
+ 'static {
    tower::service_fn(move |_: Uri| {
        let address = address.clone();
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&config));
        async move {
            let tcp = TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(SERVER_NAME).map_err(std::io::Error::other)?;
            Ok(TokioIo::new(connector.connect(name, tcp).await?))
        }
    })
}

/// An error and its sources, joined with `: `, leaving out a source whose
/// text its parent already shows (transport errors often repeat their
/// cause).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
