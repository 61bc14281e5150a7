//! The `disk` upstream authority: a CA certificate and key in files, kept
//! outside Sigil, that signs every local authority as an intermediate.
//!
//! With it, the chains handed out are leaf, local intermediate, and any
//! upstream intermediates; the trust bundle holds the upstream root(s) and
//! does not change when the local authority rotates.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{Issuer, KeyPair};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sigil::TrustDomain;
use sigil::keys::PrivateKey;
use sigil::x509::Authority;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use super::CaError;

/// `[upstream_authority.disk]` of the server configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DiskUpstreamConfig {
    /// PEM file: the upstream CA certificate that signs, then any
    /// certificates above it.
    pub(crate) cert_file_path: PathBuf,
    /// PEM file (PKCS#8 `PRIVATE KEY`): the key of that certificate.
    pub(crate) key_file_path: PathBuf,
    /// PEM file with the root(s) to publish as the trust bundle; without it,
    /// the last certificate of the certificate file.
    pub(crate) bundle_file_path: Option<PathBuf>,
}

/// A loaded upstream authority.
pub(crate) struct Upstream {
    /// The certificate that signs the local authorities.
    cert: CertificateDer<'static>,
    /// The certificates of the cert file that are not roots: sent after the
    /// local intermediate (the signing certificate first).
    chain: Vec<CertificateDer<'static>>,
    /// The roots published as the trust bundle.
    roots: Vec<CertificateDer<'static>>,
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("chain", &self.chain.len())
            .field("roots", &self.roots.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Reads and checks the files: the key matches the certificate, which is
    /// an unexpired CA certificate allowed to sign certificates.
    pub(crate) fn load(config: &DiskUpstreamConfig) -> Result<Self, CaError> {
        let cert_path = &config.cert_file_path;
        let certs = read_certs(cert_path)?;
        let Some(cert) = certs.first().cloned() else {
            return Err(invalid(cert_path, "holds no certificate"));
        };
        let key_pem = read(&config.key_file_path)?;
        let key = PrivateKey::from_pem(&key_pem).map_err(|e| {
            invalid(
                &config.key_file_path,
                format!("{e} (convert it with `openssl pkcs8 -topk8 -nocrypt`)"),
            )
        })?;
        let pair = key
            .key_pair()
            .map_err(|e| invalid(&config.key_file_path, e.to_string()))?;

        let (_, parsed) = X509Certificate::from_der(&cert)
            .map_err(|_| invalid(cert_path, "the first certificate cannot be parsed"))?;
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&pair) {
            return Err(invalid(
                &config.key_file_path,
                "does not match the upstream certificate",
            ));
        }
        let is_ca = parsed
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
        let can_sign = parsed
            .key_usage()
            .ok()
            .flatten()
            .is_none_or(|ku| ku.value.key_cert_sign());
        if !is_ca || !can_sign {
            return Err(invalid(
                cert_path,
                "the upstream certificate is not a CA allowed to sign certificates \
                 (basicConstraints CA:TRUE, keyUsage keyCertSign)",
            ));
        }
        // X5-10: the local intermediate signs leaves, one more CA below it.
        let path_len = parsed
            .basic_constraints()
            .ok()
            .flatten()
            .and_then(|bc| bc.value.path_len_constraint);
        if path_len == Some(0) {
            return Err(invalid(
                cert_path,
                "the upstream certificate has pathLenConstraint 0: the intermediates it \
                 signs could not sign SVIDs",
            ));
        }
        warn_if_readable_by_others(&config.key_file_path);
        let secs = u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0);
        let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        if not_after <= SystemTime::now() {
            return Err(invalid(cert_path, "the upstream certificate has expired"));
        }

        let roots = match &config.bundle_file_path {
            Some(path) => {
                let roots = read_certs(path)?;
                if roots.is_empty() {
                    return Err(invalid(path, "holds no certificate"));
                }
                roots
            }
            // The top of the chain in the certificate file: non-empty, as
            // `certs` holds at least `cert`.
            None => certs.last().cloned().into_iter().collect(),
        };
        let chain: Vec<_> = certs.into_iter().filter(|c| !roots.contains(c)).collect();
        // The certificates handed out must lead to a published root.
        let leads_to_root = match chain.last() {
            None => true,
            Some(top) => roots.iter().any(|root| signed_by(top, Some(root))),
        };
        if !leads_to_root {
            return Err(invalid(
                config.bundle_file_path.as_deref().unwrap_or(cert_path),
                "no root here signed the top certificate of cert_file_path",
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&cert, pair)
            .map_err(|e| invalid(cert_path, format!("unusable as an issuer: {e}")))?;
        Ok(Self {
            cert,
            chain,
            roots,
            issuer,
            not_after,
        })
    }

    /// The roots to publish as the trust bundle.
    pub(crate) fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// When the upstream certificate expires.
    pub(crate) fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Creates a local authority over `key`: an intermediate CA certificate
    /// for `td` signed by the upstream key, valid from `now` (back-dated)
    /// for `ttl` but never beyond the upstream certificate.
    pub(crate) fn sign(
        &self,
        td: &TrustDomain,
        key: PrivateKey,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Authority, CaError> {
        let not_after = (now + ttl).min(self.not_after);
        if not_after <= now {
            return Err(CaError::Issue(sigil::x509::IssueError::AuthorityExpired(
                self.not_after,
            )));
        }
        let pair = key.key_pair().map_err(sigil::x509::IssueError::from)?;
        let params = sigil::x509::ca_params(td, now - sigil::x509::BACKDATE, not_after);
        let cert = params
            .signed_by(&pair, &self.issuer)
            .map_err(sigil::x509::IssueError::from)?;
        let authority = Authority::from_parts(td.clone(), cert.der().clone(), key)?;
        Ok(self.adopt(authority))
    }

    /// Hands out `authority`'s leaves with the upstream chain after them.
    pub(crate) fn adopt(&self, authority: Authority) -> Authority {
        authority.with_upstream_chain(self.chain.clone())
    }

    /// Whether `cert` was signed by the upstream key.
    pub(crate) fn issued(&self, cert: &[u8]) -> bool {
        signed_by(cert, Some(&self.cert))
    }
}

/// Whether `cert`'s signature verifies with `issuer`'s public key (with its
/// own when `issuer` is `None`: self-signed).
pub(crate) fn signed_by(cert: &[u8], issuer: Option<&[u8]>) -> bool {
    let Ok((_, parsed)) = X509Certificate::from_der(cert) else {
        return false;
    };
    match issuer {
        None => parsed.verify_signature(None).is_ok(),
        Some(issuer) => match X509Certificate::from_der(issuer) {
            Ok((_, issuer)) => parsed.verify_signature(Some(issuer.public_key())).is_ok(),
            Err(_) => false,
        },
    }
}

/// Warns when a key file can be read by users other than its owner.
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the upstream authority's key file is readable by other users; make it 0600"
        );
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let pem = read(path)?;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("not PEM certificates: {e}")))
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

fn invalid(path: &Path, reason: impl Into<String>) -> CaError {
    CaError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}
