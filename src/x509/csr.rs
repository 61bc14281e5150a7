//! PKCS#10 certificate signing requests.
//!
//! A CSR comes from an agent, so it is untrusted input: it is size-limited,
//! its signature is verified, and only its public key and its single URI SAN
//! are used. Whatever else it asks for (CA flags, key usages, other names) is
//! ignored: the server applies its own profile.

use rcgen::{CertificateParams, CertificateSigningRequestParams, KeyPair, SanType};
use rustls_pki_types::CertificateSigningRequestDer;

use crate::SpiffeId;
use crate::spiffe_id::ParseError;

/// Largest CSR accepted, in bytes. A P-256 or RSA-4096 CSR with one URI SAN
/// is well below it.
pub const MAX_CSR_LEN: usize = 8 * 1024;

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// The CSR is larger than [`MAX_CSR_LEN`].
    #[error("is larger than {MAX_CSR_LEN} bytes")]
    TooLarge,
    /// The CSR is not DER PKCS#10, uses an unsupported algorithm or
    /// extension, or its signature does not verify.
    #[error("is malformed or its signature does not verify")]
    Malformed,
    /// The CSR has more than one URI SAN.
    #[error("has {0} URI SANs; at most one is allowed")]
    UriSanCount(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(ParseError),
}

/// A CSR whose signature has been verified.
#[derive(Debug)]
pub struct Csr {
    public_key: rcgen::PublicKey,
    spiffe_id: Option<SpiffeId>,
}

// === impl Csr ===

impl Csr {
    /// Parses a DER CSR and verifies its signature.
    pub fn from_der(der: &[u8]) -> Result<Self, CsrError> {
        if der.len() > MAX_CSR_LEN {
            return Err(CsrError::TooLarge);
        }
        let der = CertificateSigningRequestDer::from(der);
        let parsed =
            CertificateSigningRequestParams::from_der(&der).map_err(|_| CsrError::Malformed)?;

        let uris: Vec<String> = parsed
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(uri) => Some(uri.to_string()),
                _ => None,
            })
            .collect();
        let spiffe_id = match uris.as_slice() {
            [] => None,
            [uri] => Some(uri.parse().map_err(CsrError::BadSpiffeId)?),
            more => return Err(CsrError::UriSanCount(more.len())),
        };

        Ok(Self {
            public_key: parsed.public_key,
            spiffe_id,
        })
    }

    /// The requested SPIFFE ID, if the CSR has a URI SAN.
    pub fn spiffe_id(&self) -> Option<&SpiffeId> {
        self.spiffe_id.as_ref()
    }

    /// The public key to certify.
    pub fn public_key(&self) -> &rcgen::PublicKey {
        &self.public_key
    }
}

/// Builds a DER CSR signed by `key`, naming `id` as its URI SAN when given.
pub fn build_csr(key: &KeyPair, id: Option<&SpiffeId>) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = CertificateParams::default();
    if let Some(id) = id {
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    }
    let csr = params.serialize_request(key)?;
    Ok(csr.der().to_vec())
}
