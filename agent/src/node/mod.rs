//! The agent's own identity: node attestation (join token, x509pop,
//! k8s_psat), storage of the agent SVID, key and bundle in the data
//! directory, and renewal of the SVID at half of its lifetime. Agents whose
//! attestor can attest again by itself (x509pop, k8s_psat) do so when the
//! server no longer accepts their SVID.

mod attest;
mod evidence;
mod renew;
mod settings;
mod storage;

use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use sigil::bundle::X509Bundle;
use sigil::keys::PrivateKey;
use sigil::proto::sigil::types::v1 as pb;
use sigil::{SpiffeId, TrustDomain};

pub(crate) use attest::attest;
pub(crate) use evidence::Evidence;
pub(crate) use renew::{Reattestation, Renewer, is_refusal};
pub(crate) use settings::NodeAttestorConfig;
pub(crate) use storage::{NotUsable, Storage};

use crate::config::{Config, JoinToken, JoinTokenSource};

/// The agent's SVID, its key, and the bundle it was verified against.
#[derive(Debug, Clone)]
pub(crate) struct NodeIdentity {
    /// The agent's SPIFFE ID.
    pub(crate) spiffe_id: SpiffeId,
    /// DER certificates, leaf first.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// The SVID's key.
    pub(crate) key: PrivateKey,
    /// The trust domain's bundle.
    pub(crate) bundle: X509Bundle,
    /// The leaf's notBefore.
    pub(crate) not_before: SystemTime,
    /// The leaf's notAfter.
    pub(crate) not_after: SystemTime,
}

/// Why the agent has no usable identity, or lost it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NodeError {
    /// Nothing stored, and nothing to attest with.
    #[error(
        "no stored agent SVID and no join token: {0}; set join_token or join_token_file for the first attestation, or configure a [node_attestor] (x509pop, k8s_psat)"
    )]
    NoCredentials(NotUsable),
    /// The join token file cannot be read.
    #[error("cannot read the join token file {path}: {error}")]
    TokenFile {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The first attestation needs the server's CA.
    #[error(
        "no trust bundle to verify the server with: set trust_bundle_path to a PEM file with the server's CA for the first attestation"
    )]
    NoBootstrapBundle,
    /// The bootstrap bundle cannot be read.
    #[error("cannot read the trust bundle {path}: {error}")]
    BootstrapBundle {
        /// The file.
        path: String,
        /// Why.
        error: String,
    },
    /// The server cannot be reached, or the TLS handshake failed.
    #[error("cannot connect to the server at {address}: {detail}")]
    Connect {
        /// The configured address.
        address: String,
        /// The error chain, with the rustls error when TLS failed.
        detail: String,
    },
    /// The server refused the attestation.
    #[error("attestation refused: {0}")]
    AttestationRefused(String),
    /// The node attestor's evidence cannot be read.
    #[error("node attestor: {0}")]
    Evidence(String),
    /// The server answered with something unusable.
    #[error("the server's answer is invalid: {0}")]
    InvalidAnswer(String),
    /// The server no longer accepts the agent's SVID.
    #[error(
        "the server refused the agent SVID ({reason}); a new join token is needed: the stored SVID was removed, start the agent again with join_token or join_token_file"
    )]
    Refused {
        /// The server's status message.
        reason: String,
    },
    /// The agent SVID expired before it could be renewed.
    #[error(
        "the agent SVID expired before it could be renewed (last error: {last_error}); a new join token is needed"
    )]
    Expired {
        /// The last renewal failure.
        last_error: String,
    },
    /// A key or CSR could not be made.
    #[error("cannot make a key or CSR: {0}")]
    Crypto(String),
    /// The data directory cannot be written.
    #[error("cannot write to the data directory {path}: {error}")]
    Storage {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// A TLS configuration could not be built.
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
}

/// Why an SVID chain does not do as the agent's identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct InvalidSvid(String);

impl NodeIdentity {
    /// Checks a chain and key as the agent's identity in `td`: the leaf
    /// follows the X.509-SVID profile, its SPIFFE ID is in the trust domain,
    /// it certifies `key`, and it chains to `bundle`.
    pub(crate) fn new(
        td: &TrustDomain,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKey,
        bundle: X509Bundle,
    ) -> Result<Self, InvalidSvid> {
        let bad = |what: &str, e: &dyn std::fmt::Display| InvalidSvid(format!("{what}: {e}"));
        let Some(leaf) = chain.first() else {
            return Err(InvalidSvid("the certificate chain is empty".into()));
        };
        let spiffe_id = sigil::x509::check_leaf(leaf).map_err(|e| bad("leaf certificate", &e))?;
        if !spiffe_id.is_member_of(td) {
            return Err(InvalidSvid(format!(
                "SPIFFE ID {spiffe_id} is not in trust domain {td}"
            )));
        }
        crate::certs::check_key_matches(leaf, &key).map_err(|e| bad("leaf certificate", &e))?;
        let (not_before, not_after) =
            crate::certs::validity(leaf).map_err(|e| bad("leaf certificate", &e))?;
        let store = sigil::tls::TrustStore::new(&bundle).map_err(|e| bad("bundle", &e))?;
        store
            .verify_svid(
                leaf,
                &chain[1..],
                rustls_pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
            )
            .map_err(|e| bad("the SVID does not chain to the bundle", &e))?;
        Ok(Self {
            spiffe_id,
            chain,
            key,
            bundle,
            not_before,
            not_after,
        })
    }
}

/// Reads a bundle sent by the server, which must be for `td` and hold at
/// least one CA.
pub(crate) fn bundle_from_proto(b: &pb::Bundle, td: &TrustDomain) -> Result<X509Bundle, String> {
    if b.trust_domain != td.name() {
        return Err(format!(
            "bundle is for trust domain {:?}, expected {td}",
            b.trust_domain
        ));
    }
    if b.x509_authorities.is_empty() {
        return Err("bundle has no X.509 authority".into());
    }
    for (i, der) in b.x509_authorities.iter().enumerate() {
        sigil::x509::check_ca(der).map_err(|e| format!("bundle authority {i}: {e}"))?;
    }
    Ok(X509Bundle::new(
        td.clone(),
        b.x509_authorities
            .iter()
            .map(|der| CertificateDer::from(der.clone()))
            .collect(),
    ))
}

/// Loads the stored agent SVID, or, when there is none usable, attests with
/// the configured node attestor and stores the result.
pub(crate) async fn establish(
    config: &Config,
    storage: &Storage,
) -> Result<NodeIdentity, NodeError> {
    let td = &config.trust_domain;
    let reason = match storage.load(td) {
        Ok(identity) => {
            tracing::info!(
                spiffe.id = %identity.spiffe_id,
                expires = %humantime::format_rfc3339_seconds(identity.not_after),
                "using the stored agent SVID"
            );
            return Ok(identity);
        }
        Err(reason) => reason,
    };
    let attestor = &config.node_attestor;
    let evidence = if attestor.reattests() {
        Evidence::read(attestor)?
    } else {
        let Some(source) = &config.join_token else {
            return Err(NodeError::NoCredentials(reason));
        };
        let token = match source {
            JoinTokenSource::Inline(t) => t.clone(),
            JoinTokenSource::File(path) => {
                JoinToken::read_file(path).map_err(|error| NodeError::TokenFile {
                    path: path.display().to_string(),
                    error,
                })?
            }
        };
        Evidence::join_token(&token)
    };
    if !matches!(reason, NotUsable::Missing(_)) {
        tracing::warn!(reason = %reason, "attestor" = attestor.name(), "the stored agent SVID cannot be used; attesting again");
    }
    let bootstrap = bootstrap_bundle(config, storage)?;
    let trust = std::sync::Arc::new(sigil::tls::TrustStore::new(&bootstrap).map_err(|e| {
        NodeError::BootstrapBundle {
            path: "(trust bundle)".into(),
            error: e.to_string(),
        }
    })?);
    let identity = attest(&config.server_address, td, trust, &evidence).await?;
    storage.save(&identity)?;
    tracing::info!(
        spiffe.id = %identity.spiffe_id,
        "attestor" = attestor.name(),
        expires = %humantime::format_rfc3339_seconds(identity.not_after),
        "attested to the server"
    );
    Ok(identity)
}

/// The bundle to verify the server with before the agent has an SVID: the
/// configured `trust_bundle_path`, else (for an agent attesting again) the
/// bundle stored with its last SVID.
fn bootstrap_bundle(config: &Config, storage: &Storage) -> Result<X509Bundle, NodeError> {
    let td = &config.trust_domain;
    let Some(path) = config.trust_bundle_path.as_ref() else {
        return storage.load_bundle(td).ok_or(NodeError::NoBootstrapBundle);
    };
    std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|pem| X509Bundle::from_pem(td.clone(), &pem).map_err(|e| e.to_string()))
        .map_err(|error| NodeError::BootstrapBundle {
            path: path.display().to_string(),
            error,
        })
}

#[cfg(test)]
mod tests;
