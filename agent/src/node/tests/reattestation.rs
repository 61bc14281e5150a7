//! What the renewer does when the server cannot be reached until after the
//! agent SVID expired, on paused tokio time: an agent whose node attestor
//! attests again by itself (k8s_psat here) does so, backing off while the
//! server stays away; a join-token agent stops and says it needs a new
//! token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use sigil::bundle::X509Bundle;
use sigil::keys::PrivateKey;
use sigil::tls::{SvidResolver, TrustStore};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::node::renew::{REATTEST_BACKOFF_MAX, REATTEST_BACKOFF_MIN};
use crate::node::*;
use crate::testing::{FakeServer, td};

/// The service account token of the agent's pod.
const PSAT: &str = "eyJhbGciOiJSUzI1NiJ9.agent-pod.sig";

/// The address agents use for the server: a TCP front that, while the
/// server is down, accepts each connection and closes it at once (as a
/// load balancer with no server behind it does), and otherwise relays it
/// to the server. It records when each connection came.
struct Front {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    arrivals: watch::Receiver<Vec<Instant>>,
    task: tokio::task::JoinHandle<()>,
}

impl Front {
    /// A front for `server`, down.
    async fn start(server: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let (arrived, arrivals) = watch::channel(Vec::new());
        let relaying = Arc::clone(&up);
        let task = tokio::spawn(async move {
            loop {
                let (mut inbound, _) = listener.accept().await.unwrap();
                arrived.send_modify(|times| times.push(Instant::now()));
                if !relaying.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                inbound.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let mut outbound = TcpStream::connect(server).await.unwrap();
                    outbound.set_nodelay(true).unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Self {
            addr,
            up,
            arrivals,
            task,
        }
    }

    /// The server is back.
    fn bring_up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// When the first `n` connections came.
    async fn arrivals(&self, n: usize) -> Vec<Instant> {
        let mut arrivals = self.arrivals.clone();
        let times = tokio::time::timeout(
            Duration::from_secs(3600),
            arrivals.wait_for(|times| times.len() >= n),
        )
        .await
        .unwrap()
        .unwrap();
        times[..n].to_vec()
    }

    fn count(&self) -> usize {
        self.arrivals.borrow().len()
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An agent SVID for `path`, signed by the fake server's CA, that expired
/// an hour ago, stored in `storage`.
fn expired_identity(server: &FakeServer, path: &str, storage: &Storage) -> NodeIdentity {
    let key = PrivateKey::generate_p256().unwrap();
    let spiffe_id = td().id_with_path(path).unwrap();
    let now = SystemTime::now();
    let params = sigil::x509::leaf_params(
        &td(),
        &spiffe_id,
        &[],
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    )
    .unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_der(server.ca.cert(), server.ca.key().key_pair().unwrap())
            .unwrap();
    let cert = params.signed_by(&key.key_pair().unwrap(), &issuer).unwrap();
    let chain = vec![CertificateDer::from(cert.der().to_vec())];
    let (not_before, not_after) = crate::certs::validity(&chain[0]).unwrap();
    let identity = NodeIdentity {
        spiffe_id,
        chain,
        key,
        bundle: X509Bundle::new(td(), vec![server.ca.cert().clone()]),
        not_before,
        not_after,
    };
    storage.save(&identity).unwrap();
    identity
}

/// The renewer of `identity`, talking to the server at `address`, as the
/// agent runs it.
fn renewer(
    identity: &NodeIdentity,
    address: SocketAddr,
    storage: &Storage,
    reattestation: Option<Reattestation>,
) -> Renewer {
    let trust = Arc::new(TrustStore::new(&identity.bundle).unwrap());
    let resolver = Arc::new(SvidResolver::new(identity.chain.clone(), &identity.key).unwrap());
    let tls =
        crate::client::tls_config(&td(), Arc::clone(&trust), Some(Arc::clone(&resolver))).unwrap();
    let channel = Arc::new(crate::client::AgentChannel::new(&address.to_string(), tls));
    Renewer::new(
        channel,
        storage.clone(),
        trust,
        resolver,
        identity.clone(),
        Arc::new(Notify::new()),
    )
    .with_reattestation(reattestation)
}

/// The k8s_psat attestor of an agent whose pod's token is in `dir`.
fn k8s_psat(address: SocketAddr, dir: &std::path::Path) -> Reattestation {
    let token_path: PathBuf = dir.join("token");
    std::fs::write(&token_path, format!("{PSAT}\n")).unwrap();
    Reattestation {
        address: address.to_string(),
        td: td(),
        attestor: NodeAttestorConfig::K8sPsat {
            cluster: "prod".into(),
            token_path,
        },
    }
}

#[tokio::test(start_paused = true)]
async fn failed_reattestations_back_off_doubling_up_to_a_minute() {
    let server = FakeServer::start().await;
    let front = Front::start(server.addr).await;
    let data = tempfile::tempdir().unwrap();
    let storage = Storage::new(data.path());
    let identity = expired_identity(&server, "/sigil/agent/k8s_psat/prod/node-uid-1", &storage);
    let reattestation = k8s_psat(front.addr, data.path());
    let task = tokio::spawn(renewer(&identity, front.addr, &storage, Some(reattestation)).run());

    // The renewal, then ten attempts to attest again.
    let arrivals = front.arrivals(11).await;
    assert_eq!(
        arrivals[1] - arrivals[0],
        Duration::ZERO,
        "the first attempt follows the failed renewal at once"
    );
    let gaps: Vec<Duration> = arrivals[1..].windows(2).map(|w| w[1] - w[0]).collect();
    let mut base = REATTEST_BACKOFF_MIN;
    let timer_tick = Duration::from_millis(1);
    for (i, gap) in gaps.iter().enumerate() {
        // Each delay is the previous one doubled, up to the cap, times a
        // random factor from 0.75 to 1.25, and never above the cap.
        let low = base.mul_f64(0.75);
        let high = base.mul_f64(1.25).min(REATTEST_BACKOFF_MAX) + timer_tick;
        assert!(
            (low..=high).contains(gap),
            "gap {i} is {gap:?}, expected {low:?} to {high:?}: {gaps:?}"
        );
        base = (base * 2).min(REATTEST_BACKOFF_MAX);
    }
    let capped = gaps
        .iter()
        .filter(|g| **g >= Duration::from_secs(45))
        .count();
    assert!(capped >= 3, "{gaps:?}");
    assert!(
        gaps.iter().all(|g| *g <= REATTEST_BACKOFF_MAX + timer_tick),
        "{gaps:?}"
    );
    assert!(!task.is_finished(), "the agent keeps trying");
    assert_eq!(server.state.lock().unwrap().attestations, 0);
}

#[tokio::test(start_paused = true)]
async fn a_k8s_psat_agent_attests_again_after_its_svid_expired_in_an_outage() {
    let server = FakeServer::start().await;
    server
        .state
        .lock()
        .unwrap()
        .psat_tokens
        .insert(PSAT.to_owned(), "node-uid-1".to_owned());
    // SVIDs of 30 s, renewed at half-life: 15 s after the attestation.
    server.state.lock().unwrap().agent_ttl = Some(Duration::from_secs(30));
    let front = Front::start(server.addr).await;
    let data = tempfile::tempdir().unwrap();
    let storage = Storage::new(data.path());
    let identity = expired_identity(&server, "/sigil/agent/k8s_psat/prod/node-uid-1", &storage);
    let reattestation = k8s_psat(front.addr, data.path());
    let task = tokio::spawn(renewer(&identity, front.addr, &storage, Some(reattestation)).run());

    // The renewal and the first attempt to attest again fail; the server
    // is back for the next attempt.
    front.arrivals(2).await;
    front.bring_up();
    server.wait_for(|s| s.attestations == 1).await;

    // The new SVID is put to use: the server, which accepts only the last
    // SVID it issued to an agent, accepts it for the renewal at its
    // half-life.
    server.wait_for(|s| s.renewals == 1).await;
    let stored = storage.load(&td()).unwrap();
    assert_eq!(stored.spiffe_id, identity.spiffe_id, "the same node, again");
    assert_ne!(stored.chain, identity.chain);
    assert!(stored.not_after > SystemTime::now());
    assert!(!task.is_finished(), "the agent keeps running");
    assert_eq!(server.state.lock().unwrap().attestations, 1);
}

#[tokio::test(start_paused = true)]
async fn a_join_token_agent_whose_svid_expired_in_an_outage_needs_a_new_token() {
    let server = FakeServer::start().await;
    let front = Front::start(server.addr).await;
    let data = tempfile::tempdir().unwrap();
    let storage = Storage::new(data.path());
    let identity = expired_identity(&server, "/sigil/agent/join_token/1", &storage);

    let started = Instant::now();
    let err = renewer(&identity, front.addr, &storage, None).run().await;
    assert_eq!(started.elapsed(), Duration::ZERO, "no retry after expiry");
    let text = err.to_string();
    assert!(
        text.starts_with("the agent SVID expired before it could be renewed (last error: "),
        "{text}"
    );
    assert!(text.ends_with("); a new join token is needed"), "{text}");
    assert!(matches!(err, NodeError::Expired { .. }), "{err:?}");
    assert_eq!(front.count(), 1, "the renewal only: no attestation");

    // Started again without a token, the agent says what is missing.
    let config = crate::config::Config {
        trust_domain: td(),
        server_address: front.addr.to_string(),
        trust_bundle_path: Some(server.bundle_path()),
        join_token: None,
        data_dir: data.path().to_owned(),
        socket_path: data.path().join("api.sock"),
        log_level: "info".into(),
        log_format: crate::config::LogFormat::Text,
        workload_attestors: Default::default(),
        workload_key_type: Default::default(),
        node_attestor: Default::default(),
    };
    let err = establish(&config, &storage).await.unwrap_err().to_string();
    assert!(
        err.starts_with(
            "no stored agent SVID and no join token: the stored agent SVID expired at "
        ),
        "{err}"
    );
}
