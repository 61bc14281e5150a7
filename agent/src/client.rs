//! The gRPC channel to the server's agent API.
//!
//! TLS is done by the channel's connector with rustls, so the channel's URI
//! scheme is `http`. The server must present the SVID
//! `spiffe://<td>/sigil/server` chained to the trust store; the agent presents
//! its own SVID when it has one. The trust store and the SVID resolver are
//! shared, so a bundle update or an agent SVID renewal applies to the next
//! connection without rebuilding the channel.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use sigil::proto::sigil::agent::v1::agent_api_client::AgentApiClient;
use sigil::tls::{SpiffeServerVerifier, SvidResolver, TlsError, TrustStore};
use sigil::{SpiffeId, TrustDomain};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

/// The TLS server name sent to the server; it is not used for verification,
/// which checks the SPIFFE ID instead.
pub(crate) const SERVER_NAME: &str = "sigil-server";

/// Path of the server's SPIFFE ID in its trust domain.
const SERVER_ID_PATH: &str = "/sigil/server";

/// How long a TCP connection plus TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one unary call may take.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the client could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// The TLS configuration was refused.
    #[error("TLS configuration: {0}")]
    Tls(#[from] TlsError),
    /// The server's SPIFFE ID cannot be formed in this trust domain.
    #[error("server SPIFFE ID: {0}")]
    ServerId(#[from] sigil::spiffe_id::ParseError),
}

/// The SPIFFE ID the server must present: `spiffe://<td>/sigil/server`.
pub(crate) fn server_id(td: &TrustDomain) -> Result<SpiffeId, ClientError> {
    Ok(td.id_with_path(SERVER_ID_PATH)?)
}

/// A rustls client configuration that accepts only the server's SVID, and
/// presents `identity` as client certificate when given.
///
/// Session resumption is off: a resumed TLS session carries the client
/// certificate of the session it resumes, so after a renewal the server
/// would still see the old agent SVID.
pub(crate) fn tls_config(
    td: &TrustDomain,
    trust: Arc<TrustStore>,
    identity: Option<Arc<SvidResolver>>,
) -> Result<Arc<ClientConfig>, ClientError> {
    let verifier = Arc::new(SpiffeServerVerifier::new(trust, server_id(td)?));
    let mut config = sigil::tls::client_config(verifier, identity)?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

fn endpoint() -> Endpoint {
    Endpoint::from_static("http://sigil-server")
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
}

/// The agent's connection to the server, for every RPC but attestation.
///
/// TLS client authentication happens once per connection, so a connection
/// keeps presenting the agent SVID it was opened with. After a renewal,
/// [`AgentChannel::reconnect`] moves new calls to a new connection, which
/// presents the new SVID; calls in flight finish on the old one.
#[derive(Debug)]
pub(crate) struct AgentChannel {
    address: String,
    tls: Arc<ClientConfig>,
    current: ArcSwap<Channel>,
}

impl AgentChannel {
    /// A channel to `address` that connects on first use.
    pub(crate) fn new(address: &str, tls: Arc<ClientConfig>) -> Self {
        let current = ArcSwap::from_pointee(lazy_channel(address, Arc::clone(&tls)));
        Self {
            address: address.to_owned(),
            tls,
            current,
        }
    }

    /// A client on the current connection.
    pub(crate) fn api(&self) -> AgentApiClient<Channel> {
        AgentApiClient::new(Channel::clone(&self.current.load()))
    }

    /// Makes the next calls open a new connection.
    pub(crate) fn reconnect(&self) {
        self.current
            .store(Arc::new(lazy_channel(&self.address, Arc::clone(&self.tls))));
    }
}

/// A channel that connects on first use and reconnects as needed.
pub(crate) fn lazy_channel(address: &str, tls: Arc<ClientConfig>) -> Channel {
    endpoint().connect_with_connector_lazy(connector(address.to_owned(), tls))
}

/// A channel connected now, so a connection or TLS failure shows at once.
pub(crate) async fn connect(
    address: &str,
    tls: Arc<ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    endpoint()
        .connect_with_connector(connector(address.to_owned(), tls))
        .await
}

/// What the connector yields: a TLS stream in hyper's I/O traits.
type Connection = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

/// A connector: TCP to `address`, then TLS with `tls`.
fn connector(
    address: String,
    tls: Arc<ClientConfig>,
) -> impl tower::Service<Uri, Response = Connection, Error = std::io::Error, Future: Send> + Send + 'static
{
    tower::service_fn(move |_: Uri| {
        let address = address.clone();
        let connector = TlsConnector::from(Arc::clone(&tls));
        async move {
            let tcp = TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(SERVER_NAME).map_err(std::io::Error::other)?;
            let tls = connector.connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        }
    })
}

/// An error and its sources, joined with `: `, leaving out a source whose
/// text its parent already shows.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    append_sources(e.to_string(), e.source())
}

fn append_sources(
    mut out: String,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) -> String {
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

/// Whether a failed call never reached the server's handler: the connection
/// or the TLS handshake failed, or the connection broke.
pub(crate) fn is_transport_failure(status: &tonic::Status) -> bool {
    use std::error::Error;
    status.source().is_some()
        && matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
        )
}

/// A status with its transport cause, for messages and logs.
pub(crate) fn describe_status(status: &tonic::Status) -> String {
    use std::error::Error;
    if is_transport_failure(status) {
        append_sources(status.message().to_owned(), status.source())
    } else if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}
