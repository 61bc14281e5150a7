//! The admin client: a gRPC channel over the server's Unix socket or, with
//! `--server-address`, over mTLS to the server's agent API port, presenting
//! an admin workload's X.509-SVID and accepting only the server's own
//! SPIFFE ID `spiffe://<td>/sigil/server`.
//!
//! The admin commands name their socket; the global remote flags, read
//! once at startup ([`use_remote`]), switch every command to the network.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sigil::bundle::X509Bundle;
use sigil::keys::PrivateKey;
use sigil::proto::sigil::admin::v1::admin_client::AdminClient;
use sigil::tls::{SpiffeServerVerifier, SvidResolver, TrustStore};
use sigil::transport::{error_chain, tls_channel_now, unix_channel};
use tonic::transport::Channel;

/// Where `sigil-agent api fetch x509 --write DIR` puts the first SVID.
const SVID_FILE: &str = "svid.0.pem";
/// Its private key.
const KEY_FILE: &str = "svid.0.key";
/// The trust bundle that came with it.
const BUNDLE_FILE: &str = "bundle.0.pem";

/// A server reached over the network, and the files of the admin
/// workload's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Remote {
    /// `HOST:PORT` of the server's agent API.
    pub(crate) address: String,
    /// The SVID's certificate chain (PEM, leaf first).
    pub(crate) cert: PathBuf,
    /// The SVID's private key (PEM, PKCS#8).
    pub(crate) key: PathBuf,
    /// The trust domain's bundle (PEM).
    pub(crate) bundle: PathBuf,
}

static REMOTE: OnceLock<Remote> = OnceLock::new();

impl Remote {
    /// The files `sigil-agent api fetch x509 --write DIR` writes for the
    /// first SVID.
    pub(crate) fn from_svid_dir(address: String, dir: &Path) -> Self {
        Self {
            address,
            cert: dir.join(SVID_FILE),
            key: dir.join(KEY_FILE),
            bundle: dir.join(BUNDLE_FILE),
        }
    }
}

/// Makes every later [`connect`] reach `remote` instead of a socket.
pub(crate) fn use_remote(remote: Remote) {
    // Set once, at startup; a second call would change nothing.
    let _ = REMOTE.set(remote);
}

/// Connects to the admin socket at `path`, or to the remote server when
/// one was chosen with [`use_remote`].
pub(crate) async fn connect(path: &Path) -> anyhow::Result<AdminClient<Channel>> {
    if let Some(remote) = REMOTE.get() {
        return connect_remote(remote).await;
    }
    let channel = unix_channel(path).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the server's admin socket {}: {}",
            path.display(),
            error_chain(&e)
        )
    })?;
    Ok(AdminClient::new(channel))
}

/// Connects over mTLS with the SVID in `remote`'s files.
async fn connect_remote(remote: &Remote) -> anyhow::Result<AdminClient<Channel>> {
    let config = client_config(remote)?;
    let channel = tls_channel_now(&remote.address, Arc::new(config))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the server at {}: {}",
                remote.address,
                error_chain(&e)
            )
        })?;
    Ok(AdminClient::new(channel))
}

/// The TLS configuration: present the SVID, trust the bundle, and accept
/// only the server of the SVID's trust domain.
fn client_config(remote: &Remote) -> anyhow::Result<rustls::ClientConfig> {
    let chain = read(&remote.cert).and_then(|pem| {
        CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}: not PEM certificates", remote.cert.display()))
    })?;
    let leaf = chain
        .first()
        .with_context(|| format!("{}: holds no certificate", remote.cert.display()))?;
    let id = sigil::x509::spiffe_id_of(leaf)
        .with_context(|| format!("{}: not an X509-SVID", remote.cert.display()))?;
    let key_pem = read(&remote.key)?;
    let key = std::str::from_utf8(&key_pem)
        .ok()
        .and_then(|pem| PrivateKey::from_pem(pem).ok())
        .with_context(|| format!("{}: not a PEM PKCS#8 private key", remote.key.display()))?;
    let td = id.trust_domain();
    let bundle = X509Bundle::from_pem(td.clone(), &read(&remote.bundle)?)
        .with_context(|| format!("{}: not a bundle", remote.bundle.display()))?;
    let trust = Arc::new(TrustStore::new(&bundle)?);
    let verifier = Arc::new(SpiffeServerVerifier::new(trust, td.server_id()));
    let identity = Arc::new(
        SvidResolver::new(chain, &key)
            .with_context(|| format!("{}: does not match the SVID", remote.key.display()))?,
    );
    Ok(sigil::tls::client_config(verifier, Some(identity))?)
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_svid_dir_names_the_files_the_agent_writes() {
        let remote = Remote::from_svid_dir("h:1".into(), Path::new("/d"));
        assert_eq!(remote.cert, PathBuf::from("/d/svid.0.pem"));
        assert_eq!(remote.key, PathBuf::from("/d/svid.0.key"));
        assert_eq!(remote.bundle, PathBuf::from("/d/bundle.0.pem"));
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Remote::from_svid_dir("h:1".into(), dir.path());
        let err = client_config(&remote).unwrap_err();
        assert!(
            format!("{err:#}").starts_with(&format!(
                "cannot read {}",
                dir.path().join("svid.0.pem").display()
            )),
            "{err:#}"
        );
    }
}
