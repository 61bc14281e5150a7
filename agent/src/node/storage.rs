//! The agent's files in its data directory:
//! - `agent_svid.pem`: the agent SVID chain, leaf first;
//! - `agent_key.pem`: its key (mode 0600);
//! - `bundle.pem`: the trust domain's bundle, as last received.
//!
//! Every file is written atomically, so a crash leaves the old one intact.

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sigil::TrustDomain;
use sigil::bundle::X509Bundle;
use sigil::keys::{PrivateKey, write_public_file, write_secret_file};
use zeroize::Zeroizing;

use super::{NodeError, NodeIdentity};

/// The agent SVID chain.
pub(crate) const SVID_FILE: &str = "agent_svid.pem";
/// The agent SVID's key.
pub(crate) const KEY_FILE: &str = "agent_key.pem";
/// The bundle.
pub(crate) const BUNDLE_FILE: &str = "bundle.pem";

/// The data directory.
#[derive(Debug, Clone)]
pub(crate) struct Storage {
    dir: PathBuf,
}

/// Why the stored agent SVID cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NotUsable {
    /// A file is missing.
    #[error("{0} does not exist")]
    Missing(String),
    /// A file cannot be read or parsed.
    #[error("{file} is unusable: {reason}")]
    Unreadable {
        /// The file.
        file: String,
        /// Why.
        reason: String,
    },
    /// The SVID has expired.
    #[error("the stored agent SVID expired at {0}")]
    Expired(String),
}

impl Storage {
    /// The data directory at `dir`.
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// Creates the directory (mode 0700) if it does not exist.
    pub(crate) fn create(&self) -> Result<(), NodeError> {
        let err = |error| NodeError::Storage {
            path: self.dir.display().to_string(),
            error,
        };
        match std::fs::metadata(&self.dir) {
            Ok(meta) => {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(
                        path = %self.dir.display(),
                        "the data directory is accessible to other users; 0700 is recommended"
                    );
                }
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::NotFound => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(err),
            Err(e) => Err(err(e)),
        }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Loads the stored identity, if it is complete, valid and unexpired.
    pub(crate) fn load(&self, td: &TrustDomain) -> Result<NodeIdentity, NotUsable> {
        let read = |file: &str| -> Result<Zeroizing<Vec<u8>>, NotUsable> {
            let path = self.path(file);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(Zeroizing::new(bytes)),
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    Err(NotUsable::Missing(path.display().to_string()))
                }
                Err(e) => Err(unreadable(&path, &e)),
            }
        };
        let svid_pem = read(SVID_FILE)?;
        let key_pem = read(KEY_FILE)?;
        let bundle_pem = read(BUNDLE_FILE)?;

        let chain = CertificateDer::pem_slice_iter(&svid_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unreadable(&self.path(SVID_FILE), &e))?;
        let key = std::str::from_utf8(&key_pem)
            .map_err(|e| e.to_string())
            .and_then(|pem| PrivateKey::from_pem(pem).map_err(|e| e.to_string()))
            .map_err(|e| unreadable(&self.path(KEY_FILE), &e))?;
        let bundle = X509Bundle::from_pem(td.clone(), &bundle_pem)
            .map_err(|e| unreadable(&self.path(BUNDLE_FILE), &e))?;

        let (_, not_after) = chain
            .first()
            .map(|leaf| crate::certs::validity(leaf))
            .transpose()
            .map_err(|e| unreadable(&self.path(SVID_FILE), &e))?
            .ok_or_else(|| unreadable(&self.path(SVID_FILE), &"no certificate"))?;
        if not_after <= SystemTime::now() {
            return Err(NotUsable::Expired(
                humantime::format_rfc3339_seconds(not_after).to_string(),
            ));
        }
        NodeIdentity::new(td, chain, key, bundle).map_err(|e| unreadable(&self.path(SVID_FILE), &e))
    }

    /// Stores the agent SVID, its key and the bundle.
    pub(crate) fn save(&self, identity: &NodeIdentity) -> Result<(), NodeError> {
        self.save_svid(&identity.chain, &identity.key)?;
        self.save_bundle(&identity.bundle)
    }

    /// Stores an agent SVID and its key. The key goes first: a crash in
    /// between leaves a pair that does not match, which loading refuses.
    pub(crate) fn save_svid(
        &self,
        chain: &[CertificateDer<'static>],
        key: &PrivateKey,
    ) -> Result<(), NodeError> {
        let pem: String = chain
            .iter()
            .map(|der| sigil::bundle::cert_to_pem(der))
            .collect();
        self.write(KEY_FILE, key.to_pem().as_bytes(), true)?;
        self.write(SVID_FILE, pem.as_bytes(), false)
    }

    /// The stored bundle, if there is a usable one.
    pub(crate) fn load_bundle(&self, td: &TrustDomain) -> Option<X509Bundle> {
        let pem = std::fs::read(self.path(BUNDLE_FILE)).ok()?;
        X509Bundle::from_pem(td.clone(), &pem).ok()
    }

    /// Stores the bundle.
    pub(crate) fn save_bundle(&self, bundle: &X509Bundle) -> Result<(), NodeError> {
        self.write(BUNDLE_FILE, bundle.to_pem().as_bytes(), false)
    }

    /// Removes the agent SVID and key, after the server refused them.
    pub(crate) fn remove_svid(&self) -> Result<(), NodeError> {
        for file in [SVID_FILE, KEY_FILE] {
            let path = self.path(file);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(NodeError::Storage {
                        path: path.display().to_string(),
                        error,
                    });
                }
            }
        }
        Ok(())
    }

    fn write(&self, file: &str, contents: &[u8], secret: bool) -> Result<(), NodeError> {
        let path = self.path(file);
        let result = if secret {
            write_secret_file(&path, contents)
        } else {
            write_public_file(&path, contents)
        };
        result.map_err(|error| NodeError::Storage {
            path: path.display().to_string(),
            error,
        })
    }
}

fn unreadable(path: &Path, reason: &dyn std::fmt::Display) -> NotUsable {
    NotUsable::Unreadable {
        file: path.display().to_string(),
        reason: reason.to_string(),
    }
}
