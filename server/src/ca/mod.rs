//! The trust domain's certificate authority: its persistence in the data
//! directory, the bundle it forms, and the server's own TLS SVID.
//!
//! Files: `<data_dir>/ca/cert.pem` (the CA certificate) and
//! `<data_dir>/ca/key.pem` (its key, mode 0600). A missing or expired CA is
//! replaced by a new self-signed one at startup.

pub(crate) mod server_svid;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sigil::TrustDomain;
use sigil::bundle::X509Bundle;
use sigil::keys::{PrivateKey, write_public_file, write_secret_file};
use sigil::proto::sigil::types::v1 as pb;
use sigil::x509::{Authority, IssueError};
use x509_parser::prelude::FromDer;

use crate::clock;

/// Why the CA could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CaError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A stored file is not what it should be.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The CA could not be created.
    #[error("creating the CA: {0}")]
    Issue(#[from] IssueError),
}

/// The active CA and the bundle it forms.
#[derive(Debug)]
pub(crate) struct Ca {
    authority: Arc<Authority>,
    bundle: X509Bundle,
    sequence: u64,
}

impl Ca {
    /// Loads the CA from `dir`, or creates (and stores) a new one valid for
    /// `ttl` when there is none or the stored one has expired.
    pub(crate) fn load_or_create(
        dir: &Path,
        td: &TrustDomain,
        ttl: Duration,
    ) -> Result<Self, CaError> {
        create_private_dir(dir)?;
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");

        let authority = if cert_path.exists() || key_path.exists() {
            let authority = load(&cert_path, &key_path, td)?;
            if authority.not_after() <= SystemTime::now() {
                tracing::warn!(
                    expired_at = %clock::rfc3339(clock::to_unix(authority.not_after())),
                    "the stored CA has expired; creating a new one (agents must attest again)"
                );
                create(&cert_path, &key_path, td, ttl)?
            } else {
                tracing::info!(
                    expires_at = %clock::rfc3339(clock::to_unix(authority.not_after())),
                    "loaded the CA"
                );
                authority
            }
        } else {
            let authority = create(&cert_path, &key_path, td, ttl)?;
            tracing::info!(
                expires_at = %clock::rfc3339(clock::to_unix(authority.not_after())),
                "created a new CA"
            );
            authority
        };
        Ok(Self::new(authority))
    }

    /// Wraps an authority.
    pub(crate) fn new(authority: Authority) -> Self {
        let bundle = X509Bundle::new(
            authority.trust_domain().clone(),
            vec![authority.cert().clone()],
        );
        // A new CA has a later notBefore than any before it, so the bundle's
        // sequence grows whenever the CA is replaced.
        let sequence = not_before(authority.cert()).unwrap_or(1);
        Self {
            authority: Arc::new(authority),
            bundle,
            sequence,
        }
    }

    /// The signing authority.
    pub(crate) fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    /// The trust bundle.
    pub(crate) fn bundle(&self) -> &X509Bundle {
        &self.bundle
    }

    /// The bundle in wire form.
    pub(crate) fn bundle_proto(&self) -> pb::Bundle {
        pb::Bundle {
            trust_domain: self.bundle.trust_domain().to_string(),
            x509_authorities: self
                .bundle
                .authorities()
                .iter()
                .map(|c| c.to_vec())
                .collect(),
            sequence: self.sequence,
        }
    }
}

fn load(cert_path: &Path, key_path: &Path, td: &TrustDomain) -> Result<Authority, CaError> {
    let invalid = |path: &Path, reason: String| CaError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| invalid(cert_path, format!("not a PEM certificate: {e}")))?;
    let key = PrivateKey::from_pem(&key_pem).map_err(|e| invalid(key_path, e.to_string()))?;

    let id = sigil::x509::spiffe_id_of(&cert).map_err(|e| invalid(cert_path, e.to_string()))?;
    if id.trust_domain_name() != td.name() {
        return Err(invalid(
            cert_path,
            format!(
                "the CA is for trust domain {}, not {td}; use another data_dir",
                id.trust_domain_name()
            ),
        ));
    }
    let pair = key
        .key_pair()
        .map_err(|e| invalid(key_path, e.to_string()))?;
    if spki_of(&cert).as_deref()
        != Some(rcgen::PublicKeyData::subject_public_key_info(&pair).as_slice())
    {
        return Err(invalid(
            key_path,
            "does not match the CA certificate".into(),
        ));
    }
    Authority::from_parts(td.clone(), cert.into_owned(), key).map_err(CaError::Issue)
}

fn create(
    cert_path: &Path,
    key_path: &Path,
    td: &TrustDomain,
    ttl: Duration,
) -> Result<Authority, CaError> {
    let authority = Authority::self_signed(td, ttl)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CaError::Io { path, source }
    };
    write_secret_file(key_path, authority.key().to_pem().as_bytes()).map_err(io(key_path))?;
    let pem = sigil::bundle::cert_to_pem(authority.cert());
    write_public_file(cert_path, pem.as_bytes()).map_err(io(cert_path))?;
    Ok(authority)
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Creates a directory (and its parents) with mode 0700 if it is missing.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CaError::Io {
            path: dir.to_owned(),
            source,
        })
}

fn spki_of(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(cert.public_key().raw.to_vec())
}

fn not_before(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    u64::try_from(cert.validity().not_before.timestamp()).ok()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn the_ca_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ttl = Duration::from_secs(3600);
        let first = Ca::load_or_create(&ca_dir, &td(), ttl).unwrap();
        let mode = std::fs::metadata(ca_dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(&ca_dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);

        let second = Ca::load_or_create(&ca_dir, &td(), ttl).unwrap();
        assert_eq!(second.authority().cert(), first.authority().cert());
        assert_eq!(
            second.bundle_proto().sequence,
            first.bundle_proto().sequence
        );
        sigil::x509::check_ca(first.authority().cert()).unwrap();
        assert_eq!(first.bundle_proto().x509_authorities.len(), 1);
    }

    #[test]
    fn a_ca_of_another_trust_domain_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        Ca::load_or_create(&ca_dir, &td(), Duration::from_secs(3600)).unwrap();
        let other = TrustDomain::new("other.org").unwrap();
        let err = Ca::load_or_create(&ca_dir, &other, Duration::from_secs(3600)).unwrap_err();
        assert!(
            err.to_string()
                .contains("the CA is for trust domain example.org, not other.org"),
            "{err}"
        );
    }

    #[test]
    fn an_expired_ca_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        // notBefore is back-dated 10 s, so a zero lifetime is already over.
        let old = Ca::load_or_create(&ca_dir, &td(), Duration::ZERO).unwrap();
        let new = Ca::load_or_create(&ca_dir, &td(), Duration::from_secs(3600)).unwrap();
        assert_ne!(new.authority().cert(), old.authority().cert());
        assert!(new.authority().not_after() > SystemTime::now());
    }
}
