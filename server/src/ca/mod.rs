//! The trust domain's X.509 signing authorities: the journal of their
//! lives (kept in the store), their keys and certificates in the data
//! directory, the schedule that rotates them, the bundle they form, and the
//! server's own TLS SVID.
//!
//! Files: `<data_dir>/ca/<id>.cert.pem` (an authority's certificate) and
//! `<data_dir>/ca/<id>.key.pem` (its key, mode 0600), one pair per authority
//! in the journal, where `<id>` is the hex subject key identifier. A CA kept
//! by earlier versions in `cert.pem`/`key.pem` is taken into the journal as
//! the active authority.
//!
//! The [key manager](keys) decides the authorities' key type, whether their
//! keys are kept in those files (`disk`) or in memory only (`memory`), and
//! whether they are self-signed or intermediates signed by an
//! [upstream authority](upstream), whose roots then form the bundle.

pub(crate) mod journal;
pub(crate) mod keys;
pub(crate) mod live;
pub(crate) mod rotation;
pub(crate) mod server_svid;
pub(crate) mod upstream;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
#[cfg(test)]
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sigil::TrustDomain;
use sigil::bundle::X509Bundle;
use sigil::keys::{PrivateKey, write_public_file, write_secret_file};
use sigil::proto::sigil::types::v1 as pb;
use sigil::x509::{Authority, IssueError};
use tokio::sync::watch;
use x509_parser::prelude::FromDer;

use crate::store::StoreError;

/// Why the CA could not be loaded, created or rotated.
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
    /// An authority could not be created.
    #[error("creating an authority: {0}")]
    Issue(#[from] IssueError),
    /// The journal could not be read or written.
    #[error("authority journal: {0}")]
    Store(#[from] StoreError),
    /// A new authority key could not be generated.
    #[error("generating an authority key: {0}")]
    KeyGeneration(String),
    /// The journal has no usable signing authority.
    #[error("authority journal: no active authority")]
    NoActive,
}

/// What the services currently use: the signing authority and the bundle.
#[derive(Debug)]
pub(crate) struct Published {
    /// The signing authority's ID.
    pub(crate) active_id: String,
    /// The signing authority.
    pub(crate) active: Arc<Authority>,
    /// Every authority not yet retired.
    pub(crate) bundle: X509Bundle,
    /// The bundle's sequence number.
    pub(crate) sequence: u64,
    /// Subject key identifiers of the tainted and revoked authorities,
    /// whose SVIDs agents replace.
    pub(crate) tainted: Vec<Vec<u8>>,
}

/// The signing authority and the bundle, as the services read them; the
/// rotation replaces them and notifies subscribers.
#[derive(Debug)]
pub(crate) struct Ca {
    current: ArcSwap<Published>,
    changes: watch::Sender<()>,
    max_svid_ttl: Duration,
}

impl Ca {
    /// Starts with `published`; SVIDs it signs live at most `max_svid_ttl`.
    pub(crate) fn new(published: Published, max_svid_ttl: Duration) -> Self {
        Self {
            current: ArcSwap::from_pointee(published),
            changes: watch::channel(()).0,
            max_svid_ttl,
        }
    }

    /// Replaces the authority and bundle and notifies subscribers.
    pub(crate) fn publish(&self, published: Published) {
        self.current.store(Arc::new(published));
        self.changes.send_replace(());
    }

    /// Changes each time [`Ca::publish`] is called.
    pub(crate) fn subscribe(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
    }

    /// The current authority and bundle.
    pub(crate) fn current(&self) -> Arc<Published> {
        self.current.load_full()
    }

    /// The signing authority.
    pub(crate) fn authority(&self) -> Arc<Authority> {
        Arc::clone(&self.current.load().active)
    }

    /// The longest lifetime of an SVID: a sixth of the authorities' life.
    pub(crate) fn max_svid_ttl(&self) -> Duration {
        self.max_svid_ttl
    }

    /// The bundle in wire form.
    pub(crate) fn bundle_proto(&self) -> pb::Bundle {
        let current = self.current.load();
        pb::Bundle {
            trust_domain: current.bundle.trust_domain().to_string(),
            x509_authorities: current
                .bundle
                .authorities()
                .iter()
                .map(|c| c.to_vec())
                .collect(),
            sequence: current.sequence,
        }
    }
}

/// Creates a self-signed P-256 authority valid from `now` for `ttl`.
#[cfg(test)]
pub(crate) fn new_authority(
    td: &TrustDomain,
    now: SystemTime,
    ttl: Duration,
) -> Result<Authority, IssueError> {
    let key = PrivateKey::generate_p256()?;
    let pair = key.key_pair()?;
    let params = sigil::x509::ca_params(td, now - sigil::x509::BACKDATE, now + ttl);
    let cert = params.self_signed(&pair)?;
    Authority::from_parts(td.clone(), cert.der().clone(), key)
}

/// The authority's ID: the hex of its subject key identifier (of the
/// SHA-256 of its public key when it has none).
pub(crate) fn authority_id(cert: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    let ski = parsed
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                Some(id.0.to_vec())
            }
            _ => None,
        });
    let bytes = ski.unwrap_or_else(|| {
        ring::digest::digest(&ring::digest::SHA256, parsed.public_key().raw)
            .as_ref()
            .to_vec()
    });
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The certificate and key files of authority `id`.
fn paths(dir: &Path, id: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{id}.cert.pem")),
        dir.join(format!("{id}.key.pem")),
    )
}

/// Writes authority `id`'s key (0600) and certificate.
pub(crate) fn save(dir: &Path, id: &str, authority: &Authority) -> Result<(), CaError> {
    let (cert_path, key_path) = paths(dir, id);
    write_files(&cert_path, &key_path, authority)
}

/// Reads authority `id`.
pub(crate) fn load_saved(dir: &Path, id: &str, td: &TrustDomain) -> Result<Authority, CaError> {
    let (cert_path, key_path) = paths(dir, id);
    load(&cert_path, &key_path, td)
}

/// Removes authority `id`'s files.
pub(crate) fn remove_saved(dir: &Path, id: &str) -> Result<(), CaError> {
    let (cert_path, key_path) = paths(dir, id);
    for path in [key_path, cert_path] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CaError::Io { path, source }),
        }
    }
    Ok(())
}

/// The CA kept by earlier versions in `cert.pem` and `key.pem`, if any, with
/// its notBefore in seconds since the Unix epoch.
pub(crate) fn load_legacy(
    dir: &Path,
    td: &TrustDomain,
) -> Result<Option<(Authority, u64)>, CaError> {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if !cert_path.exists() && !key_path.exists() {
        return Ok(None);
    }
    let authority = load(&cert_path, &key_path, td)?;
    let not_before = not_before(authority.cert()).unwrap_or(1);
    Ok(Some((authority, not_before)))
}

/// Removes the files of [`load_legacy`].
pub(crate) fn remove_legacy(dir: &Path) {
    for name in ["key.pem", "cert.pem"] {
        let path = dir.join(name);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove an old CA file");
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

fn write_files(cert_path: &Path, key_path: &Path, authority: &Authority) -> Result<(), CaError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CaError::Io { path, source }
    };
    write_secret_file(key_path, authority.key().to_pem().as_bytes()).map_err(io(key_path))?;
    let pem = sigil::bundle::cert_to_pem(authority.cert());
    write_public_file(cert_path, pem.as_bytes()).map_err(io(cert_path))?;
    Ok(())
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
    fn an_authority_is_saved_privately_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        create_private_dir(&ca_dir).unwrap();
        let authority = new_authority(&td(), SystemTime::now(), Duration::from_secs(3600)).unwrap();
        sigil::x509::check_ca(authority.cert()).unwrap();
        let id = authority_id(authority.cert()).unwrap();
        assert_eq!(id.len(), 40, "a SHA-1 subject key identifier in hex: {id}");
        save(&ca_dir, &id, &authority).unwrap();

        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca_dir.join(format!("{id}.key.pem"))), 0o600);
        assert_eq!(mode(&ca_dir), 0o700);
        let loaded = load_saved(&ca_dir, &id, &td()).unwrap();
        assert_eq!(loaded.cert(), authority.cert());
        assert!(!format!("{loaded:?}").contains("PRIVATE KEY"));

        remove_saved(&ca_dir, &id).unwrap();
        assert!(!ca_dir.join(format!("{id}.key.pem")).exists());
        assert!(!ca_dir.join(format!("{id}.cert.pem")).exists());
    }

    #[test]
    fn an_authority_of_another_trust_domain_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let authority = new_authority(&td(), SystemTime::now(), Duration::from_secs(3600)).unwrap();
        save(dir.path(), "a", &authority).unwrap();
        let other = TrustDomain::new("other.org").unwrap();
        let err = load_saved(dir.path(), "a", &other).unwrap_err();
        assert!(
            err.to_string()
                .contains("the CA is for trust domain example.org, not other.org"),
            "{err}"
        );
    }
}
