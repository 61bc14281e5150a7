//! X.509-SVIDs: the certificate profiles of the X.509-SVID standard
//! (<https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md>), for
//! building certificates ([`Authority`]) and for checking them
//! ([`check_leaf`], [`check_ca`]), and PKCS#10 CSRs ([`Csr`]).
//!
//! The profiles satisfy the strictest of the SPIFFE client libraries (rules
//! X5-18 and X5-19 of the conformance notes): leaves carry exactly one URI SAN
//! with a non-root path, a critical BasicConstraints `CA:FALSE`, a critical
//! KeyUsage `digitalSignature`, and EKU serverAuth + clientAuth; signing
//! certificates carry a non-empty subject, critical BasicConstraints
//! `CA:TRUE`, critical KeyUsage `keyCertSign, cRLSign`, no EKU, and the trust
//! domain's ID as URI SAN.
//!
//! Certificates are signed with the algorithm of the signing key
//! ([`KeyType`](crate::keys::KeyType)): ECDSA P-256 with SHA-256, ECDSA P-384
//! with SHA-384, or RSA PKCS#1 v1.5 with SHA-256. Leaves carry
//! `digitalSignature` alone whatever their key type (X5-13, X5-18). An
//! authority may be an intermediate below an upstream CA; the chains it
//! hands out then carry it and the upstream certificates below the root
//! ([`Authority::with_upstream_chain`]).

mod check;
mod csr;

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

pub use check::{CheckError, check_ca, check_leaf, not_after, spiffe_id_of};
pub use csr::{Csr, CsrError, MAX_CSR_LEN, build_csr};

use crate::keys::PrivateKey;
use crate::{SpiffeId, TrustDomain};

/// How far notBefore is set back from the time of signing, so that peers
/// whose clocks run a little behind accept a fresh SVID.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// Most DNS names one SVID may carry.
pub const MAX_DNS_NAMES: usize = 64;

/// Why a certificate could not be issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// A leaf SVID needs a SPIFFE ID with a non-root path (X5-3).
    #[error("SPIFFE ID {0} has no path; a leaf SVID needs one")]
    RootPath(SpiffeId),
    /// The SPIFFE ID is not in the authority's trust domain.
    #[error("SPIFFE ID {0} is not in trust domain {1}")]
    ForeignId(SpiffeId, TrustDomain),
    /// A DNS name is malformed, or there are too many.
    #[error("invalid dns_names: {0}")]
    DnsName(String),
    /// The authority has expired, or expires before the SVID could start.
    #[error("the signing authority expires at {0:?}; no SVID can be issued")]
    AuthorityExpired(SystemTime),
    /// The authority's key is unusable.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// rcgen refused the parameters or the key.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// A signing authority: a CA certificate and its key.
///
/// Leaf SVIDs it signs never outlive it. Its `Debug` shows the certificate's
/// subject and lifetime, never the key.
pub struct Authority {
    cert: CertificateDer<'static>,
    key: PrivateKey,
    issuer: Issuer<'static, KeyPair>,
    trust_domain: TrustDomain,
    not_after: SystemTime,
    /// What follows a leaf it signs in the chain handed out: nothing for a
    /// root; for an intermediate, its own certificate and the upstream
    /// certificates above it, up to but excluding the root.
    chain: Vec<CertificateDer<'static>>,
}

/// A leaf SVID just signed: the chain to hand out (leaf first) and its expiry.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    /// DER certificates, leaf first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
}

// === impl Authority ===

impl Authority {
    /// Creates a self-signed root for a trust domain, with a new P-256 key,
    /// valid from now for `ttl`.
    pub fn self_signed(td: &TrustDomain, ttl: Duration) -> Result<Self, IssueError> {
        Self::self_signed_with(td, PrivateKey::generate_p256()?, SystemTime::now(), ttl)
    }

    /// Creates a self-signed root for a trust domain over `key`, valid from
    /// `now` (back-dated by [`BACKDATE`]) for `ttl`. Its signatures use the
    /// key's algorithm.
    pub fn self_signed_with(
        td: &TrustDomain,
        key: PrivateKey,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Self, IssueError> {
        let pair = key.key_pair()?;
        let params = ca_params(td, now - BACKDATE, now + ttl);
        let cert = params.self_signed(&pair)?;
        Self::from_parts(td.clone(), cert.der().clone(), key)
    }

    /// Makes this authority an intermediate: the chains of the leaves it
    /// signs go on with its own certificate and then `upstream`, the
    /// certificates above it up to but excluding the root that verifiers
    /// hold in their bundle.
    #[must_use]
    pub fn with_upstream_chain(mut self, upstream: Vec<CertificateDer<'static>>) -> Self {
        self.chain = std::iter::once(self.cert.clone()).chain(upstream).collect();
        self
    }

    /// The certificates that follow a leaf it signs (leaf excluded): empty
    /// for a root.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Rebuilds an authority from a stored certificate and key.
    pub fn from_parts(
        trust_domain: TrustDomain,
        cert: CertificateDer<'static>,
        key: PrivateKey,
    ) -> Result<Self, IssueError> {
        let pair = key.key_pair()?;
        let issuer = Issuer::from_ca_cert_der(&cert, pair)?;
        let not_after = not_after(&cert).map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
        Ok(Self {
            cert,
            key,
            issuer,
            trust_domain,
            not_after,
            chain: Vec::new(),
        })
    }

    /// The CA certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA's private key.
    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    /// The trust domain it signs for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// When the CA certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs a leaf X.509-SVID for `id` over `public_key` (a key from a
    /// verified CSR, or any rcgen public key). The SVID lives `ttl`, capped
    /// at the authority's own expiry.
    pub fn sign_leaf(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<IssuedSvid, IssueError> {
        if !id.is_workload_id() {
            return Err(IssueError::RootPath(id.clone()));
        }
        if !id.is_member_of(&self.trust_domain) {
            return Err(IssueError::ForeignId(id.clone(), self.trust_domain.clone()));
        }
        let now = SystemTime::now();
        let not_after = (now + ttl).min(self.not_after);
        if not_after <= now {
            return Err(IssueError::AuthorityExpired(self.not_after));
        }

        let params = leaf_params(&self.trust_domain, id, dns_names, now - BACKDATE, not_after)?;
        let cert = params.signed_by(public_key, &self.issuer)?;

        let mut chain = Vec::with_capacity(1 + self.chain.len());
        chain.push(cert.der().clone());
        chain.extend(self.chain.iter().cloned());
        Ok(IssuedSvid {
            chain,
            not_after: truncate_to_seconds(not_after),
        })
    }
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .field("intermediate", &!self.chain.is_empty())
            .field("key", &self.key)
            .finish()
    }
}

// === profiles ===

/// The parameters of a signing certificate for `td` (X5-19).
pub fn ca_params(
    td: &TrustDomain,
    not_before: SystemTime,
    not_after: SystemTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(td);
    params.serial_number = Some(new_serial());
    params.not_before = OffsetDateTime::from(not_before);
    params.not_after = OffsetDateTime::from(not_after);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    if let Ok(uri) = td.id_string().try_into() {
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    params
}

/// The parameters of a leaf X.509-SVID (X5-18).
pub fn leaf_params(
    td: &TrustDomain,
    id: &SpiffeId,
    dns_names: &[String],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, IssueError> {
    if dns_names.len() > MAX_DNS_NAMES {
        return Err(IssueError::DnsName(format!(
            "at most {MAX_DNS_NAMES} names are allowed"
        )));
    }
    let mut sans = Vec::with_capacity(1 + dns_names.len());
    let uri = id
        .as_str()
        .try_into()
        .map_err(|_| IssueError::RootPath(id.clone()))?;
    sans.push(SanType::URI(uri));
    for name in dns_names {
        let dns = name
            .as_str()
            .try_into()
            .map_err(|_| IssueError::DnsName(name.clone()))?;
        sans.push(SanType::DnsName(dns));
    }

    let mut params = CertificateParams::default();
    params.distinguished_name = subject(td);
    params.serial_number = Some(new_serial());
    params.not_before = OffsetDateTime::from(not_before);
    params.not_after = OffsetDateTime::from(not_after);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.subject_alt_names = sans;
    Ok(params)
}

/// Every certificate Sigil issues has the subject `O=<trust domain>`, so the
/// issuer of a leaf matches its CA's subject byte for byte (X5-6).
fn subject(td: &TrustDomain) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, td.name());
    dn
}

/// A random positive serial number of 16 bytes (X5-18: positive, at most 20
/// octets).
pub fn new_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // The system RNG failing is not recoverable; a fixed serial is not an
    // option either, so fall back to the clock only if it ever does.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = nanos.to_be_bytes();
    }
    // Clear the top bit so the DER INTEGER is positive, and set the next one
    // so the encoding never shrinks below 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn truncate_to_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

#[cfg(test)]
mod tests;
