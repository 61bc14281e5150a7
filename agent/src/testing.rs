//! An in-process fake of the server's agent API for tests: it signs with a
//! real [`Authority`] and serves over the real rustls configurations on
//! 127.0.0.1, so the agent's TLS, attestation, sync and signing paths run
//! as they do against `sigil-server`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use sigil::proto::sigil::agent::v1::agent_api_server::{AgentApi, AgentApiServer};
use sigil::proto::sigil::agent::v1::{
    AgentSvid, AttestRequest, AttestResponse, BatchNewX509SvidRequest, BatchNewX509SvidResponse,
    RenewAgentRequest, RenewAgentResponse, SyncEntriesRequest, SyncEntriesResponse, X509Svid,
    attest_request, attest_response,
};
use sigil::proto::sigil::types::v1 as pb;
use sigil::tls::{SpiffeClientVerifier, SvidResolver, TrustStore};
use sigil::x509::{Authority, Csr};
use sigil::{SpiffeId, TrustDomain};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Response, Status};

/// The message the fake gives for an unknown or used token.
pub(crate) const BAD_TOKEN: &str = "join token is not valid (unknown or already used)";

/// The trust domain of the tests.
pub(crate) fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// What the fake knows and has seen.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Unused join tokens.
    pub(crate) tokens: HashSet<String>,
    /// Service account tokens accepted for k8s_psat attestation, with the
    /// UID of the node each was issued on; not used up by an attestation.
    pub(crate) psat_tokens: HashMap<String, String>,
    /// Agents whose SVID is refused from now on.
    pub(crate) evicted: HashSet<SpiffeId>,
    /// The last SVID leaf issued to each agent: the only one accepted, as
    /// `sigil-server` does.
    current: HashMap<SpiffeId, Vec<u8>>,
    /// Registration entries.
    pub(crate) entries: Vec<pb::Entry>,
    /// Lifetime of agent SVIDs.
    pub(crate) agent_ttl: Option<Duration>,
    /// Attestations that succeeded.
    pub(crate) attestations: usize,
    /// Renewals that succeeded.
    pub(crate) renewals: usize,
    /// The `known` list of each SyncEntries call.
    pub(crate) sync_calls: Vec<Vec<(String, u64)>>,
    /// The entry IDs of each BatchNewX509Svid call.
    pub(crate) batches: Vec<Vec<String>>,
    /// Open sync streams, to push messages on.
    streams: Vec<mpsc::Sender<Result<SyncEntriesResponse, Status>>>,
    next_agent: u32,
}

/// The fake server.
#[derive(Debug)]
pub(crate) struct FakeServer {
    /// Its address.
    pub(crate) addr: SocketAddr,
    /// Its CA.
    pub(crate) ca: Arc<Authority>,
    /// What it knows.
    pub(crate) state: Arc<Mutex<State>>,
    /// Notified on every call.
    pub(crate) changed: Arc<Notify>,
    /// A directory holding `bundle.pem`, the CA as PEM.
    pub(crate) dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeServer {
    /// Starts a fake with a new CA for [`td`].
    pub(crate) async fn start() -> Self {
        let ca = Arc::new(Authority::self_signed(&td(), Duration::from_secs(3600)).unwrap());
        let server_key = sigil::keys::PrivateKey::generate_p256().unwrap();
        let server_svid = ca
            .sign_leaf(
                &server_key.key_pair().unwrap(),
                &td().id_with_path("/sigil/server").unwrap(),
                &[],
                Duration::from_secs(3600),
            )
            .unwrap();
        let bundle = sigil::bundle::X509Bundle::new(td(), vec![ca.cert().clone()]);
        let trust = Arc::new(TrustStore::new(&bundle).unwrap());
        let resolver = Arc::new(SvidResolver::new(server_svid.chain, &server_key).unwrap());
        let config =
            sigil::tls::server_config(resolver, Arc::new(SpiffeClientVerifier::new(trust)))
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bundle.pem"), bundle.to_pem()).unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let changed = Arc::new(Notify::new());
        let api = Api {
            ca: Arc::clone(&ca),
            state: Arc::clone(&state),
            changed: Arc::clone(&changed),
        };

        let (conns, incoming) = mpsc::channel(16);
        let task = tokio::spawn(async move {
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    // As sigil-server's connections: without it, small
                    // answers wait for the client's delayed ACK, in real
                    // time, which tests on paused time race past.
                    let _ = tcp.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    let conns = conns.clone();
                    tokio::spawn(async move {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            let _ = conns.send(Ok::<_, std::io::Error>(tls)).await;
                        }
                    });
                }
            });
            let _ = tonic::transport::Server::builder()
                .add_service(AgentApiServer::new(api))
                .serve_with_incoming(ReceiverStream::new(incoming))
                .await;
        });
        Self {
            addr,
            ca,
            state,
            changed,
            dir,
            task,
        }
    }

    /// The path of the CA as PEM.
    pub(crate) fn bundle_path(&self) -> PathBuf {
        self.dir.path().join("bundle.pem")
    }

    /// Adds a join token.
    pub(crate) fn add_token(&self, token: &str) {
        self.state.lock().unwrap().tokens.insert(token.to_owned());
    }

    /// Adds or replaces an entry and pushes it to open sync streams.
    pub(crate) async fn upsert(&self, entry: pb::Entry) {
        let streams = {
            let mut state = self.state.lock().unwrap();
            state.entries.retain(|e| e.id != entry.id);
            state.entries.push(entry.clone());
            state.streams.clone()
        };
        for s in streams {
            let _ = s
                .send(Ok(SyncEntriesResponse {
                    upserted: vec![entry.clone()],
                    ..Default::default()
                }))
                .await;
        }
    }

    /// Ends every open sync stream with UNAVAILABLE, as a restarting server
    /// does.
    pub(crate) async fn break_streams(&self) {
        let streams = std::mem::take(&mut self.state.lock().unwrap().streams);
        for s in streams {
            let _ = s
                .send(Err(Status::unavailable("server shutting down")))
                .await;
        }
    }

    /// Waits until `check` holds for the state, re-checking on every call.
    pub(crate) async fn wait_for(&self, mut check: impl FnMut(&State) -> bool) {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let notified = self.changed.notified();
                if check(&self.state.lock().unwrap()) {
                    return;
                }
                notified.await;
            }
        })
        .await
        .expect("the fake server never reached the expected state");
    }
}

/// A wire entry for the tests.
pub(crate) fn entry(id: &str, spiffe_path: &str, parent: &SpiffeId) -> pb::Entry {
    pb::Entry {
        id: id.to_owned(),
        spiffe_id: format!("spiffe://example.org{spiffe_path}"),
        parent_id: parent.to_string(),
        selectors: vec![pb::Selector {
            r#type: "unix".into(),
            value: "uid:1000".into(),
        }],
        revision: 1,
        created_at: 1_700_000_000,
        ..Default::default()
    }
}

struct Api {
    ca: Arc<Authority>,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

impl Api {
    fn bundle(&self) -> pb::Bundle {
        pb::Bundle {
            trust_domain: td().name().to_owned(),
            x509_authorities: vec![self.ca.cert().to_vec()],
            sequence: 1,
        }
    }

    fn agent_svid(&self, id: &SpiffeId, csr: &[u8]) -> Result<AgentSvid, Status> {
        let csr = Csr::from_der(csr).map_err(|e| Status::invalid_argument(format!("csr: {e}")))?;
        let ttl = self
            .state
            .lock()
            .unwrap()
            .agent_ttl
            .unwrap_or(Duration::from_secs(600));
        let svid = self
            .ca
            .sign_leaf(csr.public_key(), id, &[], ttl)
            .map_err(|e| Status::internal(e.to_string()))?;
        self.state
            .lock()
            .unwrap()
            .current
            .insert(id.clone(), svid.chain[0].to_vec());
        Ok(AgentSvid {
            spiffe_id: id.to_string(),
            cert_chain: svid.chain.iter().map(|c| c.to_vec()).collect(),
            bundle: Some(self.bundle()),
        })
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<SpiffeId, Status> {
        let certs = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let id =
            sigil::x509::spiffe_id_of(leaf).map_err(|e| Status::unauthenticated(e.to_string()))?;
        let state = self.state.lock().unwrap();
        if state.evicted.contains(&id) {
            return Err(Status::permission_denied(format!("agent {id} is evicted")));
        }
        if state.current.get(&id).map(Vec::as_slice) != Some(leaf.as_ref()) {
            return Err(Status::permission_denied(
                "agent SVID is not current; attest again",
            ));
        }
        Ok(id)
    }

    fn touched(&self) {
        self.changed.notify_waiters();
    }

    /// A k8s_psat attestation: a token of `psat_tokens` gets the SVID
    /// `/sigil/agent/k8s_psat/<cluster>/<node UID>`, as `sigil-server`
    /// names the agent, every time it is presented.
    fn attest_k8s_psat(&self, payload: &[u8], csr: &[u8]) -> Result<AgentSvid, Status> {
        use prost::Message as _;
        let psat = sigil::proto::sigil::agent::v1::K8sPsatAttestation::decode(payload)
            .map_err(|e| Status::invalid_argument(format!("params.data.payload: {e}")))?;
        let node = self
            .state
            .lock()
            .unwrap()
            .psat_tokens
            .get(&psat.token)
            .cloned();
        let Some(node) = node else {
            self.touched();
            return Err(Status::permission_denied(
                "the service account token is not valid",
            ));
        };
        let id = td()
            .id_with_path(&format!("/sigil/agent/k8s_psat/{}/{node}", psat.cluster))
            .unwrap();
        let svid = self.agent_svid(&id, csr)?;
        self.state.lock().unwrap().attestations += 1;
        self.touched();
        Ok(svid)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentApi for Api {
    type AttestStream = BoxStream<AttestResponse>;
    type SyncEntriesStream = BoxStream<SyncEntriesResponse>;

    async fn attest(
        &self,
        request: Request<tonic::Streaming<AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no params"))?;
        let Some(attest_request::Step::Params(params)) = first.step else {
            return Err(Status::invalid_argument("params: required"));
        };
        let data = params.data.unwrap_or_default();
        if data.r#type == "k8s_psat" {
            let svid = self.attest_k8s_psat(&data.payload, &params.csr)?;
            let answer = AttestResponse {
                step: Some(attest_response::Step::Result(svid)),
            };
            return Ok(Response::new(Box::pin(futures::stream::iter([Ok(answer)]))));
        }
        if data.r#type != "join_token" {
            return Err(Status::invalid_argument("data.type: unsupported"));
        }
        let token = String::from_utf8(data.payload).unwrap_or_default();
        let id = {
            let mut state = self.state.lock().unwrap();
            if !state.tokens.remove(&token) {
                drop(state);
                self.touched();
                return Err(Status::permission_denied(BAD_TOKEN));
            }
            state.next_agent += 1;
            td().id_with_path(&format!("/sigil/agent/join_token/{}", state.next_agent))
                .unwrap()
        };
        let svid = self.agent_svid(&id, &params.csr)?;
        self.state.lock().unwrap().attestations += 1;
        self.touched();
        let answer = AttestResponse {
            step: Some(attest_response::Step::Result(svid)),
        };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(answer)]))))
    }

    async fn renew_agent(
        &self,
        request: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        let result = self.caller(&request).and_then(|id| {
            let svid = self.agent_svid(&id, &request.get_ref().csr)?;
            self.state.lock().unwrap().renewals += 1;
            Ok(RenewAgentResponse { svid: Some(svid) })
        });
        self.touched();
        result.map(Response::new)
    }

    async fn sync_entries(
        &self,
        request: Request<SyncEntriesRequest>,
    ) -> Result<Response<Self::SyncEntriesStream>, Status> {
        let caller = self.caller(&request);
        let (tx, rx) = mpsc::channel(16);
        {
            let mut state = self.state.lock().unwrap();
            let known: HashMap<String, u64> = request
                .get_ref()
                .known
                .iter()
                .map(|k| (k.id.clone(), k.revision))
                .collect();
            state
                .sync_calls
                .push(known.iter().map(|(k, v)| (k.clone(), *v)).collect());
            let caller = match caller {
                Ok(c) => c,
                Err(e) => {
                    drop(state);
                    self.touched();
                    return Err(e);
                }
            };
            let entitled: Vec<pb::Entry> = state
                .entries
                .iter()
                .filter(|e| e.parent_id == caller.as_str())
                .cloned()
                .collect();
            let upserted = entitled
                .iter()
                .filter(|e| known.get(&e.id) != Some(&e.revision))
                .cloned()
                .collect();
            let deleted = known
                .keys()
                .filter(|id| !entitled.iter().any(|e| &e.id == *id))
                .cloned()
                .collect();
            let first = SyncEntriesResponse {
                upserted,
                deleted,
                bundle: Some(self.bundle()),
                ..Default::default()
            };
            // The channel is new and has room.
            tx.try_send(Ok(first)).unwrap();
            state.streams.push(tx);
        }
        self.touched();
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn batch_new_x509_svid(
        &self,
        request: Request<BatchNewX509SvidRequest>,
    ) -> Result<Response<BatchNewX509SvidResponse>, Status> {
        let result = self.caller(&request).and_then(|caller| {
            let params = &request.get_ref().params;
            let entries = self.state.lock().unwrap().entries.clone();
            let mut svids = Vec::new();
            for (i, p) in params.iter().enumerate() {
                let entry = entries
                    .iter()
                    .find(|e| e.id == p.entry_id && e.parent_id == caller.as_str())
                    .ok_or_else(|| {
                        Status::permission_denied(format!(
                            "params[{i}].entry_id: entry {} is not entitled to this agent",
                            p.entry_id
                        ))
                    })?;
                let csr = Csr::from_der(&p.csr)
                    .map_err(|e| Status::invalid_argument(format!("params[{i}].csr: {e}")))?;
                let id: SpiffeId = entry.spiffe_id.parse().unwrap();
                if csr.spiffe_id() != Some(&id) {
                    return Err(Status::invalid_argument(format!(
                        "params[{i}].csr: URI SAN does not match entry {id}"
                    )));
                }
                let ttl = match entry.x509_svid_ttl {
                    0 => Duration::from_secs(3600),
                    n => Duration::from_secs(n.unsigned_abs().into()),
                };
                let svid = self
                    .ca
                    .sign_leaf(csr.public_key(), &id, &entry.dns_names, ttl)
                    .map_err(|e| Status::internal(e.to_string()))?;
                svids.push(X509Svid {
                    entry_id: p.entry_id.clone(),
                    spiffe_id: id.to_string(),
                    cert_chain: svid.chain.iter().map(|c| c.to_vec()).collect(),
                    expires_at: 0,
                });
            }
            self.state
                .lock()
                .unwrap()
                .batches
                .push(params.iter().map(|p| p.entry_id.clone()).collect());
            Ok(BatchNewX509SvidResponse { svids })
        });
        self.touched();
        result.map(Response::new)
    }
}
