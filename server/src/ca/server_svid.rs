//! The server's own X.509-SVID (`spiffe://<td>/sigil/server`), presented on
//! the agent API, and its rotation at half of its lifetime and on each
//! change of the signing authority.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use sigil::keys::PrivateKey;
use sigil::tls::{SvidResolver, TrustStore};
use sigil::x509::{Authority, IssueError};
use tokio::time::Instant;

use super::Ca;
use crate::clock;
use crate::shutdown::Shutdown;

/// The shortest wait between two issuances, so a nearly expired CA cannot
/// make the rotation spin.
const MIN_ROTATION_DELAY: Duration = Duration::from_secs(1);

/// How long to wait before retrying a failed issuance.
const RETRY_DELAY: Duration = Duration::from_secs(30);

/// Why the server's SVID could not be issued.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServerSvidError {
    /// Signing failed.
    #[error("issuing the server SVID: {0}")]
    Issue(#[from] IssueError),
    /// The key is unusable.
    #[error("server SVID key: {0}")]
    Key(#[from] sigil::keys::KeyError),
    /// rustls refused the certificate or key.
    #[error("server SVID: {0}")]
    Tls(#[from] sigil::tls::TlsError),
}

/// A signed server SVID.
#[derive(Debug)]
pub(crate) struct ServerSvid {
    /// Leaf first.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// Its key.
    pub(crate) key: PrivateKey,
    /// When it was signed.
    pub(crate) issued_at: SystemTime,
    /// Its notAfter.
    pub(crate) not_after: SystemTime,
}

/// Signs a new server SVID with a new P-256 key, valid for `ttl` (capped by
/// the CA).
pub(crate) fn issue(authority: &Authority, ttl: Duration) -> Result<ServerSvid, ServerSvidError> {
    let key = PrivateKey::generate_p256()?;
    let pair = key.key_pair()?;
    let id = authority.trust_domain().server_id();
    let issued_at = SystemTime::now();
    let svid = authority.sign_leaf(&pair, &id, &[], ttl)?;
    Ok(ServerSvid {
        chain: svid.chain,
        key,
        issued_at,
        not_after: svid.not_after,
    })
}

/// How long to wait from `now` until an SVID issued at `issued_at` and
/// expiring at `not_after` reaches half of its lifetime.
pub(crate) fn renew_in(issued_at: SystemTime, not_after: SystemTime, now: SystemTime) -> Duration {
    let lifetime = not_after.duration_since(issued_at).unwrap_or_default();
    let renew_at = issued_at + lifetime / 2;
    renew_at
        .duration_since(now)
        .unwrap_or_default()
        .max(MIN_ROTATION_DELAY)
}

/// Keeps the server's TLS identity current until `shutdown` turns true:
/// re-issues the server SVID at half of its lifetime (from `current` on,
/// signed by authority `signed_by`) and as soon as another authority
/// becomes the signing one, and puts every new bundle in `trust`, the
/// store that verifies agents' certificates.
pub(crate) async fn rotate(
    ca: Arc<Ca>,
    resolver: Arc<SvidResolver>,
    trust: Arc<TrustStore>,
    ttl: Duration,
    current: ServerSvid,
    signed_by: String,
    mut shutdown: Shutdown,
) {
    let mut changes = ca.subscribe();
    changes.borrow_and_update();
    let mut signed_by = signed_by;
    let mut due =
        Instant::now() + renew_in(current.issued_at, current.not_after, SystemTime::now());
    // The first pass picks up anything published since `current` was issued.
    let mut check_ca = true;
    loop {
        if !check_ca {
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    check_ca = true;
                }
                () = shutdown.wait() => return,
            }
        }
        let published = ca.current();
        if check_ca {
            check_ca = false;
            if let Err(e) = trust.replace(&published.bundle) {
                tracing::warn!(error = %e, "cannot use the new bundle to verify agents");
            }
            if published.active_id == signed_by && Instant::now() < due {
                continue;
            }
        }
        let renewed = issue(&published.active, ttl).and_then(|svid| {
            resolver.replace(svid.chain.clone(), &svid.key)?;
            Ok(svid)
        });
        let delay = match renewed {
            Ok(svid) => {
                signed_by.clone_from(&published.active_id);
                tracing::debug!(
                    authority.id = %published.active_id,
                    expires_at = %clock::rfc3339(clock::to_unix(svid.not_after)),
                    "rotated the server SVID"
                );
                renew_in(svid.issued_at, svid.not_after, SystemTime::now())
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot rotate the server SVID; will retry");
                RETRY_DELAY
            }
        };
        due = Instant::now() + delay;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Published;

    #[test]
    fn the_server_svid_has_the_server_id_and_is_capped_by_the_ca() {
        let td = sigil::TrustDomain::new("example.org").unwrap();
        let ca = Authority::self_signed(&td, Duration::from_secs(600)).unwrap();
        let svid = issue(&ca, Duration::from_secs(3600)).unwrap();
        let id = sigil::x509::check_leaf(&svid.chain[0]).unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/sigil/server");
        assert!(svid.not_after <= ca.not_after());
    }

    #[test]
    fn renewal_is_due_at_half_life() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = t0 + Duration::from_secs(3600);
        assert_eq!(renew_in(t0, end, t0), Duration::from_secs(1800));
        assert_eq!(
            renew_in(t0, end, t0 + Duration::from_secs(1000)),
            Duration::from_secs(800)
        );
        assert_eq!(renew_in(t0, end, end), MIN_ROTATION_DELAY);
    }

    fn current_cert(resolver: &SvidResolver) -> CertificateDer<'static> {
        let key = rustls::client::ResolvesClientCert::resolve(resolver, &[], &[]).unwrap();
        key.cert[0].clone()
    }

    fn authority_key_id(cert: &[u8]) -> Option<String> {
        use x509_parser::prelude::FromDer;
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert).unwrap();
        parsed
            .extensions()
            .iter()
            .find_map(|ext| match ext.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => aki
                    .key_identifier
                    .as_ref()
                    .map(|k| k.0.iter().map(|b| format!("{b:02x}")).collect()),
                _ => None,
            })
    }

    fn published(id: &str, authority: Arc<Authority>, sequence: u64) -> Published {
        Published {
            active_id: id.into(),
            bundle: sigil::bundle::X509Bundle::new(
                authority.trust_domain().clone(),
                vec![authority.cert().clone()],
            ),
            active: authority,
            sequence,
            tainted: Vec::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rotation_replaces_the_certificate_and_stops_on_shutdown() {
        let td = sigil::TrustDomain::new("example.org").unwrap();
        let authority = Arc::new(Authority::self_signed(&td, Duration::from_secs(3600)).unwrap());
        let ca = Arc::new(Ca::new(
            published("a", Arc::clone(&authority), 1),
            Duration::from_secs(600),
        ));
        let first = issue(&authority, Duration::from_secs(4)).unwrap();
        let resolver = Arc::new(SvidResolver::new(first.chain.clone(), &first.key).unwrap());
        let trust = Arc::new(TrustStore::new(&ca.current().bundle).unwrap());
        let (stop, shutdown) = crate::shutdown::channel();
        let task = tokio::spawn(rotate(
            Arc::clone(&ca),
            Arc::clone(&resolver),
            trust,
            Duration::from_secs(4),
            first,
            "a".into(),
            shutdown,
        ));
        // Paused time advances only while every task waits, so the task
        // has slept through its first delay once this returns.
        let before = current_cert(&resolver);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_ne!(current_cert(&resolver), before);
        stop.fire();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_signing_authority_reissues_the_server_svid_at_once() {
        let td = sigil::TrustDomain::new("example.org").unwrap();
        let old = Arc::new(Authority::self_signed(&td, Duration::from_secs(3600)).unwrap());
        let new = Arc::new(Authority::self_signed(&td, Duration::from_secs(3600)).unwrap());
        let ca = Arc::new(Ca::new(
            published("old", Arc::clone(&old), 1),
            Duration::from_secs(600),
        ));
        let first = issue(&old, Duration::from_secs(600)).unwrap();
        let resolver = Arc::new(SvidResolver::new(first.chain.clone(), &first.key).unwrap());
        let trust = Arc::new(TrustStore::new(&ca.current().bundle).unwrap());
        let (stop, shutdown) = crate::shutdown::channel();
        let task = tokio::spawn(rotate(
            Arc::clone(&ca),
            Arc::clone(&resolver),
            trust,
            Duration::from_secs(600),
            first,
            "old".into(),
            shutdown,
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut both = published("new", Arc::clone(&new), 2);
        both.bundle = sigil::bundle::X509Bundle::new(
            td.clone(),
            vec![old.cert().clone(), new.cert().clone()],
        );
        ca.publish(both);
        // Well before the half-life (300 s) of the current SVID.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let leaf = current_cert(&resolver);
        assert_eq!(
            authority_key_id(&leaf),
            crate::ca::authority_id(new.cert()),
            "signed by the new authority"
        );
        let id = sigil::x509::check_leaf(&leaf).unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/sigil/server");
        stop.fire();
        task.await.unwrap();
    }
}
