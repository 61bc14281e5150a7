//! The `k8s_psat` node attestor: a projected service account token of the
//! agent's pod, signed by a configured cluster's service account issuer.
//!
//! The token must verify with the cluster's keys (a JWKS file, or the keys
//! found by OIDC discovery of `issuer_url`), name the cluster's issuer
//! (`issuer` with a JWKS file, else `issuer_url`) and the configured
//! audience, be within its validity (small leeway), be bound to a pod, and
//! belong to an allowed service account. Each accepted token is remembered (by its
//! SHA-256, until it expires) with the agent ID it produced, in memory and
//! in the store, so also across restarts: presenting it again for another
//! agent ID is refused, while the same agent may re-attest with it (the
//! agent's pod restarted).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use prost::Message as _;
use sigil::proto::sigil::agent::v1::K8sPsatAttestation;
use sigil::{Selectors, SpiffeId, TrustDomain};
use tokio::time::Instant;
use tonic::Status;

use super::{Attested, oidc, push_selector};
use crate::clock;
use crate::config::{K8sPsatClusterConfig, K8sPsatConfig, K8sPsatKeys};
use crate::store::{Store, StoreError, UsedTokenRecord};

/// The attestor's name.
pub(crate) const NAME: &str = "k8s_psat";

/// Default audience of the tokens.
pub(crate) const DEFAULT_AUDIENCE: &str = "sigil-server";

/// The path under which the agent IDs live.
const AGENT_PATH: &str = "/sigil/agent/k8s_psat";

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 10;

/// Longest token accepted, in bytes.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Shortest time between two fetches of an issuer's keys.
pub(crate) const REFETCH_INTERVAL: Duration = Duration::from_secs(30);

/// The token algorithms accepted.
const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// An accepted token to remember: its SHA-256, the agent it attested, and
/// its expiry.
#[derive(Debug, Clone)]
pub(crate) struct UsedToken {
    digest: [u8; 32],
    agent_id: SpiffeId,
    expires_at: i64,
}

/// The attestor with its clusters.
#[derive(Debug)]
pub(crate) struct K8sPsat {
    td: TrustDomain,
    clusters: BTreeMap<String, Cluster>,
    used: Mutex<HashMap<[u8; 32], (SpiffeId, i64)>>,
    store: Arc<dyn Store>,
}

#[derive(Debug)]
struct Cluster {
    config: K8sPsatClusterConfig,
    keys: Keys,
}

#[derive(Debug)]
enum Keys {
    /// From the configured JWKS file.
    Fixed(JwkSet),
    /// Found by OIDC discovery, fetched again (at most every
    /// [`REFETCH_INTERVAL`]) when a token names an unknown key.
    Discovered {
        issuer: String,
        cache: tokio::sync::Mutex<Discovered>,
    },
}

#[derive(Debug, Default)]
struct Discovered {
    keys: Option<JwkSet>,
    fetched_at: Option<Instant>,
    /// Why the last fetch failed, until one succeeds.
    failure: Option<String>,
}

/// The `kubernetes.io` claim of a service account token.
#[derive(Debug, serde::Deserialize)]
struct KubernetesClaim {
    namespace: Option<String>,
    serviceaccount: Option<ObjectRef>,
    pod: Option<ObjectRef>,
    node: Option<ObjectRef>,
}

#[derive(Debug, serde::Deserialize)]
struct ObjectRef {
    name: String,
    uid: String,
}

#[derive(Debug, serde::Deserialize)]
struct Claims {
    exp: i64,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaim>,
}

fn denied(what: impl std::fmt::Display) -> Status {
    Status::permission_denied(format!("params.data.payload: {what}"))
}

/// SHA-256 of a token.
fn digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    out
}

/// Checks that a JWKS holds only keys tokens can be verified with.
pub(crate) fn check_jwks(jwks: &JwkSet) -> Result<(), String> {
    if jwks.keys.is_empty() {
        return Err("has no key".into());
    }
    for (i, key) in jwks.keys.iter().enumerate() {
        if matches!(
            key.algorithm,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
        ) {
            return Err(format!("keys[{i}]: symmetric keys are not accepted"));
        }
        DecodingKey::from_jwk(key).map_err(|e| format!("keys[{i}]: {e}"))?;
    }
    Ok(())
}

/// Whether a token that expires at `expires_at` is past its validity
/// (leeway included) at `now`.
fn expired(expires_at: i64, now: i64) -> bool {
    expires_at.saturating_add(LEEWAY_SECS as i64) < now
}

impl K8sPsat {
    /// The attestor of `config` in `td`, with the used tokens of `store`;
    /// expired ones are deleted from it.
    pub(crate) async fn load(
        td: TrustDomain,
        config: &K8sPsatConfig,
        store: Arc<dyn Store>,
    ) -> Result<Self, StoreError> {
        let now = clock::now_unix();
        let mut used = HashMap::new();
        let mut stale = Vec::new();
        for (key, record) in store.list_used_tokens().await? {
            match <[u8; 32]>::try_from(key.as_slice()) {
                Ok(digest) if !expired(record.expires_at, now) => {
                    used.insert(digest, (record.agent_id, record.expires_at));
                }
                _ => stale.push(key),
            }
        }
        if !stale.is_empty() {
            store.delete_used_tokens(&stale).await?;
            store.flush().await?;
        }
        tracing::info!(
            used_tokens = used.len(),
            pruned = stale.len(),
            "loaded the used k8s_psat tokens"
        );
        Ok(Self::new(td, config, used, store))
    }

    fn new(
        td: TrustDomain,
        config: &K8sPsatConfig,
        used: HashMap<[u8; 32], (SpiffeId, i64)>,
        store: Arc<dyn Store>,
    ) -> Self {
        let clusters = config
            .clusters
            .iter()
            .map(|(name, c)| {
                let keys = match &c.keys {
                    K8sPsatKeys::Jwks { jwks, .. } => Keys::Fixed(jwks.clone()),
                    K8sPsatKeys::IssuerUrl(url) => Keys::Discovered {
                        issuer: url.clone(),
                        cache: Default::default(),
                    },
                };
                (
                    name.clone(),
                    Cluster {
                        config: c.clone(),
                        keys,
                    },
                )
            })
            .collect();
        Self {
            td,
            clusters,
            used: Mutex::new(used),
            store,
        }
    }

    /// Verifies the token in `payload` and returns what it vouches for.
    pub(crate) async fn attest(&self, payload: &[u8]) -> Result<Attested, Status> {
        let evidence = K8sPsatAttestation::decode(payload).map_err(|e| {
            Status::invalid_argument(format!(
                "params.data.payload: not a K8sPsatAttestation: {e}"
            ))
        })?;
        if evidence.cluster.is_empty() {
            return Err(Status::invalid_argument(
                "params.data.payload: cluster is required",
            ));
        }
        if evidence.token.is_empty() {
            return Err(Status::invalid_argument(
                "params.data.payload: token is required",
            ));
        }
        if evidence.token.len() > MAX_TOKEN_LEN {
            return Err(Status::invalid_argument(format!(
                "params.data.payload: token has more than {MAX_TOKEN_LEN} bytes"
            )));
        }
        let cluster = self.clusters.get(&evidence.cluster).ok_or_else(|| {
            denied(format!(
                "cluster {:?} is not configured on this server",
                evidence.cluster
            ))
        })?;
        let header = jsonwebtoken::decode_header(&evidence.token)
            .map_err(|e| denied(format!("token: malformed: {e}")))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(denied(format!(
                "token: algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let key = cluster.key(header.kid.as_deref()).await?;
        let claims = cluster.verify(&evidence.token, header.alg, &key)?;
        let attested = self.vouch(&evidence.cluster, &cluster.config, &evidence.token, claims)?;
        if let Some(used) = &attested.used_token {
            self.check_unused(used)?;
        }
        Ok(attested)
    }

    fn vouch(
        &self,
        cluster_name: &str,
        cluster: &K8sPsatClusterConfig,
        token: &str,
        claims: Claims,
    ) -> Result<Attested, Status> {
        let k8s = claims.kubernetes.ok_or_else(|| {
            denied("token has no kubernetes.io claim: not a service account token")
        })?;
        let pod = k8s
            .pod
            .ok_or_else(|| denied("token is not bound to a pod"))?;
        let namespace = k8s
            .namespace
            .filter(|n| !n.is_empty())
            .ok_or_else(|| denied("token has no kubernetes.io namespace"))?;
        let account = k8s
            .serviceaccount
            .ok_or_else(|| denied("token has no kubernetes.io serviceaccount"))?;
        let qualified = format!("{namespace}:{}", account.name);
        if !cluster.allowed_service_accounts.contains(&qualified) {
            return Err(denied(format!(
                "service account {qualified} is not allowed in cluster {cluster_name:?}"
            )));
        }
        let uid = k8s.node.as_ref().map_or(&pod.uid, |n| &n.uid);
        let agent_id = self
            .td
            .id_with_path(&format!("{AGENT_PATH}/{cluster_name}/{uid}"))
            .map_err(|e| {
                denied(format!(
                    "the agent ID made from the token is not valid: {e}"
                ))
            })?;
        let mut selectors = Selectors::new();
        push_selector(&mut selectors, NAME, &format!("cluster:{cluster_name}"));
        push_selector(&mut selectors, NAME, &format!("agent_ns:{namespace}"));
        push_selector(&mut selectors, NAME, &format!("agent_sa:{}", account.name));
        push_selector(
            &mut selectors,
            NAME,
            &format!("agent_pod_name:{}", pod.name),
        );
        push_selector(&mut selectors, NAME, &format!("agent_pod_uid:{}", pod.uid));
        if let Some(node) = &k8s.node {
            push_selector(
                &mut selectors,
                NAME,
                &format!("agent_node_name:{}", node.name),
            );
        }
        Ok(Attested {
            agent_id: agent_id.clone(),
            selectors,
            attestor: NAME,
            evidence: format!(
                "k8s.cluster={cluster_name} k8s.pod={namespace}/{} k8s.pod_uid={}",
                pod.name, pod.uid
            ),
            used_token: Some(UsedToken {
                digest: digest(token),
                agent_id,
                expires_at: claims.exp,
            }),
        })
    }

    fn check_unused(&self, token: &UsedToken) -> Result<(), Status> {
        let used = self
            .used
            .lock()
            .map_err(|_| crate::api::internal("checking the token", "lock poisoned"))?;
        match used.get(&token.digest) {
            Some((agent, _)) if *agent != token.agent_id => Err(denied("token already used")),
            _ => Ok(()),
        }
    }

    /// Remembers an accepted token, in memory and in the store (without
    /// flushing: the caller flushes before it answers); refuses it when
    /// another agent ID was attested with it since it was checked. Of
    /// concurrent callers with the same token for different agent IDs,
    /// exactly one succeeds. Expired entries are dropped.
    pub(crate) async fn remember(&self, token: &UsedToken) -> Result<(), Status> {
        let pruned = {
            let mut used = self
                .used
                .lock()
                .map_err(|_| crate::api::internal("recording the token", "lock poisoned"))?;
            let now = clock::now_unix();
            let mut pruned = Vec::new();
            used.retain(|digest, (_, expires_at)| {
                let keep = !expired(*expires_at, now);
                if !keep {
                    pruned.push(digest.to_vec());
                }
                keep
            });
            if used
                .get(&token.digest)
                .is_some_and(|(agent, _)| *agent != token.agent_id)
            {
                return Err(denied("token already used"));
            }
            used.insert(token.digest, (token.agent_id.clone(), token.expires_at));
            pruned
        };
        let record = UsedTokenRecord {
            agent_id: token.agent_id.clone(),
            expires_at: token.expires_at,
        };
        self.store
            .put_used_token(&token.digest, &record)
            .await
            .map_err(|e| crate::api::internal("recording the token", e))?;
        if !pruned.is_empty() {
            self.store
                .delete_used_tokens(&pruned)
                .await
                .map_err(|e| crate::api::internal("forgetting expired tokens", e))?;
        }
        Ok(())
    }

    /// How many tokens are remembered.
    #[cfg(test)]
    pub(crate) fn remembered(&self) -> usize {
        self.used.lock().map(|u| u.len()).unwrap_or(0)
    }
}

impl Cluster {
    /// The key named `kid` (or the only key when the token names none).
    async fn key(&self, kid: Option<&str>) -> Result<Jwk, Status> {
        let unknown = || match kid {
            Some(kid) => denied(format!("token: signing key {kid:?} is unknown")),
            None => denied("token: names no signing key (kid) and the cluster has several"),
        };
        match &self.keys {
            Keys::Fixed(jwks) => find(jwks, kid).ok_or_else(unknown),
            Keys::Discovered { issuer, cache } => {
                let mut cache = cache.lock().await;
                if let Some(key) = cache.keys.as_ref().and_then(|k| find(k, kid)) {
                    return Ok(key);
                }
                let unavailable = |e: &str| {
                    Status::unavailable(format!("cannot get the keys of the cluster's issuer: {e}"))
                };
                if cache
                    .fetched_at
                    .is_some_and(|at| at.elapsed() < REFETCH_INTERVAL)
                {
                    return Err(cache.failure.as_deref().map_or_else(unknown, unavailable));
                }
                cache.fetched_at = Some(Instant::now());
                match oidc::fetch_jwks(issuer).await {
                    Ok(keys) => {
                        tracing::info!(issuer = %issuer, keys = keys.keys.len(), "fetched the service account issuer's keys");
                        cache.keys = Some(keys);
                        cache.failure = None;
                    }
                    Err(e) => {
                        tracing::warn!(issuer = %issuer, error = %e, "cannot get the service account issuer's keys");
                        let status = unavailable(&e);
                        cache.failure = Some(e);
                        return Err(status);
                    }
                }
                cache
                    .keys
                    .as_ref()
                    .and_then(|k| find(k, kid))
                    .ok_or_else(unknown)
            }
        }
    }

    fn verify(&self, token: &str, alg: Algorithm, key: &Jwk) -> Result<Claims, Status> {
        let decoding = DecodingKey::from_jwk(key)
            .map_err(|e| denied(format!("token: the signing key is unusable: {e}")))?;
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_audience(&[&self.config.audience]);
        let issuer = self.config.issuer();
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "aud", "iss"]);
        use jsonwebtoken::errors::ErrorKind;
        jsonwebtoken::decode::<Claims>(token, &decoding, &validation)
            .map(|data| data.claims)
            .map_err(|e| {
                denied(match e.kind() {
                    ErrorKind::InvalidSignature => {
                        "token: the signature does not verify".to_owned()
                    }
                    ErrorKind::ExpiredSignature => "token has expired".to_owned(),
                    ErrorKind::ImmatureSignature => "token is not valid yet (nbf)".to_owned(),
                    ErrorKind::InvalidAudience => {
                        format!("token audience does not include {:?}", self.config.audience)
                    }
                    ErrorKind::InvalidIssuer => {
                        format!("token issuer is not {issuer:?}")
                    }
                    ErrorKind::MissingRequiredClaim(claim) => {
                        format!("token has no {claim:?} claim")
                    }
                    _ => format!("token: {e}"),
                })
            })
    }
}

fn find(jwks: &JwkSet, kid: Option<&str>) -> Option<Jwk> {
    match kid {
        Some(kid) => jwks.find(kid).cloned(),
        None if jwks.keys.len() == 1 => jwks.keys.first().cloned(),
        None => None,
    }
}

#[cfg(test)]
mod tests;
