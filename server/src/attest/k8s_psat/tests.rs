//! Tests of the k8s_psat attestor: token verification, what it vouches
//! for, replay, and keys found by OIDC discovery.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex as StdMutex};

use sigil::TrustDomain;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::attest::testing::{TokenIssuer, now, psat_claims};

const ISSUER: &str = "https://k8s.test";

fn cluster(issuer: &TokenIssuer) -> K8sPsatClusterConfig {
    K8sPsatClusterConfig {
        audience: DEFAULT_AUDIENCE.into(),
        keys: K8sPsatKeys::Jwks {
            path: "jwks.json".into(),
            jwks: serde_json::from_str(&issuer.jwks()).unwrap(),
            issuer: ISSUER.into(),
        },
        allowed_service_accounts: BTreeSet::from(["sigil:sigil-agent".to_owned()]),
    }
}

fn config(clusters: &[(&str, K8sPsatClusterConfig)]) -> K8sPsatConfig {
    K8sPsatConfig {
        clusters: clusters
            .iter()
            .map(|(n, c)| ((*n).to_owned(), c.clone()))
            .collect(),
    }
}

/// An attestor whose used tokens live in a temporary store.
fn attestor(clusters: &[(&str, K8sPsatClusterConfig)]) -> K8sPsat {
    let store = crate::store::SledStore::temporary().unwrap();
    K8sPsat::new(
        TrustDomain::new("example.org").unwrap(),
        &config(clusters),
        HashMap::new(),
        Arc::new(store),
    )
}

/// An attestor over the used tokens stored in `dir`.
async fn attestor_in(
    dir: &std::path::Path,
    clusters: &[(&str, K8sPsatClusterConfig)],
) -> (K8sPsat, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(crate::store::SledStore::open(dir).unwrap());
    let psat = K8sPsat::load(
        TrustDomain::new("example.org").unwrap(),
        &config(clusters),
        Arc::clone(&store),
    )
    .await
    .unwrap();
    (psat, store)
}

fn payload(cluster: &str, token: &str) -> Vec<u8> {
    K8sPsatAttestation {
        cluster: cluster.into(),
        token: token.into(),
    }
    .encode_to_vec()
}

async fn refused(psat: &K8sPsat, cluster: &str, token: &str) -> Status {
    psat.attest(&payload(cluster, token)).await.unwrap_err()
}

fn assert_denied(status: &Status, message: &str) {
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::PermissionDenied, message)
    );
}

#[tokio::test]
async fn a_pod_bound_token_attests_the_node() {
    let issuer = TokenIssuer::new("k1");
    let psat = attestor(&[("prod", cluster(&issuer))]);
    let token = issuer.sign(&psat_claims(
        ISSUER,
        "sigil-server",
        "agent-x1",
        "node-uid-1",
    ));
    let attested = psat.attest(&payload("prod", &token)).await.unwrap();
    assert_eq!(
        attested.agent_id.as_str(),
        "spiffe://example.org/sigil/agent/k8s_psat/prod/node-uid-1"
    );
    assert_eq!(attested.attestor, "k8s_psat");
    let selectors: Vec<String> = attested.selectors.iter().map(ToString::to_string).collect();
    assert_eq!(
        selectors,
        [
            "k8s_psat:agent_node_name:node-1",
            "k8s_psat:agent_ns:sigil",
            "k8s_psat:agent_pod_name:agent-x1",
            "k8s_psat:agent_pod_uid:agent-x1-uid",
            "k8s_psat:agent_sa:sigil-agent",
            "k8s_psat:cluster:prod",
        ]
    );
    assert!(!attested.evidence.contains(&token));

    // Without a node in the token, the pod's UID names the agent.
    let mut claims = psat_claims(ISSUER, "sigil-server", "agent-x2", "unused");
    claims["kubernetes.io"]
        .as_object_mut()
        .unwrap()
        .remove("node");
    let attested = psat
        .attest(&payload("prod", &issuer.sign(&claims)))
        .await
        .unwrap();
    assert_eq!(
        attested.agent_id.as_str(),
        "spiffe://example.org/sigil/agent/k8s_psat/prod/agent-x2-uid"
    );
}

#[tokio::test]
async fn tokens_that_fail_a_check_are_refused() {
    let issuer = TokenIssuer::new("k1");
    let psat = attestor(&[("prod", cluster(&issuer))]);
    let good = || psat_claims(ISSUER, "sigil-server", "agent-x1", "node-uid-1");

    let token = issuer.sign(&psat_claims(ISSUER, "vault", "agent-x1", "node-uid-1"));
    assert_denied(
        &refused(&psat, "prod", &token).await,
        "params.data.payload: token audience does not include \"sigil-server\"",
    );

    let mut claims = good();
    claims["exp"] = (now() - 3600).into();
    assert_denied(
        &refused(&psat, "prod", &issuer.sign(&claims)).await,
        "params.data.payload: token has expired",
    );

    let mut claims = good();
    claims["nbf"] = (now() + 3600).into();
    assert_denied(
        &refused(&psat, "prod", &issuer.sign(&claims)).await,
        "params.data.payload: token is not valid yet (nbf)",
    );

    let stranger = TokenIssuer::new("k9");
    assert_denied(
        &refused(&psat, "prod", &stranger.sign(&good())).await,
        "params.data.payload: token: signing key \"k9\" is unknown",
    );

    // Same key ID, another key: the signature does not verify.
    let forger = TokenIssuer::new("k1");
    assert_denied(
        &refused(&psat, "prod", &forger.sign(&good())).await,
        "params.data.payload: token: the signature does not verify",
    );

    let mut claims = good();
    claims["kubernetes.io"]
        .as_object_mut()
        .unwrap()
        .remove("pod");
    assert_denied(
        &refused(&psat, "prod", &issuer.sign(&claims)).await,
        "params.data.payload: token is not bound to a pod",
    );

    let mut claims = good();
    claims["kubernetes.io"]["serviceaccount"]["name"] = "default".into();
    assert_denied(
        &refused(&psat, "prod", &issuer.sign(&claims)).await,
        "params.data.payload: service account sigil:default is not allowed in cluster \"prod\"",
    );

    assert_denied(
        &refused(&psat, "staging", &issuer.sign(&good())).await,
        "params.data.payload: cluster \"staging\" is not configured on this server",
    );
    assert_denied(
        &refused(&psat, "prod", "not.a.jwt").await,
        "params.data.payload: token: malformed: Base64 error: Invalid last symbol 116, offset 2.",
    );
    let status = psat.attest(&payload("prod", "")).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            tonic::Code::InvalidArgument,
            "params.data.payload: token is required"
        )
    );
}

/// Refusals of tokens naming another issuer than `expected`, or none.
async fn assert_unknown_issuers_refused(psat: &K8sPsat, issuer: &TokenIssuer, expected: &str) {
    let claims = |iss: &str| psat_claims(iss, "sigil-server", "agent-x1", "node-uid-1");
    let refusal = format!("params.data.payload: token issuer is not {expected:?}");
    for other in ["https://elsewhere.test", &format!("{expected}/"), ""] {
        assert_denied(
            &refused(psat, "prod", &issuer.sign(&claims(other))).await,
            &refusal,
        );
    }
    let mut without = claims(expected);
    without.as_object_mut().unwrap().remove("iss");
    assert_denied(
        &refused(psat, "prod", &issuer.sign(&without)).await,
        "params.data.payload: token has no \"iss\" claim",
    );
    // The same token naming the cluster's issuer is accepted.
    psat.attest(&payload("prod", &issuer.sign(&claims(expected))))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_token_from_an_unknown_issuer_is_refused() {
    // With a JWKS file, the configured issuer.
    let issuer = TokenIssuer::new("k1");
    let psat = attestor(&[("prod", cluster(&issuer))]);
    assert_unknown_issuers_refused(&psat, &issuer, ISSUER).await;

    // With OIDC discovery, the issuer URL.
    let oidc = FakeIssuer::start(issuer.jwks()).await;
    let psat = discovering(&issuer, &oidc);
    assert_unknown_issuers_refused(&psat, &issuer, &oidc.url).await;
}

#[tokio::test]
async fn a_token_attests_one_agent_only() {
    let issuer = TokenIssuer::new("k1");
    // Two clusters sharing an issuer: the same token would name two agents.
    let psat = attestor(&[("east", cluster(&issuer)), ("west", cluster(&issuer))]);
    let token = issuer.sign(&psat_claims(
        ISSUER,
        "sigil-server",
        "agent-x1",
        "node-uid-1",
    ));
    let first = psat.attest(&payload("east", &token)).await.unwrap();
    psat.remember(first.used_token.as_ref().unwrap())
        .await
        .unwrap();
    assert_eq!(psat.remembered(), 1);

    // The same agent may attest again with it (its pod restarted).
    let again = psat.attest(&payload("east", &token)).await.unwrap();
    assert_eq!(again.agent_id, first.agent_id);
    psat.remember(again.used_token.as_ref().unwrap())
        .await
        .unwrap();

    assert_denied(
        &refused(&psat, "west", &token).await,
        "params.data.payload: token already used",
    );
    // The final check under the agent lock refuses a race the same way.
    let mut raced = first.used_token.clone().unwrap();
    raced.agent_id = "spiffe://example.org/sigil/agent/k8s_psat/west/node-uid-1"
        .parse()
        .unwrap();
    assert_denied(
        &psat.remember(&raced).await.unwrap_err(),
        "params.data.payload: token already used",
    );
}

#[tokio::test]
async fn expired_tokens_are_forgotten() {
    let issuer = TokenIssuer::new("k1");
    let psat = attestor(&[("prod", cluster(&issuer))]);
    let old = UsedToken {
        digest: [7; 32],
        agent_id: "spiffe://example.org/a".parse().unwrap(),
        expires_at: now() - 3600,
    };
    psat.remember(&old).await.unwrap();
    let token = issuer.sign(&psat_claims(
        ISSUER,
        "sigil-server",
        "agent-x1",
        "node-uid-1",
    ));
    let fresh = psat.attest(&payload("prod", &token)).await.unwrap();
    psat.remember(fresh.used_token.as_ref().unwrap())
        .await
        .unwrap();
    assert_eq!(psat.remembered(), 1, "the expired entry was pruned");
}

#[tokio::test]
async fn a_used_token_stays_bound_to_its_agent_across_a_restart() {
    let issuer = TokenIssuer::new("k1");
    let clusters = [("east", cluster(&issuer)), ("west", cluster(&issuer))];
    let dir = tempfile::tempdir().unwrap();
    let token = issuer.sign(&psat_claims(
        ISSUER,
        "sigil-server",
        "agent-x1",
        "node-uid-1",
    ));
    let first_agent = {
        let (psat, store) = attestor_in(dir.path(), &clusters).await;
        let first = psat.attest(&payload("east", &token)).await.unwrap();
        psat.remember(first.used_token.as_ref().unwrap())
            .await
            .unwrap();
        store.flush().await.unwrap();
        first.agent_id
    };

    let (psat, _store) = attestor_in(dir.path(), &clusters).await;
    assert_eq!(psat.remembered(), 1);
    assert_denied(
        &refused(&psat, "west", &token).await,
        "params.data.payload: token already used",
    );
    let again = psat.attest(&payload("east", &token)).await.unwrap();
    assert_eq!(again.agent_id, first_agent, "its own agent may re-attest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_remembers_of_one_token_for_two_agents_admit_one() {
    let issuer = TokenIssuer::new("k1");
    let psat = Arc::new(attestor(&[("prod", cluster(&issuer))]));
    for round in 0..20u8 {
        let tasks: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|agent| {
                let psat = Arc::clone(&psat);
                let token = UsedToken {
                    digest: [round; 32],
                    agent_id: format!("spiffe://example.org/{agent}").parse().unwrap(),
                    expires_at: now() + 3600,
                };
                tokio::spawn(async move { psat.remember(&token).await })
            })
            .collect();
        let mut admitted = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(()) => admitted += 1,
                Err(status) => {
                    assert_denied(&status, "params.data.payload: token already used");
                }
            }
        }
        assert_eq!(admitted, 1, "round {round}");
    }
}

#[tokio::test]
async fn expired_tokens_are_pruned_from_the_store_at_load() {
    let issuer = TokenIssuer::new("k1");
    let clusters = [("prod", cluster(&issuer))];
    let dir = tempfile::tempdir().unwrap();
    let record = |expires_at| UsedTokenRecord {
        agent_id: "spiffe://example.org/a".parse().unwrap(),
        expires_at,
    };
    {
        let store = crate::store::SledStore::open(dir.path()).unwrap();
        store
            .put_used_token(&[1; 32], &record(now() - 3600))
            .await
            .unwrap();
        store
            .put_used_token(&[2; 32], &record(now() + 3600))
            .await
            .unwrap();
        store.flush().await.unwrap();
    }
    let (psat, store) = attestor_in(dir.path(), &clusters).await;
    assert_eq!(psat.remembered(), 1);
    assert_eq!(
        store.list_used_tokens().await.unwrap(),
        [(vec![2; 32], record(now() + 3600))]
    );
}

#[tokio::test]
async fn expired_tokens_are_pruned_from_the_store_on_remember() {
    let issuer = TokenIssuer::new("k1");
    let clusters = [("prod", cluster(&issuer))];
    let dir = tempfile::tempdir().unwrap();
    let (psat, store) = attestor_in(dir.path(), &clusters).await;
    let old = UsedToken {
        digest: [7; 32],
        agent_id: "spiffe://example.org/a".parse().unwrap(),
        expires_at: now() - 3600,
    };
    psat.remember(&old).await.unwrap();
    let fresh = UsedToken {
        digest: [8; 32],
        agent_id: "spiffe://example.org/b".parse().unwrap(),
        expires_at: now() + 3600,
    };
    psat.remember(&fresh).await.unwrap();
    let stored: Vec<_> = store
        .list_used_tokens()
        .await
        .unwrap()
        .into_iter()
        .map(|(digest, _)| digest)
        .collect();
    assert_eq!(stored, [vec![8; 32]]);
}

/// A tiny OIDC issuer: discovery document and JWKS over plain HTTP.
struct FakeIssuer {
    url: String,
    jwks: Arc<StdMutex<String>>,
    jwks_fetches: Arc<StdMutex<usize>>,
    /// The `issuer` of the discovery document: its URL unless changed.
    named: Arc<StdMutex<serde_json::Value>>,
}

impl FakeIssuer {
    async fn start(jwks: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let jwks = Arc::new(StdMutex::new(jwks));
        let jwks_fetches = Arc::new(StdMutex::new(0));
        let named = Arc::new(StdMutex::new(serde_json::Value::from(url.clone())));
        let (served, fetches, base) = (Arc::clone(&jwks), Arc::clone(&jwks_fetches), url.clone());
        let document_issuer = Arc::clone(&named);
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = socket.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&request).into_owned();
                let path = text.split_whitespace().nth(1).unwrap_or("").to_owned();
                let (status, body) = match path.as_str() {
                    "/.well-known/openid-configuration" => (
                        "200 OK",
                        serde_json::json!({
                            "issuer": document_issuer.lock().unwrap().clone(),
                            "jwks_uri": format!("{base}/keys"),
                        })
                        .to_string(),
                    ),
                    "/keys" => {
                        *fetches.lock().unwrap() += 1;
                        ("200 OK", served.lock().unwrap().clone())
                    }
                    _ => ("404 Not Found", String::new()),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(response.as_bytes()).await.unwrap();
                socket.shutdown().await.ok();
            }
        });
        Self {
            url,
            jwks,
            jwks_fetches,
            named,
        }
    }

    fn fetches(&self) -> usize {
        *self.jwks_fetches.lock().unwrap()
    }
}

/// An attestor whose cluster `prod` gets the keys of `issuer`'s tokens by
/// discovery from `oidc`.
fn discovering(issuer: &TokenIssuer, oidc: &FakeIssuer) -> K8sPsat {
    let mut config = cluster(issuer);
    config.keys = K8sPsatKeys::IssuerUrl(oidc.url.clone());
    attestor(&[("prod", config)])
}

/// A valid token of node `node-uid-1`, signed by `signer`, issued under
/// `oidc`'s URL.
fn node_token(signer: &TokenIssuer, oidc: &FakeIssuer) -> String {
    signer.sign(&psat_claims(
        &oidc.url,
        "sigil-server",
        "agent-x1",
        "node-uid-1",
    ))
}

/// Makes the last fetch of cluster `prod`'s keys old enough for another.
async fn make_last_fetch_old(psat: &K8sPsat) {
    let Keys::Discovered { cache, .. } = &psat.clusters["prod"].keys else {
        panic!("cluster prod has no keys by discovery");
    };
    cache.lock().await.fetched_at = Instant::now().checked_sub(REFETCH_INTERVAL);
}

#[tokio::test]
async fn keys_come_from_oidc_discovery_and_are_refetched_sparingly() {
    let issuer = TokenIssuer::new("k1");
    let oidc = FakeIssuer::start(issuer.jwks()).await;
    let psat = discovering(&issuer, &oidc);

    let token = node_token(&issuer, &oidc);
    let attested = psat.attest(&payload("prod", &token)).await.unwrap();
    assert_eq!(
        attested.agent_id.as_str(),
        "spiffe://example.org/sigil/agent/k8s_psat/prod/node-uid-1"
    );
    // Cached: a second token signed with a known key needs no fetch.
    let token = issuer.sign(&psat_claims(
        &oidc.url,
        "sigil-server",
        "agent-x2",
        "node-uid-2",
    ));
    psat.attest(&payload("prod", &token)).await.unwrap();
    assert_eq!(oidc.fetches(), 1);

    // A rotated key is unknown; within 30 s of the last fetch, the keys are
    // not fetched again.
    let rotated = TokenIssuer::new("k2");
    *oidc.jwks.lock().unwrap() = rotated.jwks();
    let token = node_token(&rotated, &oidc);
    assert_denied(
        &refused(&psat, "prod", &token).await,
        "params.data.payload: token: signing key \"k2\" is unknown",
    );
    assert_eq!(oidc.fetches(), 1);
}

#[tokio::test]
async fn an_unknown_key_triggers_one_refetch() {
    let old = TokenIssuer::new("k1");
    let oidc = FakeIssuer::start(old.jwks()).await;
    let psat = discovering(&old, &oidc);
    // Nothing fetched yet: the first token fetches the keys.
    let token = node_token(&old, &oidc);
    psat.attest(&payload("prod", &token)).await.unwrap();
    // Pretend the last fetch is old, then rotate: the new key is fetched.
    make_last_fetch_old(&psat).await;
    let rotated = TokenIssuer::new("k2");
    *oidc.jwks.lock().unwrap() = rotated.jwks();
    let token = node_token(&rotated, &oidc);
    psat.attest(&payload("prod", &token)).await.unwrap();
    assert_eq!(oidc.fetches(), 2);
}

#[tokio::test]
async fn keys_of_a_discovery_document_naming_another_issuer_are_refused() {
    let issuer = TokenIssuer::new("k1");
    let oidc = FakeIssuer::start(issuer.jwks()).await;
    *oidc.named.lock().unwrap() = "https://elsewhere.test".into();
    let psat = discovering(&issuer, &oidc);
    let token = node_token(&issuer, &oidc);
    let unavailable = |detail: &str| {
        format!(
            "cannot get the keys of the cluster's issuer: {}/.well-known/openid-configuration: {detail}: its keys are not used",
            oidc.url
        )
    };
    let mismatch = unavailable(&format!(
        "the document names issuer \"https://elsewhere.test\", not {:?}",
        oidc.url
    ));
    let status = refused(&psat, "prod", &token).await;
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::Unavailable, mismatch.as_str())
    );
    assert_eq!(oidc.fetches(), 0, "the JWKS is not even fetched");
    // Until the next fetch, the same refusal.
    let status = refused(&psat, "prod", &token).await;
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::Unavailable, mismatch.as_str())
    );

    *oidc.named.lock().unwrap() = serde_json::Value::Null;
    make_last_fetch_old(&psat).await;
    let status = refused(&psat, "prod", &token).await;
    assert_eq!(
        (status.code(), status.message()),
        (
            tonic::Code::Unavailable,
            unavailable("the document has no issuer").as_str()
        )
    );

    // Once the document names the issuer URL, its keys are used.
    *oidc.named.lock().unwrap() = oidc.url.clone().into();
    make_last_fetch_old(&psat).await;
    let attested = psat.attest(&payload("prod", &token)).await.unwrap();
    assert_eq!(
        attested.agent_id.as_str(),
        "spiffe://example.org/sigil/agent/k8s_psat/prod/node-uid-1"
    );
    assert_eq!(oidc.fetches(), 1);
}
