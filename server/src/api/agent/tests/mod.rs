//! The agent API end to end within the process: a real server on a
//! loopback port with TLS, and real clients.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use sigil::bundle::X509Bundle;
use sigil::keys::PrivateKey;
use sigil::proto::sigil::admin::v1::admin_client::AdminClient;
use sigil::proto::sigil::admin::v1::{
    BatchCreateEntryRequest, CreateJoinTokenRequest, GetBundleRequest,
};
use sigil::proto::sigil::agent::v1::agent_api_client::AgentApiClient;
use sigil::proto::sigil::agent::v1::{
    AgentSvid, AttestRequest, AttestationData, AttestationParams, attest_request, attest_response,
};
use sigil::proto::sigil::types::v1 as pb;
use sigil::tls::{SpiffeServerVerifier, SvidResolver, TrustStore};
use sigil::{SpiffeId, TrustDomain};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::cli::client;
use crate::config::{Config, NodeAttestorsConfig, RunArgs};
use crate::serve::{self, Running};

mod attest;
mod ban;
mod issue;
mod node_attestors;
mod renew;
mod sync;

struct Server {
    running: Option<Running>,
    addr: SocketAddr,
    admin: AdminClient<Channel>,
    bundle: X509Bundle,
    _dir: tempfile::TempDir,
}

async fn server() -> Server {
    server_with(NodeAttestorsConfig::default()).await
}

async fn server_with(node_attestors: NodeAttestorsConfig) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let socket: PathBuf = dir.path().join("admin/admin.sock");
    let args = RunArgs {
        trust_domain: Some("example.org".into()),
        bind_address: Some("127.0.0.1:0".into()),
        admin_socket_path: Some(socket.display().to_string()),
        data_dir: Some(dir.path().join("data").display().to_string()),
        ..RunArgs::default()
    };
    let config = Config {
        node_attestors,
        ..crate::config::from_sources(&args, None).unwrap()
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

fn params(kind: &str, payload: &[u8], csr: Vec<u8>) -> AttestationParams {
    AttestationParams {
        data: Some(AttestationData {
            r#type: kind.into(),
            payload: payload.to_vec(),
        }),
        csr,
    }
}
