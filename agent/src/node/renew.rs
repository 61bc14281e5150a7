//! Renewal of the agent SVID (`AgentApi/RenewAgent`) at half of its lifetime.
//!
//! Each renewal uses a new key. The new SVID is stored, then presented on a
//! new connection, which every later call uses. Failures are retried with
//! backoff until the SVID expires; a refusal by the server (the agent was
//! evicted) is final, except a ban, which is retried like a failure.
//!
//! An agent whose node attestor can attest again by itself (x509pop,
//! k8s_psat; see [`Reattestation`]) does so instead of stopping when the
//! server refuses its SVID or the SVID expired, retrying with exponential
//! backoff (1 s to 60 s, with jitter) until the server accepts it again
//! (e.g. once a ban is lifted).
//!
//! Another task that sees the server refuse the agent SVID asks for a
//! renewal at once (at most every [`FORCED_RENEWAL_INTERVAL`]): either the
//! server still accepts the agent and the new SVID fixes the refusal, or it
//! refuses the renewal too, which ends the agent.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use sigil::keys::PrivateKey;
use sigil::proto::sigil::agent::v1::RenewAgentRequest;
use sigil::tls::{SvidResolver, TrustStore};
use tokio::sync::Notify;
use tokio::time::Instant;

use sigil::TrustDomain;

use super::{Evidence, NodeAttestorConfig, NodeError, NodeIdentity, Storage, attest};
use crate::client::{self, AgentChannel};
use crate::retry::{Backoff, RepeatedErrors, Report};

/// First delay between two re-attestation attempts.
pub(crate) const REATTEST_BACKOFF_MIN: Duration = Duration::from_secs(1);

/// Longest delay between two re-attestation attempts.
pub(crate) const REATTEST_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The shortest time between two renewals asked for by other tasks.
pub(crate) const FORCED_RENEWAL_INTERVAL: Duration = Duration::from_secs(30);

/// Keeps the agent SVID renewed.
#[derive(Debug)]
pub(crate) struct Renewer {
    channel: Arc<AgentChannel>,
    storage: Storage,
    trust: Arc<TrustStore>,
    resolver: Arc<SvidResolver>,
    current: NodeIdentity,
    renew_now: Arc<Notify>,
    last_renewal: Option<Instant>,
    reattestation: Option<Reattestation>,
}

/// What an agent needs to attest again by itself.
#[derive(Debug, Clone)]
pub(crate) struct Reattestation {
    /// The server's agent API.
    pub(crate) address: String,
    /// The trust domain.
    pub(crate) td: TrustDomain,
    /// The node attestor, whose evidence is read again at each attempt.
    pub(crate) attestor: NodeAttestorConfig,
}

/// One failed renewal.
enum Failure {
    /// The server refuses the agent: retrying cannot help.
    Refused(String),
    /// Anything else: retry.
    Retry(String),
}

impl Renewer {
    /// A renewer of `current`, which `resolver` presents on `channel`.
    /// `renew_now` asks for a renewal before the half-life.
    pub(crate) fn new(
        channel: Arc<AgentChannel>,
        storage: Storage,
        trust: Arc<TrustStore>,
        resolver: Arc<SvidResolver>,
        current: NodeIdentity,
        renew_now: Arc<Notify>,
    ) -> Self {
        Self {
            channel,
            storage,
            trust,
            resolver,
            current,
            renew_now,
            last_renewal: None,
            reattestation: None,
        }
    }

    /// Attests again with `reattestation` when the server refuses the SVID
    /// or it expired, instead of stopping.
    pub(crate) fn with_reattestation(mut self, reattestation: Option<Reattestation>) -> Self {
        self.reattestation = reattestation;
        self
    }

    /// Renews the SVID at each half-life, forever; returns only on a fatal
    /// error.
    pub(crate) async fn run(mut self) -> NodeError {
        loop {
            let due = half_life(self.current.not_before, self.current.not_after);
            let wait = due
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tracing::debug!(
                spiffe.id = %self.current.spiffe_id,
                at = %humantime::format_rfc3339_seconds(due),
                "agent SVID renewal scheduled"
            );
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.renew_now.notified() => {
                    if self
                        .last_renewal
                        .is_some_and(|at| at.elapsed() < FORCED_RENEWAL_INTERVAL)
                    {
                        continue;
                    }
                    tracing::info!(
                        spiffe.id = %self.current.spiffe_id,
                        "agent SVID renewal requested; renewing it now"
                    );
                }
            }
            if let Err(e) = self.renew_until_expiry().await {
                return e;
            }
        }
    }

    async fn renew_until_expiry(&mut self) -> Result<(), NodeError> {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut repeated = RepeatedErrors::default();
        loop {
            match self.renew_once().await {
                Ok(identity) => {
                    tracing::info!(
                        spiffe.id = %identity.spiffe_id,
                        expires = %humantime::format_rfc3339_seconds(identity.not_after),
                        "agent SVID renewed"
                    );
                    self.current = identity;
                    self.last_renewal = Some(Instant::now());
                    self.channel.reconnect();
                    return Ok(());
                }
                Err(Failure::Refused(reason)) => {
                    if let Err(e) = self.storage.remove_svid() {
                        tracing::warn!(error = %e, "cannot remove the refused agent SVID");
                    }
                    if self.reattestation.is_some() {
                        return self.reattest(&reason).await;
                    }
                    tracing::error!(
                        reason = %reason,
                        "the server refused the agent SVID; a new join token is needed to attest again"
                    );
                    return Err(NodeError::Refused { reason });
                }
                Err(Failure::Retry(error)) => {
                    let left = self
                        .current
                        .not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO);
                    if left.is_zero() {
                        if self.reattestation.is_some() {
                            return self
                                .reattest(&format!("the agent SVID expired; last error: {error}"))
                                .await;
                        }
                        tracing::error!(
                            last_error = %error,
                            "the agent SVID expired before it could be renewed; a new join token is needed to attest again"
                        );
                        return Err(NodeError::Expired { last_error: error });
                    }
                    let delay = backoff.next_delay().min(left);
                    match repeated.observe(&error) {
                        Report::Warn => tracing::warn!(
                            error = %error,
                            retry_in = ?delay,
                            "agent SVID renewal failed; retrying"
                        ),
                        Report::Quiet(n) => tracing::debug!(
                            error = %error,
                            retry_in = ?delay,
                            repeated = n,
                            "agent SVID renewal failed; retrying"
                        ),
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Attests again until the server accepts the agent, with backoff.
    async fn reattest(&mut self, reason: &str) -> Result<(), NodeError> {
        let Some(reattestation) = self.reattestation.clone() else {
            return Err(NodeError::Refused {
                reason: reason.to_owned(),
            });
        };
        tracing::warn!(
            spiffe.id = %self.current.spiffe_id,
            reason = %reason,
            attestor = reattestation.attestor.name(),
            "the server no longer accepts the agent SVID; attesting again"
        );
        let mut backoff = Backoff::new(REATTEST_BACKOFF_MIN, REATTEST_BACKOFF_MAX);
        let mut repeated = RepeatedErrors::default();
        loop {
            match self.attest_once(&reattestation).await {
                Ok(identity) => {
                    if let Err(e) = self.storage.save(&identity) {
                        tracing::warn!(error = %e, "cannot store the new agent SVID");
                    }
                    if let Err(e) = self.trust.replace(&identity.bundle) {
                        tracing::warn!(error = %e, "cannot use the bundle of the new agent SVID");
                    }
                    self.resolver
                        .replace(identity.chain.clone(), &identity.key)
                        .map_err(|e| NodeError::Crypto(e.to_string()))?;
                    tracing::info!(
                        spiffe.id = %identity.spiffe_id,
                        attestor = reattestation.attestor.name(),
                        expires = %humantime::format_rfc3339_seconds(identity.not_after),
                        "attested to the server again"
                    );
                    self.current = identity;
                    self.last_renewal = Some(Instant::now());
                    self.channel.reconnect();
                    return Ok(());
                }
                Err(error) => {
                    let error = error.to_string();
                    let delay = jitter(backoff.next_delay());
                    match repeated.observe(&error) {
                        Report::Warn => tracing::warn!(
                            error = %error,
                            retry_in = ?delay,
                            "attesting again failed; retrying"
                        ),
                        Report::Quiet(n) => tracing::debug!(
                            error = %error,
                            retry_in = ?delay,
                            repeated = n,
                            "attesting again failed; retrying"
                        ),
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn attest_once(&self, reattestation: &Reattestation) -> Result<NodeIdentity, NodeError> {
        let evidence = Evidence::read(&reattestation.attestor)?;
        attest(
            &reattestation.address,
            &reattestation.td,
            Arc::clone(&self.trust),
            &evidence,
        )
        .await
    }

    async fn renew_once(&mut self) -> Result<NodeIdentity, Failure> {
        let key = PrivateKey::generate_p256().map_err(|e| Failure::Retry(e.to_string()))?;
        let pair = key.key_pair().map_err(|e| Failure::Retry(e.to_string()))?;
        let csr = sigil::x509::build_csr(&pair, None).map_err(|e| Failure::Retry(e.to_string()))?;
        let mut request = tonic::Request::new(RenewAgentRequest { csr });
        request.set_timeout(client::CALL_TIMEOUT);
        let answer = self
            .channel
            .api()
            .renew_agent(request)
            .await
            .map_err(|status| {
                if is_banned(&status) {
                    Failure::Retry(format!(
                        "{}; workloads keep their current SVIDs until they expire, and renewal resumes when the agent is unbanned",
                        status.message()
                    ))
                } else if is_refusal(&status) {
                    Failure::Refused(status.message().to_owned())
                } else {
                    Failure::Retry(client::describe_status(&status))
                }
            })?
            .into_inner();
        let svid = answer
            .svid
            .ok_or_else(|| Failure::Retry("the answer has no SVID".into()))?;
        let chain: Vec<CertificateDer<'static>> = svid
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let identity = self.check(chain, key).map_err(Failure::Retry)?;
        self.storage
            .save_svid(&identity.chain, &identity.key)
            .map_err(|e| Failure::Retry(e.to_string()))?;
        self.resolver
            .replace(identity.chain.clone(), &identity.key)
            .map_err(|e| Failure::Retry(e.to_string()))?;
        Ok(identity)
    }

    /// Checks a renewed SVID: a valid leaf for the same SPIFFE ID, for `key`,
    /// chained to the current trust store.
    fn check(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKey,
    ) -> Result<NodeIdentity, String> {
        let leaf = chain.first().ok_or("the renewed SVID chain is empty")?;
        let id = sigil::x509::check_leaf(leaf).map_err(|e| format!("renewed SVID: {e}"))?;
        if id != self.current.spiffe_id {
            return Err(format!(
                "renewed SVID is for {id}, expected {}",
                self.current.spiffe_id
            ));
        }
        crate::certs::check_key_matches(leaf, &key).map_err(|e| format!("renewed SVID: {e}"))?;
        let (not_before, not_after) =
            crate::certs::validity(leaf).map_err(|e| format!("renewed SVID: {e}"))?;
        self.trust
            .verify_svid(
                leaf,
                &chain[1..],
                rustls_pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
            )
            .map_err(|e| format!("renewed SVID does not chain to the bundle: {e}"))?;
        Ok(NodeIdentity {
            spiffe_id: id,
            chain,
            key,
            bundle: self.current.bundle.clone(),
            not_before,
            not_after,
        })
    }
}

/// Whether the server refuses the agent itself, rather than failing.
pub(crate) fn is_refusal(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
    ) && !client::is_transport_failure(status)
}

/// Metadata key the server sets when it refuses a banned agent.
const BANNED_METADATA: &str = "sigil-agent-banned";

/// Whether the server refuses the agent because it is banned: unlike an
/// eviction, a ban can be lifted, so the agent keeps its SVID and retries.
fn is_banned(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::PermissionDenied
        && status.metadata().get(BANNED_METADATA).is_some()
}

/// `delay` scaled by a random factor from 0.75 to 1.25, at most
/// [`REATTEST_BACKOFF_MAX`].
fn jitter(delay: Duration) -> Duration {
    delay
        .mul_f64(0.75 + fastrand::f64() / 2.0)
        .min(REATTEST_BACKOFF_MAX)
}

/// Half-way between signing (`not_before` plus the server's back-dating)
/// and `not_after`.
fn half_life(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    // The server back-dates notBefore; the lifetime runs from signing.
    let issued = (not_before + sigil::x509::BACKDATE).min(not_after);
    let lifetime = not_after.duration_since(issued).unwrap_or(Duration::ZERO);
    issued + lifetime / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ban_is_retried_and_an_eviction_is_final() {
        let mut banned = tonic::Status::permission_denied("agent spiffe://td/a is banned");
        banned.metadata_mut().insert(
            BANNED_METADATA,
            tonic::metadata::MetadataValue::from_static("true"),
        );
        assert!(is_banned(&banned));
        let evicted = tonic::Status::permission_denied("agent spiffe://td/a is not attested");
        assert!(!is_banned(&evicted) && is_refusal(&evicted));
    }

    #[test]
    fn reattestation_delays_are_jittered_and_capped() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(8));
            assert!(
                (Duration::from_secs(6)..=Duration::from_secs(10)).contains(&d),
                "{d:?}"
            );
            assert!(jitter(REATTEST_BACKOFF_MAX) <= REATTEST_BACKOFF_MAX);
        }
    }

    #[test]
    fn renewal_is_due_at_half_life() {
        let signed = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let nb = signed - sigil::x509::BACKDATE;
        let na = signed + Duration::from_secs(3600);
        assert_eq!(half_life(nb, na), signed + Duration::from_secs(1800));
        // A 20 s SVID is renewed 10 s after signing.
        let short = signed + Duration::from_secs(20);
        assert_eq!(half_life(nb, short), signed + Duration::from_secs(10));
        assert_eq!(half_life(na, nb), nb);
    }
}
