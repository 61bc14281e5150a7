//! The key manager: how the trust domain's authorities are made (key type,
//! self-signed or signed by an [upstream](super::upstream) authority), where
//! their keys are kept, and which certificates form the trust bundle.
//!
//! Key managers:
//! - `disk` (the default): every authority's key and certificate are files
//!   in the CA directory (see the [module](super) documentation), so a
//!   restart keeps the authorities;
//! - `memory`: keys are never written anywhere. A restart starts new
//!   authorities: without an upstream authority that is a new trust bundle,
//!   and agents must attest again; with one, the bundle (the upstream roots)
//!   stays and agents carry on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use sigil::TrustDomain;
use sigil::bundle::X509Bundle;
use sigil::keys::{KeyType, PrivateKey};
use sigil::x509::Authority;

use super::CaError;
use super::journal::Journal;
use super::upstream::{self, Upstream};
use crate::config::Config;

/// Where authority keys are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum KeyManagerKind {
    /// Files in the CA directory, mode 0600.
    #[default]
    Disk,
    /// Process memory only; a restart starts new authorities.
    Memory,
}

impl KeyManagerKind {
    /// The name used in the configuration.
    pub(crate) fn name(self) -> &'static str {
        match self {
            KeyManagerKind::Disk => "disk",
            KeyManagerKind::Memory => "memory",
        }
    }
}

impl std::str::FromStr for KeyManagerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disk" => Ok(KeyManagerKind::Disk),
            "memory" => Ok(KeyManagerKind::Memory),
            other => Err(format!("{other:?}: must be `disk` or `memory`")),
        }
    }
}

/// Makes, keeps and finds the trust domain's authorities.
#[derive(Debug)]
pub(crate) struct KeyManager {
    kind: KeyManagerKind,
    dir: PathBuf,
    key_type: KeyType,
    upstream: Option<Upstream>,
}

impl KeyManager {
    /// A key manager of `kind` keeping files (when it keeps any) in `dir`,
    /// making `key_type` keys, signed by `upstream` when given.
    pub(crate) fn new(
        kind: KeyManagerKind,
        dir: &Path,
        key_type: KeyType,
        upstream: Option<Upstream>,
    ) -> Self {
        Self {
            kind,
            dir: dir.to_owned(),
            key_type,
            upstream,
        }
    }

    /// The key manager the configuration asks for, keeping files (when it
    /// keeps any) in `dir`; reads the upstream authority's files.
    pub(crate) fn from_config(config: &Config, dir: &Path) -> Result<Self, CaError> {
        let upstream = match &config.upstream_authority {
            Some(disk) => {
                let upstream = Upstream::load(disk)?;
                tracing::info!(
                    cert_file_path = %disk.cert_file_path.display(),
                    roots = upstream.roots().len(),
                    expires_at = %humantime::format_rfc3339_seconds(upstream.not_after()),
                    "upstream authority `disk`: the authorities are intermediates it signs"
                );
                Some(upstream)
            }
            None => None,
        };
        tracing::info!(
            key_manager = config.key_manager.name(),
            ca_key_type = %config.ca_key_type,
            "authority keys"
        );
        Ok(Self::new(
            config.key_manager,
            dir,
            config.ca_key_type,
            upstream,
        ))
    }

    /// The default: self-signed P-256 authorities kept in files in `dir`.
    #[cfg(test)]
    pub(crate) fn disk(dir: &Path) -> Self {
        Self::new(KeyManagerKind::Disk, dir, KeyType::EcP256, None)
    }

    /// The CA directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the CA directory when keys are kept on disk.
    pub(crate) fn prepare_dir(&self) -> Result<(), CaError> {
        match self.kind {
            KeyManagerKind::Disk => super::create_private_dir(&self.dir),
            KeyManagerKind::Memory => Ok(()),
        }
    }

    /// Creates an authority valid from `now` for `ttl` (capped by the
    /// upstream certificate), with a new key made on the blocking pool. It
    /// is not saved yet: see [`KeyManager::save`].
    pub(crate) async fn create(
        &self,
        td: &TrustDomain,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Authority, CaError> {
        let key_type = self.key_type;
        let key = tokio::task::spawn_blocking(move || PrivateKey::generate(key_type))
            .await
            .map_err(|e| CaError::KeyGeneration(e.to_string()))?
            .map_err(|e| CaError::KeyGeneration(e.to_string()))?;
        match &self.upstream {
            Some(upstream) => upstream.sign(td, key, now, ttl),
            None => Ok(Authority::self_signed_with(td, key, now, ttl)?),
        }
    }

    /// Keeps authority `id` (disk: writes its files).
    pub(crate) fn save(&self, id: &str, authority: &Authority) -> Result<(), CaError> {
        match self.kind {
            KeyManagerKind::Disk => super::save(&self.dir, id, authority),
            KeyManagerKind::Memory => Ok(()),
        }
    }

    /// Forgets authority `id` (disk: removes its files).
    pub(crate) fn remove(&self, id: &str) -> Result<(), CaError> {
        match self.kind {
            KeyManagerKind::Disk => super::remove_saved(&self.dir, id),
            KeyManagerKind::Memory => Ok(()),
        }
    }

    /// The authorities of a stored journal. When they cannot serve (memory
    /// keys are gone after a restart; or they were not signed the way the
    /// configuration now asks) the journal is dropped, with a warning, and
    /// an empty one is returned: the schedule then starts a fresh authority
    /// and stores the new journal in place of the old.
    pub(crate) fn load_journal(
        &self,
        journal: Journal,
        td: &TrustDomain,
    ) -> Result<(Journal, HashMap<String, Arc<Authority>>), CaError> {
        let mut authorities = HashMap::new();
        if journal.authorities.is_empty() {
            return Ok((journal, authorities));
        }
        if self.kind == KeyManagerKind::Memory {
            tracing::warn!(
                authorities = journal.authorities.len(),
                "key_manager is `memory`: the previous run's authority keys are gone; \
                 preparing a fresh authority"
            );
            return Ok((fresh(&journal), authorities));
        }
        for record in &journal.authorities {
            // Revoked authorities have no keys any more.
            if !record.state.in_bundle() {
                continue;
            }
            let authority = super::load_saved(&self.dir, &record.id, td)?;
            if !self.fits(&authority) {
                tracing::warn!(
                    authority.id = %record.id,
                    upstream = self.upstream.is_some(),
                    "the stored authorities were not signed the way the configuration asks \
                     (upstream_authority added, removed or changed); preparing a fresh authority"
                );
                return Ok((fresh(&journal), HashMap::new()));
            }
            authorities.insert(record.id.clone(), Arc::new(self.adopt(authority)));
        }
        Ok((journal, authorities))
    }

    /// The CA kept by earlier versions in `cert.pem` and `key.pem`, when
    /// keys are on disk and it fits the configuration.
    pub(crate) fn load_legacy(
        &self,
        td: &TrustDomain,
    ) -> Result<Option<(Authority, u64)>, CaError> {
        if self.kind == KeyManagerKind::Memory {
            return Ok(None);
        }
        Ok(super::load_legacy(&self.dir, td)?
            .filter(|(authority, _)| self.fits(authority))
            .map(|(authority, not_before)| (self.adopt(authority), not_before)))
    }

    /// The trust bundle: the upstream roots when there is an upstream
    /// authority, otherwise the local authorities `certs`.
    pub(crate) fn bundle(
        &self,
        td: &TrustDomain,
        certs: Vec<CertificateDer<'static>>,
    ) -> X509Bundle {
        match &self.upstream {
            Some(upstream) => X509Bundle::new(td.clone(), upstream.roots().to_vec()),
            None => X509Bundle::new(td.clone(), certs),
        }
    }

    /// Whether a stored authority was signed as the configuration asks.
    fn fits(&self, authority: &Authority) -> bool {
        match &self.upstream {
            Some(upstream) => upstream.issued(authority.cert()),
            None => upstream::signed_by(authority.cert(), None),
        }
    }

    fn adopt(&self, authority: Authority) -> Authority {
        match &self.upstream {
            Some(upstream) => upstream.adopt(authority),
            None => authority,
        }
    }
}

/// An empty journal replacing `old`, whose bundle sequence goes on from
/// `old`'s, so that agents take the new bundle for a newer one.
fn fresh(old: &Journal) -> Journal {
    Journal {
        sequence: old.sequence,
        authorities: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use rustls_pki_types::UnixTime;
    use sigil::tls::TrustStore;
    use x509_parser::prelude::{FromDer, X509Certificate};

    use super::*;
    use crate::ca::journal::Event;
    use crate::ca::rotation::Schedule;
    use crate::ca::upstream::DiskUpstreamConfig;
    use crate::clock::Clock;
    use crate::store::{SledStore, Store};

    const CA_TTL: Duration = Duration::from_secs(180);

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    /// Opens the store and the schedule as the server does at start-up.
    async fn schedule(dir: &Path, keys: KeyManager) -> Schedule {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.join("store")).unwrap());
        Schedule::load_with(store, Arc::new(keys), &td(), CA_TTL, Clock::System)
            .await
            .unwrap()
    }

    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                found.extend(files_under(&path));
            } else {
                found.push(path);
            }
        }
        found
    }

    fn signature_oid(der: &[u8]) -> String {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        cert.signature_algorithm.algorithm.to_id_string()
    }

    /// Checks that the active authority signs a leaf whose chain verifies
    /// against the published bundle; returns the chain's length.
    fn leaf_verifies(schedule: &Schedule) -> usize {
        let published = schedule.published().unwrap();
        let key = PrivateKey::generate_p256().unwrap();
        let id: sigil::SpiffeId = "spiffe://example.org/web".parse().unwrap();
        let svid = published
            .active
            .sign_leaf(&key.key_pair().unwrap(), &id, &[], Duration::from_secs(30))
            .unwrap();
        sigil::x509::check_leaf(&svid.chain[0]).unwrap();
        for ca in &svid.chain[1..] {
            sigil::x509::check_ca(ca).unwrap();
        }
        let store = TrustStore::new(&published.bundle).unwrap();
        let got = store
            .verify_svid(
                &svid.chain[0],
                &svid.chain[1..],
                UnixTime::now(),
                webpki::KeyUsage::client_auth(),
            )
            .unwrap();
        assert_eq!(got, id);
        svid.chain.len()
    }

    #[tokio::test]
    async fn memory_keys_are_never_written_and_a_restart_prepares_a_fresh_authority() {
        let dir = tempfile::tempdir().unwrap();
        let memory = || {
            KeyManager::new(
                KeyManagerKind::Memory,
                &dir.path().join("ca"),
                KeyType::EcP384,
                None,
            )
        };
        let first = schedule(dir.path(), memory()).await;
        let published = first.published().unwrap();
        assert_eq!(
            signature_oid(published.active.cert()),
            "1.2.840.10045.4.3.3"
        );
        assert_eq!(leaf_verifies(&first), 1);
        assert!(!dir.path().join("ca").exists());
        let pem: Vec<_> = files_under(dir.path())
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "pem"))
            .collect();
        assert_eq!(pem, Vec::<PathBuf>::new(), "no key or certificate file");
        drop(first);

        // The journal names an authority whose key is gone: a fresh one
        // replaces it, with a newer bundle sequence.
        let second = schedule(dir.path(), memory()).await;
        let again = second.published().unwrap();
        assert_ne!(again.active_id, published.active_id);
        assert_eq!(again.bundle.authorities(), [again.active.cert().clone()]);
        assert!(again.sequence > published.sequence);
        assert_eq!(second.journal().authorities.len(), 1);
        assert_eq!(second.journal().authorities[0].id, again.active_id);
        assert!(!dir.path().join("ca").exists());
    }

    #[tokio::test]
    async fn disk_keys_of_every_type_are_0600_and_survive_a_restart() {
        for key_type in KeyType::ALL {
            let dir = tempfile::tempdir().unwrap();
            let ca_dir = dir.path().join("ca");
            let disk = || KeyManager::new(KeyManagerKind::Disk, &ca_dir, key_type, None);
            let first = schedule(dir.path(), disk()).await;
            let published = first.published().unwrap();
            let id = &published.active_id;
            let key_file = ca_dir.join(format!("{id}.key.pem"));
            let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{key_type}");
            let key = PrivateKey::from_pem(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
            assert_eq!(
                key.key_pair().unwrap().algorithm(),
                key_type.signature_algorithm(),
                "{key_type}"
            );
            assert_eq!(leaf_verifies(&first), 1, "{key_type}");
            drop(first);
            let second = schedule(dir.path(), disk()).await;
            assert_eq!(&second.published().unwrap().active_id, id, "{key_type}");
        }
    }

    /// A CA certificate and key made outside Sigil: `(der, key)`.
    fn outside_ca(
        name: &str,
        lifetime: Duration,
        signer: Option<&(CertificateDer<'static>, KeyPair)>,
    ) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + lifetime).into();
        let cert = match signer {
            None => params.self_signed(&key).unwrap(),
            Some((cert, signer_key)) => {
                let issuer = rcgen::Issuer::from_ca_cert_der(cert, signer_key).unwrap();
                params.signed_by(&key, &issuer).unwrap()
            }
        };
        (cert.der().clone(), key)
    }

    /// Writes the upstream files: the certificates `chain` (signing one
    /// first) and the key.
    fn write_upstream(
        dir: &Path,
        chain: &[&CertificateDer<'static>],
        key: &KeyPair,
    ) -> DiskUpstreamConfig {
        let pem: String = chain
            .iter()
            .map(|c| sigil::bundle::cert_to_pem(c))
            .collect();
        let cert_file_path = dir.join("upstream.pem");
        let key_file_path = dir.join("upstream.key");
        std::fs::write(&cert_file_path, pem).unwrap();
        std::fs::write(&key_file_path, key.serialize_pem()).unwrap();
        DiskUpstreamConfig {
            cert_file_path,
            key_file_path,
            bundle_file_path: None,
        }
    }

    fn with_upstream(dir: &Path, upstream: &DiskUpstreamConfig) -> KeyManager {
        let upstream = Upstream::load(upstream).unwrap();
        KeyManager::new(
            KeyManagerKind::Disk,
            &dir.join("ca"),
            KeyType::EcP256,
            Some(upstream),
        )
    }

    #[tokio::test]
    async fn an_upstream_root_signs_the_authorities_and_is_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        // The root expires before ca_ttl is over: the intermediates stop
        // with it.
        let root = outside_ca("Upstream Root", Duration::from_secs(120), None);
        let config = write_upstream(dir.path(), &[&root.0], &root.1);
        let mut first = schedule(dir.path(), with_upstream(dir.path(), &config)).await;
        let published = first.published().unwrap();
        assert_eq!(
            published.bundle.authorities(),
            std::slice::from_ref(&root.0)
        );
        let active = &published.active;
        sigil::x509::check_ca(active.cert()).unwrap();
        assert!(crate::ca::upstream::signed_by(active.cert(), Some(&root.0)));
        assert_eq!(active.chain(), [active.cert().clone()]);
        assert_eq!(
            signature_oid(active.cert()),
            "1.2.840.10045.4.3.3",
            "signed by the P-384 root"
        );
        let root_not_after = sigil::x509::not_after(&root.0).unwrap();
        assert_eq!(active.not_after(), root_not_after, "capped by the root");
        assert_eq!(leaf_verifies(&first), 2, "leaf and intermediate");

        // Rotation prepares another intermediate; the bundle stays the root.
        first
            .apply(Event::Prepare, SystemTime::now())
            .await
            .unwrap();
        let prepared = first.published().unwrap();
        assert_eq!(first.journal().authorities.len(), 2);
        assert_eq!(prepared.bundle.authorities(), std::slice::from_ref(&root.0));
        drop(first);

        // A restart keeps the intermediates and their chain.
        let second = schedule(dir.path(), with_upstream(dir.path(), &config)).await;
        let again = second.published().unwrap();
        assert_eq!(again.active_id, published.active_id);
        assert_eq!(again.active.chain(), [again.active.cert().clone()]);
        assert_eq!(leaf_verifies(&second), 2);
        drop(second);

        // Without the upstream, intermediates it signed cannot serve: a
        // fresh self-signed authority replaces them.
        let third = schedule(dir.path(), KeyManager::disk(&dir.path().join("ca"))).await;
        let own = third.published().unwrap();
        assert_ne!(own.active_id, published.active_id);
        assert_eq!(own.bundle.authorities(), [own.active.cert().clone()]);
        assert_eq!(leaf_verifies(&third), 1);
    }

    #[tokio::test]
    async fn an_upstream_intermediate_is_handed_out_and_a_bundle_file_names_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let root = outside_ca("Upstream Root", Duration::from_secs(3600), None);
        let middle = outside_ca(
            "Upstream Intermediate",
            Duration::from_secs(3600),
            Some(&root),
        );
        let mut config = write_upstream(dir.path(), &[&middle.0, &root.0], &middle.1);
        let upstream = Upstream::load(&config).unwrap();
        assert_eq!(
            upstream.roots(),
            std::slice::from_ref(&root.0),
            "the top of the cert file"
        );

        // Only the intermediate in the cert file; the root in its own file.
        config = write_upstream(dir.path(), &[&middle.0], &middle.1);
        let bundle_file = dir.path().join("roots.pem");
        std::fs::write(&bundle_file, sigil::bundle::cert_to_pem(&root.0)).unwrap();
        config.bundle_file_path = Some(bundle_file);
        let schedule = schedule(dir.path(), with_upstream(dir.path(), &config)).await;
        let published = schedule.published().unwrap();
        assert_eq!(
            published.bundle.authorities(),
            std::slice::from_ref(&root.0)
        );
        assert_eq!(
            published.active.chain(),
            [published.active.cert().clone(), middle.0.clone()]
        );
        assert_eq!(
            leaf_verifies(&schedule),
            3,
            "leaf, ours, the upstream intermediate"
        );
    }

    #[test]
    fn unusable_upstream_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = outside_ca("Upstream Root", Duration::from_secs(3600), None);
        let other = KeyPair::generate().unwrap();
        let config = write_upstream(dir.path(), &[&root.0], &other);
        let err = Upstream::load(&config).unwrap_err().to_string();
        assert!(
            err.ends_with("upstream.key: does not match the upstream certificate"),
            "{err}"
        );

        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["not-a-ca.example".into()])
            .unwrap()
            .self_signed(&leaf_key)
            .unwrap();
        let config = write_upstream(dir.path(), &[leaf.der()], &leaf_key);
        let err = Upstream::load(&config).unwrap_err().to_string();
        assert!(
            err.contains("upstream.pem: the upstream certificate is not a CA"),
            "{err}"
        );

        // Roots that did not sign the chain's top.
        let stranger = outside_ca("Stranger", Duration::from_secs(3600), None);
        let mut config = write_upstream(dir.path(), &[&root.0], &root.1);
        let roots = dir.path().join("roots.pem");
        std::fs::write(&roots, sigil::bundle::cert_to_pem(&stranger.0)).unwrap();
        config.bundle_file_path = Some(roots);
        let err = Upstream::load(&config).unwrap_err().to_string();
        assert!(
            err.ends_with("roots.pem: no root here signed the top certificate of cert_file_path"),
            "{err}"
        );

        // X5-10: pathLen 0 leaves no room for the local intermediate.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "Tight");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let tight = params.self_signed(&key).unwrap();
        let config = write_upstream(dir.path(), &[tight.der()], &key);
        let err = Upstream::load(&config).unwrap_err().to_string();
        assert!(err.contains("pathLenConstraint 0"), "{err}");
    }
}
