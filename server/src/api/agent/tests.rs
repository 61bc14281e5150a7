//! The agent API end to end within the process: a real server on a
//! loopback port with TLS, and real clients.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use sigil::bundle::X509Bundle;
use sigil::keys::PrivateKey;
use sigil::proto::sigil::admin::v1::admin_client::AdminClient;
use sigil::proto::sigil::admin::v1::{
    BatchCreateEntryRequest, BatchDeleteEntryRequest, CreateJoinTokenRequest, GetBundleRequest,
};
use sigil::proto::sigil::agent::v1::agent_api_client::AgentApiClient;
use sigil::proto::sigil::agent::v1::{
    AgentSvid, AttestRequest, AttestationData, AttestationParams, BatchNewX509SvidRequest,
    RenewAgentRequest, SyncEntriesRequest, X509SvidParams, attest_request, attest_response,
};
use sigil::proto::sigil::types::v1 as pb;
use sigil::tls::{SpiffeServerVerifier, SvidResolver, TrustStore};
use sigil::{SpiffeId, TrustDomain};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::cli::client;
use crate::config::{Config, LogFormat};
use crate::serve::{self, Running};

struct Server {
    running: Option<Running>,
    addr: SocketAddr,
    admin: AdminClient<Channel>,
    bundle: X509Bundle,
    _dir: tempfile::TempDir,
}

async fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let socket: PathBuf = dir.path().join("admin/admin.sock");
    let config = Config {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        admin_socket_path: socket.clone(),
        admin_socket_group: None,
        data_dir: dir.path().join("data"),
        default_x509_svid_ttl: Duration::from_secs(3600),
        ca_ttl: Duration::from_secs(86400),
        agent_svid_ttl: Duration::from_secs(3600),
        log_level: "info".into(),
        log_format: LogFormat::Text,
    };
    let running = serve::start(&config).await.unwrap();
    assert!(dir.path().join("data/ready").exists());
    let addr = std::fs::read_to_string(dir.path().join("data/agent-api.addr"))
        .unwrap()
        .parse()
        .unwrap();
    let mut admin = client::connect(&socket).await.unwrap();
    let bundle = admin
        .get_bundle(GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let bundle = X509Bundle::new(
        TrustDomain::new(&bundle.trust_domain).unwrap(),
        bundle
            .x509_authorities
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
    );
    Server {
        running: Some(running),
        addr,
        admin,
        bundle,
        _dir: dir,
    }
}

/// An agent's key and SVID.
struct Identity {
    key: PrivateKey,
    chain: Vec<CertificateDer<'static>>,
}

impl Server {
    async fn agent_client(&self, identity: Option<&Identity>) -> AgentApiClient<Channel> {
        let trust = Arc::new(TrustStore::new(&self.bundle).unwrap());
        let server_id: SpiffeId = "spiffe://example.org/sigil/server".parse().unwrap();
        let verifier = Arc::new(SpiffeServerVerifier::new(trust, server_id));
        let resolver =
            identity.map(|id| Arc::new(SvidResolver::new(id.chain.clone(), &id.key).unwrap()));
        let tls = sigil::tls::client_config(verifier, resolver).unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let addr = self.addr;
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let connector = connector.clone();
                async move {
                    let tcp = TcpStream::connect(addr).await?;
                    let name = ServerName::try_from("localhost").unwrap();
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await
            .unwrap();
        AgentApiClient::new(channel)
    }

    async fn token(&mut self) -> (String, String) {
        let t = self
            .admin
            .create_join_token(CreateJoinTokenRequest::default())
            .await
            .unwrap()
            .into_inner();
        (t.token, t.agent_id)
    }

    async fn create_entry(&mut self, spiffe_id: &str, parent_id: &str) -> pb::Entry {
        let response = self
            .admin
            .batch_create_entry(BatchCreateEntryRequest {
                entries: vec![pb::Entry {
                    spiffe_id: spiffe_id.into(),
                    parent_id: parent_id.into(),
                    selectors: vec![pb::Selector {
                        r#type: "unix".into(),
                        value: "uid:1000".into(),
                    }],
                    ..Default::default()
                }],
            })
            .await
            .unwrap()
            .into_inner();
        let result = response.results.into_iter().next().unwrap();
        assert_eq!(result.status.unwrap().code, 0);
        result.entry.unwrap()
    }

    /// Attests with a fresh token and returns the agent's identity.
    async fn attest(&mut self) -> (Identity, AgentSvid) {
        let (token, agent_id) = self.token().await;
        let key = PrivateKey::generate_p256().unwrap();
        let csr = sigil::x509::build_csr(&key.key_pair().unwrap(), None).unwrap();
        let svid = attest_with(
            &mut self.agent_client(None).await,
            "join_token",
            &token,
            csr,
        )
        .await
        .unwrap();
        assert_eq!(svid.spiffe_id, agent_id);
        let chain = svid
            .cert_chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        (Identity { key, chain }, svid)
    }

    async fn stop(&mut self) {
        self.running.take().unwrap().stop().await.unwrap();
    }
}

async fn attest_with(
    client: &mut AgentApiClient<Channel>,
    kind: &str,
    token: &str,
    csr: Vec<u8>,
) -> Result<AgentSvid, tonic::Status> {
    let request = AttestRequest {
        step: Some(attest_request::Step::Params(AttestationParams {
            data: Some(AttestationData {
                r#type: kind.into(),
                payload: token.as_bytes().to_vec(),
            }),
            csr,
        })),
    };
    let mut stream = client
        .attest(tokio_stream::once(request))
        .await?
        .into_inner();
    let message = stream.message().await?.unwrap();
    assert!(
        stream.message().await?.is_none(),
        "the stream ends after the result"
    );
    match message.step {
        Some(attest_response::Step::Result(svid)) => Ok(svid),
        other => panic!("unexpected {other:?}"),
    }
}

fn workload_csr(id: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    sigil::x509::build_csr(&key, Some(&id.parse().unwrap())).unwrap()
}

fn assert_status(status: &tonic::Status, code: tonic::Code, message: &str) {
    assert_eq!((status.code(), status.message()), (code, message));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestation_checks_the_request_and_uses_a_token_once() {
    let mut s = server().await;
    let (token, agent_id) = s.token().await;
    let key = PrivateKey::generate_p256().unwrap();
    let csr = sigil::x509::build_csr(&key.key_pair().unwrap(), None).unwrap();
    let mut client = s.agent_client(None).await;

    let status = attest_with(&mut client, "tpm", &token, csr.clone())
        .await
        .unwrap_err();
    assert_status(
        &status,
        tonic::Code::InvalidArgument,
        "params.data.type: unsupported attestation type \"tpm\"",
    );
    let status = attest_with(&mut client, "join_token", &token, b"junk".to_vec())
        .await
        .unwrap_err();
    assert_status(
        &status,
        tonic::Code::InvalidArgument,
        "params.csr: is malformed or its signature does not verify",
    );

    // Refused requests did not use up the token.
    let svid = attest_with(&mut client, "join_token", &token, csr.clone())
        .await
        .unwrap();
    assert_eq!(svid.spiffe_id, agent_id);
    assert_eq!(
        sigil::x509::check_leaf(&svid.cert_chain[0])
            .unwrap()
            .as_str(),
        agent_id
    );
    let bundle = svid.bundle.unwrap();
    assert_eq!(bundle.trust_domain, "example.org");
    assert_eq!(
        bundle.x509_authorities,
        [s.bundle.authorities()[0].to_vec()]
    );

    let status = attest_with(&mut client, "join_token", &token, csr)
        .await
        .unwrap_err();
    assert_status(
        &status,
        tonic::Code::PermissionDenied,
        "join token is not valid (unknown or already used)",
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_need_a_current_agent_svid() {
    let mut s = server().await;
    let status = s
        .agent_client(None)
        .await
        .renew_agent(RenewAgentRequest::default())
        .await
        .unwrap_err();
    assert_status(
        &status,
        tonic::Code::Unauthenticated,
        "a client certificate (agent SVID) is required",
    );

    let (first, _) = s.attest().await;
    let renew = |identity: &Identity| {
        let csr = sigil::x509::build_csr(&identity.key.key_pair().unwrap(), None).unwrap();
        RenewAgentRequest { csr }
    };
    let mut client = s.agent_client(Some(&first)).await;
    let renewed = client
        .renew_agent(renew(&first))
        .await
        .unwrap()
        .into_inner();
    let second = Identity {
        key: first.key.clone(),
        chain: renewed
            .svid
            .unwrap()
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
    };
    // The previous SVID still works until the next renewal...
    client.renew_agent(renew(&first)).await.unwrap();
    // ...after which it is neither current nor previous.
    let status = client.renew_agent(renew(&first)).await.unwrap_err();
    assert_status(
        &status,
        tonic::Code::PermissionDenied,
        "agent SVID is not current; attest again",
    );
    // The one renewed first is now the previous and still accepted.
    s.agent_client(Some(&second))
        .await
        .renew_agent(renew(&second))
        .await
        .unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_validated_whole_then_signed() {
    let mut s = server().await;
    let (agent, svid) = s.attest().await;
    let web = s
        .create_entry("spiffe://example.org/web", &svid.spiffe_id)
        .await;
    let db = s
        .create_entry("spiffe://example.org/db", "spiffe://example.org/web")
        .await;
    let other = s
        .create_entry(
            "spiffe://example.org/other",
            "spiffe://example.org/elsewhere",
        )
        .await;
    let mut client = s.agent_client(Some(&agent)).await;
    let item = |entry: &pb::Entry, id: &str| X509SvidParams {
        entry_id: entry.id.clone(),
        csr: workload_csr(id),
    };
    let batch = |params| BatchNewX509SvidRequest { params };

    let status = client.batch_new_x509_svid(batch(vec![])).await.unwrap_err();
    assert_status(&status, tonic::Code::InvalidArgument, "params: empty");

    let too_many = vec![item(&web, "spiffe://example.org/web"); 501];
    let status = client
        .batch_new_x509_svid(batch(too_many))
        .await
        .unwrap_err();
    assert_status(
        &status,
        tonic::Code::InvalidArgument,
        "params: at most 500 items per batch",
    );

    let status = client
        .batch_new_x509_svid(batch(vec![
            item(&web, "spiffe://example.org/web"),
            item(&other, "spiffe://example.org/other"),
        ]))
        .await
        .unwrap_err();
    assert_status(
        &status,
        tonic::Code::PermissionDenied,
        &format!(
            "params[1].entry_id: entry {} is not entitled to this agent",
            other.id
        ),
    );

    let status = client
        .batch_new_x509_svid(batch(vec![
            item(&web, "spiffe://example.org/web"),
            item(&db, "spiffe://example.org/db"),
            item(&web, "spiffe://example.org/x"),
        ]))
        .await
        .unwrap_err();
    assert_status(
        &status,
        tonic::Code::InvalidArgument,
        "params[2].csr: URI SAN spiffe://example.org/x does not match entry spiffe://example.org/web",
    );

    let svids = client
        .batch_new_x509_svid(batch(vec![
            item(&web, "spiffe://example.org/web"),
            item(&db, "spiffe://example.org/db"),
        ]))
        .await
        .unwrap()
        .into_inner()
        .svids;
    assert_eq!(svids.len(), 2);
    for (svid, entry) in svids.iter().zip([&web, &db]) {
        assert_eq!(svid.entry_id, entry.id);
        assert_eq!(svid.spiffe_id, entry.spiffe_id);
        let id = sigil::x509::check_leaf(&svid.cert_chain[0]).unwrap();
        assert_eq!(id.as_str(), entry.spiffe_id);
        let not_after = sigil::x509::not_after(&svid.cert_chain[0]).unwrap();
        assert_eq!(crate::clock::to_unix(not_after), svid.expires_at);
        let lifetime = svid.expires_at - crate::clock::now_unix();
        assert!((3500..=3600).contains(&lifetime), "{lifetime}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_streams_the_diff_and_ends_unavailable_on_shutdown() {
    let mut s = server().await;
    let (agent, svid) = s.attest().await;
    let web = s
        .create_entry("spiffe://example.org/web", &svid.spiffe_id)
        .await;
    let stale = s
        .create_entry("spiffe://example.org/old", &svid.spiffe_id)
        .await;
    let mut client = s.agent_client(Some(&agent)).await;

    let known = vec![
        sigil::proto::sigil::agent::v1::KnownEntry {
            id: stale.id.clone(),
            revision: stale.revision,
        },
        sigil::proto::sigil::agent::v1::KnownEntry {
            id: "vanished".into(),
            revision: 1,
        },
    ];
    let mut stream = client
        .sync_entries(SyncEntriesRequest { known })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(
        first.upserted.iter().map(|e| &e.id).collect::<Vec<_>>(),
        [&web.id]
    );
    assert_eq!(first.deleted, ["vanished"]);
    assert_eq!(first.bundle.unwrap().trust_domain, "example.org");

    // A nested entry appears; then one is deleted.
    let nested = s
        .create_entry("spiffe://example.org/web/child", "spiffe://example.org/web")
        .await;
    let second = stream.message().await.unwrap().unwrap();
    assert_eq!(
        second.upserted.iter().map(|e| &e.id).collect::<Vec<_>>(),
        [&nested.id]
    );
    assert!(second.deleted.is_empty());
    assert!(second.bundle.is_none());

    s.admin
        .batch_delete_entry(BatchDeleteEntryRequest {
            ids: vec![stale.id.clone()],
        })
        .await
        .unwrap();
    let third = stream.message().await.unwrap().unwrap();
    assert!(third.upserted.is_empty());
    assert_eq!(third.deleted, [stale.id.as_str()]);

    // An entry for another agent changes nothing for this one.
    s.create_entry("spiffe://example.org/else", "spiffe://example.org/nobody")
        .await;

    s.stop().await;
    let status = stream.message().await.unwrap_err();
    assert_status(&status, tonic::Code::Unavailable, "server shutting down");
}

fn params(kind: &str, payload: &[u8], csr: Vec<u8>) -> AttestationParams {
    AttestationParams {
        data: Some(AttestationData {
            r#type: kind.into(),
            payload: payload.to_vec(),
        }),
        csr,
    }
}

#[test]
fn attestation_payloads_are_checked_before_the_token_is_used() {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = sigil::x509::build_csr(&key, None).unwrap();
    let cases = [
        (
            params("join_token", &[b'a'; 257], csr.clone()),
            "params.data.payload: a join token has at most 256 bytes",
        ),
        (
            params("join_token", &[0xff, 0xfe], csr.clone()),
            "params.data.payload: the join token is not UTF-8",
        ),
        (
            params("join_token", b"", csr.clone()),
            "params.data.payload: the join token is required",
        ),
        (
            params("join_token", b"token", Vec::new()),
            "params.csr: is required",
        ),
        (
            AttestationParams {
                data: None,
                csr: csr.clone(),
            },
            "params.data: is required",
        ),
    ];
    for (p, message) in cases {
        let status = super::validate_attestation(&p).unwrap_err();
        assert_status(&status, tonic::Code::InvalidArgument, message);
    }
    let ok = params("join_token", &[b'a'; 256], csr);
    assert_eq!(super::validate_attestation(&ok).unwrap().token.len(), 256);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banned_and_evicted_agents_are_refused_and_their_streams_close() {
    use sigil::proto::sigil::admin::v1::{AgentIdRequest, ListAgentsRequest};

    let mut s = server().await;
    let (agent, svid) = s.attest().await;
    let id = svid.spiffe_id.clone();
    let named = || AgentIdRequest {
        spiffe_id: id.clone(),
    };
    let mut client = s.agent_client(Some(&agent)).await;
    let mut stream = client
        .sync_entries(SyncEntriesRequest::default())
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();

    let listed = s
        .admin
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].spiffe_id.as_str(),
            listed[0].attestation_type.as_str(),
            listed[0].banned
        ),
        (id.as_str(), "join_token", false)
    );
    let banned_only = ListAgentsRequest {
        by_banned: Some(true),
        ..Default::default()
    };
    let count = |s: &mut Server, req: ListAgentsRequest| {
        let mut admin = s.admin.clone();
        async move { admin.count_agents(req).await.unwrap().into_inner().count }
    };
    assert_eq!(count(&mut s, banned_only.clone()).await, 0);

    // A ban closes the open stream and refuses every call and a new
    // attestation as the same agent.
    let banned = s.admin.ban_agent(named()).await.unwrap().into_inner();
    assert!(banned.banned);
    assert_eq!(count(&mut s, banned_only).await, 1);
    let message = format!("agent {id} is banned");
    let closed = stream.message().await.unwrap_err();
    assert_status(&closed, tonic::Code::PermissionDenied, &message);
    let refused = client
        .sync_entries(SyncEntriesRequest::default())
        .await
        .unwrap_err();
    assert_status(&refused, tonic::Code::PermissionDenied, &message);
    let csr = || {
        let key = PrivateKey::generate_p256().unwrap();
        sigil::x509::build_csr(&key.key_pair().unwrap(), None).unwrap()
    };
    let refused = client
        .renew_agent(RenewAgentRequest { csr: csr() })
        .await
        .unwrap_err();
    assert_status(&refused, tonic::Code::PermissionDenied, &message);
    let refused = client
        .batch_new_x509_svid(BatchNewX509SvidRequest { params: vec![] })
        .await
        .unwrap_err();
    assert_status(&refused, tonic::Code::PermissionDenied, &message);
    let token = s
        .admin
        .create_join_token(CreateJoinTokenRequest {
            agent_id: id.clone(),
            ttl: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let refused = attest_with(
        &mut s.agent_client(None).await,
        "join_token",
        &token.token,
        csr(),
    )
    .await
    .unwrap_err();
    assert_status(&refused, tonic::Code::PermissionDenied, &message);

    // Unbanned, the agent renews and syncs again.
    let unbanned = s.admin.unban_agent(named()).await.unwrap().into_inner();
    assert!(!unbanned.banned);
    client
        .renew_agent(RenewAgentRequest { csr: csr() })
        .await
        .unwrap();
    let mut stream = client
        .sync_entries(SyncEntriesRequest::default())
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();

    // Evicted, its record is gone: the stream closes, calls are refused.
    s.admin.evict_agent(named()).await.unwrap();
    let gone = format!("agent {id} is not attested");
    let closed = stream.message().await.unwrap_err();
    assert_status(&closed, tonic::Code::PermissionDenied, &gone);
    let refused = client
        .sync_entries(SyncEntriesRequest::default())
        .await
        .unwrap_err();
    assert_status(&refused, tonic::Code::PermissionDenied, &gone);
    let not_found = format!("no agent \"{id}\"");
    for status in [
        s.admin.get_agent(named()).await.unwrap_err(),
        s.admin.evict_agent(named()).await.unwrap_err(),
        s.admin.ban_agent(named()).await.unwrap_err(),
    ] {
        assert_status(&status, tonic::Code::NotFound, &not_found);
    }
    s.stop().await;
}
