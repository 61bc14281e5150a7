//! The server's own X.509-SVID (`spiffe://<td>/sigil/server`), presented on
//! the agent API, and its rotation at half of its lifetime.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use sigil::keys::PrivateKey;
use sigil::tls::SvidResolver;
use sigil::x509::{Authority, IssueError};

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

/// Re-issues the server SVID at half of its lifetime, from `current` on,
/// until `shutdown` turns true.
pub(crate) async fn rotate(
    authority: Arc<Authority>,
    resolver: Arc<SvidResolver>,
    ttl: Duration,
    current: ServerSvid,
    mut shutdown: Shutdown,
) {
    let mut delay = renew_in(current.issued_at, current.not_after, SystemTime::now());
    loop {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.wait() => return,
        }
        let renewed = issue(&authority, ttl).and_then(|svid| {
            resolver.replace(svid.chain.clone(), &svid.key)?;
            Ok(svid)
        });
        delay = match renewed {
            Ok(svid) => {
                tracing::debug!(
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test(start_paused = true)]
    async fn rotation_replaces_the_certificate_and_stops_on_shutdown() {
        let td = sigil::TrustDomain::new("example.org").unwrap();
        let ca = Arc::new(Authority::self_signed(&td, Duration::from_secs(3600)).unwrap());
        let first = issue(&ca, Duration::from_secs(4)).unwrap();
        let resolver = Arc::new(SvidResolver::new(first.chain.clone(), &first.key).unwrap());
        let (stop, shutdown) = crate::shutdown::channel();
        let task = tokio::spawn(rotate(
            Arc::clone(&ca),
            Arc::clone(&resolver),
            Duration::from_secs(4),
            first,
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
}
