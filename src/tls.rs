//! rustls configuration that authenticates peers by X.509-SVID.
//!
//! Both ends of the agent API use these pieces:
//! - [`TrustStore`]: the trust domain's CA certificates, swappable while
//!   connections are being served, so a bundle change needs no restart;
//! - [`SvidResolver`]: this process's own SVID, swappable on rotation;
//! - [`SpiffeClientVerifier`] (server side): accepts connections without a
//!   client certificate (for attestation) and verifies any certificate that
//!   is presented as an SVID of the trust domain;
//! - [`SpiffeServerVerifier`] (agent side): accepts only the SVID of one
//!   expected SPIFFE ID, e.g. the server's.
//!
//! Everything uses the one crypto provider of the project, *ring*.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use webpki::{EndEntityCert, KeyUsage};

use crate::bundle::X509Bundle;
use crate::keys::PrivateKey;
use crate::{SpiffeId, TrustDomain};

/// The ALPN protocol of gRPC.
const ALPN_H2: &[u8] = b"h2";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls refused the key, certificates or settings.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    /// A bundle certificate is not a usable trust anchor.
    #[error("bundle certificate is not a usable trust anchor: {0}")]
    BadAnchor(webpki::Error),
}

/// The one crypto provider of the project, built once.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

/// The CA certificates peers must chain to. Cheap to read on every
/// handshake, and replaceable at any time.
#[derive(Debug)]
pub struct TrustStore {
    trust_domain: TrustDomain,
    anchors: ArcSwap<Vec<rustls::pki_types::TrustAnchor<'static>>>,
}

/// This process's own certificate chain and key, replaceable on rotation.
#[derive(Debug)]
pub struct SvidResolver {
    current: ArcSwap<CertifiedKey>,
}

/// Server-side verifier: a client certificate is optional, and when given it
/// must be an SVID of the trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    roots: Arc<TrustStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

/// Client-side verifier: the server must present an SVID with exactly the
/// expected SPIFFE ID. The TLS server name is not used.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<TrustStore>,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

// === impl TrustStore ===

impl TrustStore {
    /// A store holding the bundle's authorities.
    pub fn new(bundle: &X509Bundle) -> Result<Self, TlsError> {
        let anchors = anchors(bundle)?;
        Ok(Self {
            trust_domain: bundle.trust_domain().clone(),
            anchors: ArcSwap::from_pointee(anchors),
        })
    }

    /// Replaces the authorities; handshakes that start afterwards use them.
    pub fn replace(&self, bundle: &X509Bundle) -> Result<(), TlsError> {
        self.anchors.store(Arc::new(anchors(bundle)?));
        Ok(())
    }

    /// Verifies an SVID chain (leaf first) for the given usage, and returns
    /// its SPIFFE ID, which must belong to the store's trust domain.
    pub fn verify_svid(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let cert = EndEntityCert::try_from(leaf).map_err(pki_error)?;
        let anchors = self.anchors.load();
        let algs = provider().signature_verification_algorithms.all;
        cert.verify_for_usage(algs, &anchors, intermediates, now, usage, None, None)
            .map_err(pki_error)?;

        let id = crate::x509::spiffe_id_of(leaf)
            .map_err(|e| rustls::Error::General(format!("peer certificate: {e}")))?;
        if !id.is_member_of(&self.trust_domain) {
            return Err(rustls::Error::General(format!(
                "peer SPIFFE ID {id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        Ok(id)
    }
}

fn anchors(bundle: &X509Bundle) -> Result<Vec<rustls::pki_types::TrustAnchor<'static>>, TlsError> {
    bundle
        .authorities()
        .iter()
        .map(|der| {
            webpki::anchor_from_trusted_cert(der)
                .map(|a| a.to_owned())
                .map_err(TlsError::BadAnchor)
        })
        .collect()
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use rustls::CertificateError;
    match e {
        webpki::Error::CertExpired { .. } => CertificateError::Expired.into(),
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet.into(),
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer.into(),
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature.into(),
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))).into(),
    }
}

// === impl SvidResolver ===

impl SvidResolver {
    /// A resolver presenting the given chain (leaf first) and key.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: &PrivateKey) -> Result<Self, TlsError> {
        Ok(Self {
            current: ArcSwap::from_pointee(certified_key(chain, key)?),
        })
    }

    /// Presents a new chain and key from the next handshake on.
    pub fn replace(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: &PrivateKey,
    ) -> Result<(), TlsError> {
        self.current.store(Arc::new(certified_key(chain, key)?));
        Ok(())
    }
}

fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKey,
) -> Result<CertifiedKey, TlsError> {
    Ok(CertifiedKey::from_der(chain, key.to_rustls(), &provider())?)
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

// === impl SpiffeClientVerifier ===

impl SpiffeClientVerifier {
    /// A verifier trusting the store's authorities.
    pub fn new(roots: Arc<TrustStore>) -> Self {
        Self {
            roots,
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.roots
            .verify_svid(end_entity, intermediates, now, KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// === impl SpiffeServerVerifier ===

impl SpiffeServerVerifier {
    /// A verifier that accepts only `expected`, chained to the store.
    pub fn new(roots: Arc<TrustStore>, expected: SpiffeId) -> Self {
        Self {
            roots,
            expected,
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self
            .roots
            .verify_svid(end_entity, intermediates, now, KeyUsage::server_auth())?;
        if id != self.expected {
            return Err(rustls::Error::General(format!(
                "server presented SPIFFE ID {id}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// === configs ===

/// A server configuration for gRPC (ALPN `h2`) with the given certificate
/// and client verification.
pub fn server_config(
    resolver: Arc<SvidResolver>,
    verifier: Arc<SpiffeClientVerifier>,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A client configuration for gRPC that verifies the server with `verifier`
/// and, when `identity` is given, presents it as client certificate.
pub fn client_config(
    verifier: Arc<SpiffeServerVerifier>,
    identity: Option<Arc<SvidResolver>>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(resolver) => builder.with_client_cert_resolver(resolver),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}
