//! Private keys as secrets, and files that hold secrets.
//!
//! A [`PrivateKey`] never prints its bytes: its `Debug` shows a placeholder,
//! and its memory is wiped when it is dropped.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use zeroize::Zeroizing;

/// Why a key could not be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The bytes are not a PKCS#8 key of a supported algorithm.
    #[error("not a supported PKCS#8 private key: {0}")]
    Malformed(rcgen::Error),
    /// Key generation failed.
    #[error("key generation failed: {0}")]
    Generate(rcgen::Error),
}

/// An unencrypted PKCS#8 DER private key.
#[derive(Clone)]
pub struct PrivateKey(Zeroizing<Vec<u8>>);

// === impl PrivateKey ===

impl PrivateKey {
    /// Generates a new ECDSA P-256 key, the key type every SPIFFE client and
    /// TLS stack accepts.
    pub fn generate_p256() -> Result<Self, KeyError> {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(KeyError::Generate)?;
        Ok(Self::from_key_pair(&pair))
    }

    /// Wraps PKCS#8 DER bytes after checking that they hold a usable key.
    pub fn from_pkcs8_der(der: Vec<u8>) -> Result<Self, KeyError> {
        let der = Zeroizing::new(der);
        let key = Self(der);
        key.key_pair()?;
        Ok(key)
    }

    /// Parses a PEM `PRIVATE KEY` block.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let pair = KeyPair::from_pem(pem).map_err(KeyError::Malformed)?;
        Ok(Self::from_key_pair(&pair))
    }

    /// Copies the key out of an rcgen key pair.
    pub fn from_key_pair(pair: &KeyPair) -> Self {
        Self(Zeroizing::new(pair.serialize_der()))
    }

    /// The PKCS#8 DER bytes.
    pub fn der(&self) -> &[u8] {
        &self.0
    }

    /// The key as PEM (`PRIVATE KEY`).
    pub fn to_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(pem::encode(&pem::Pem::new("PRIVATE KEY", self.0.to_vec())))
    }

    /// The key as an rcgen key pair, for signing.
    pub fn key_pair(&self) -> Result<KeyPair, KeyError> {
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from(self.0.as_slice());
        KeyPair::try_from(&der).map_err(KeyError::Malformed)
    }

    /// The key in the form rustls takes.
    pub fn to_rustls(&self) -> rustls_pki_types::PrivateKeyDer<'static> {
        rustls_pki_types::PrivateKeyDer::Pkcs8(self.0.to_vec().into())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey([elided])")
    }
}

// === files ===

/// Writes a file that holds a secret: mode 0600, written to a temporary file
/// in the same directory and renamed into place, so a reader never sees a
/// partial key and a crash leaves the old file intact.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_atomically(path, contents, 0o600)
}

/// Writes a file that holds public material (certificates, bundles): mode
/// 0644, atomically like [`write_secret_file`].
pub fn write_public_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_atomically(path, contents, 0o644)
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));

    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;

    // Make the rename itself durable.
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn debug_never_shows_key_bytes() {
        let key = PrivateKey::generate_p256().unwrap();
        let shown = format!("{key:?}");
        assert_eq!(shown, "PrivateKey([elided])");
    }

    #[test]
    fn secret_files_are_0600_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        let key = PrivateKey::generate_p256().unwrap();
        write_secret_file(&path, key.to_pem().as_bytes()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let read = PrivateKey::from_pem(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(read.der(), key.der());
    }

    #[test]
    fn garbage_is_not_a_key() {
        assert!(PrivateKey::from_pkcs8_der(vec![1, 2, 3]).is_err());
    }
}
