//! The gRPC channel to the server's agent API.
//!
//! The server must present the SVID `spiffe://<td>/sigil/server` chained to
//! the trust store; the agent presents its own SVID when it has one. The
//! trust store and the SVID resolver are shared, so a bundle update or an
//! agent SVID renewal applies to the next connection.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ClientConfig;
use sigil::proto::sigil::agent::v1::agent_api_client::AgentApiClient;
use sigil::tls::{SpiffeServerVerifier, SvidResolver, TlsError, TrustStore};
use sigil::transport::{tls_channel, tls_channel_now};
use sigil::{SpiffeId, TrustDomain};
use tonic::transport::Channel;

pub(crate) use sigil::transport::error_chain;

/// How long one unary call may take.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the client could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// The TLS configuration was refused.
    #[error("TLS configuration: {0}")]
    Tls(#[from] TlsError),
}

/// The SPIFFE ID the server must present: `spiffe://<td>/sigil/server`.
pub(crate) fn server_id(td: &TrustDomain) -> SpiffeId {
    td.server_id()
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
    let verifier = Arc::new(SpiffeServerVerifier::new(trust, server_id(td)));
    let mut config = sigil::tls::client_config(verifier, identity)?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
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
    tls_channel(address, tls)
}

/// A channel connected now, so a connection or TLS failure shows at once.
pub(crate) async fn connect(
    address: &str,
    tls: Arc<ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    tls_channel_now(address, tls).await
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
        match status.source() {
            Some(source) => format!("{}: {}", status.message(), error_chain(source)),
            None => status.message().to_owned(),
        }
    } else if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}
