//! The x509pop proof of possession, checked by the real server against a
//! client that speaks the agent API itself (the agent binary refuses to
//! start with a key that does not match its certificate): a proof by
//! another key, a proof recorded from an earlier stream, and extra answers
//! on one stream are refused, and no agent is recorded for them.

use std::sync::Arc;

use prost::Message as _;
use rcgen::{KeyPair, SigningKey as _};
use sigil::bundle::X509Bundle;
use sigil::proto::sigil::agent::v1::agent_api_client::AgentApiClient;
use sigil::proto::sigil::agent::v1::{
    AgentSvid, AttestRequest, AttestResponse, AttestationData, AttestationParams,
    X509PopAttestation, attest_request, attest_response,
};
use sigil::tls::{SpiffeServerVerifier, TrustStore};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

use crate::node_attestation::{X509Fleet, hex, sha1_hex};
use crate::support::*;

/// The refusal of a proof that is not a signature of this stream's
/// challenge by the node certificate's key.
const BAD_PROOF: &str =
    "challenge_response: the signature does not verify with the key of the node certificate";

/// A node certificate and its key, presented by a hand-made agent.
struct Node {
    cert: Vec<u8>,
    key: KeyPair,
    agent_id: String,
}

impl Node {
    fn issued(fleet: &X509Fleet, cn: &str) -> Self {
        let (_, cert, key) = fleet.ca.issue(cn);
        Self {
            agent_id: format!("spiffe://{TD}/sigil/agent/x509pop/{}", sha1_hex(&cert)),
            cert,
            key: KeyPair::from_pem(&key).unwrap(),
        }
    }

    /// What an honest agent answers: the challenge and the SHA-256 of the
    /// certificate, signed by `key`.
    fn proof(&self, key: &KeyPair, challenge: &[u8]) -> Vec<u8> {
        let mut message = challenge.to_vec();
        message.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, &self.cert).as_ref());
        key.sign(&message).unwrap()
    }
}

/// An agent API client with no client certificate, verifying the server
/// with the bundle, as an agent that has not attested yet.
fn unattested_client(server: &Server) -> AgentApiClient<Channel> {
    let td = sigil::TrustDomain::new(TD).unwrap();
    let pem = tokio::task::block_in_place(|| server.bundle_pem());
    let bundle = X509Bundle::from_pem(td.clone(), pem.as_bytes()).unwrap();
    let verifier = Arc::new(SpiffeServerVerifier::new(
        Arc::new(TrustStore::new(&bundle).unwrap()),
        td.id_with_path("/sigil/server").unwrap(),
    ));
    let config = Arc::new(sigil::tls::client_config(verifier, None).unwrap());
    AgentApiClient::new(sigil::transport::tls_channel(&server.address, config))
}

/// An `Attest` stream past its first message: the server sent a challenge.
struct Attempt {
    requests: mpsc::Sender<AttestRequest>,
    answers: tonic::Streaming<AttestResponse>,
    challenge: Vec<u8>,
}

impl Attempt {
    /// Sends `node`'s certificate and a CSR; waits for the challenge.
    async fn open(client: &mut AgentApiClient<Channel>, node: &Node) -> Self {
        let (requests, rx) = mpsc::channel(4);
        let csr = sigil::x509::build_csr(&KeyPair::generate().unwrap(), None).unwrap();
        let params = AttestationParams {
            data: Some(AttestationData {
                r#type: "x509pop".into(),
                payload: X509PopAttestation {
                    cert_chain: vec![node.cert.clone()],
                }
                .encode_to_vec(),
            }),
            csr,
        };
        requests
            .send(AttestRequest {
                step: Some(attest_request::Step::Params(params)),
            })
            .await
            .unwrap();
        let mut answers = client
            .attest(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let challenge = match answers.message().await.unwrap().and_then(|m| m.step) {
            Some(attest_response::Step::Challenge(challenge)) => challenge,
            other => panic!("expected a challenge, got {other:?}"),
        };
        assert_eq!(challenge.len(), 32);
        Self {
            requests,
            answers,
            challenge,
        }
    }

    async fn answer(&self, proof: Vec<u8>) {
        self.requests
            .send(AttestRequest {
                step: Some(attest_request::Step::ChallengeResponse(proof)),
            })
            .await
            .unwrap();
    }

    /// The server's next message: must be the agent SVID.
    async fn svid(&mut self) -> AgentSvid {
        match self.answers.message().await.unwrap().and_then(|m| m.step) {
            Some(attest_response::Step::Result(svid)) => svid,
            other => panic!("expected the agent SVID, got {other:?}"),
        }
    }

    /// The server's next message: must be the refusal of a bad proof.
    async fn assert_refused(&mut self) {
        let status = self.answers.message().await.unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::PermissionDenied, BAD_PROOF),
            "{status:?}"
        );
    }
}

fn agent_count(server: &Server) -> String {
    tokio::task::block_in_place(|| server.cli_ok(&["agent", "count"]))
}

/// The recorded serial of the agent's current SVID.
fn recorded_serial(server: &Server, agent_id: &str) -> String {
    let shown = tokio::task::block_in_place(|| {
        server.cli_ok(&["agent", "show", "--spiffe-id", agent_id, "--output", "json"])
    });
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    shown["serial"].as_str().unwrap().to_owned()
}

fn serial_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    hex(cert.raw_serial())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_signed_by_another_key_is_refused_and_records_no_agent() {
    let fleet = tokio::task::block_in_place(X509Fleet::start);
    let node = Node::issued(&fleet, "node-x");
    let mut client = unattested_client(&fleet.server);

    // The trusted certificate, but the challenge signed by a key of the
    // attacker's: the message signed is otherwise the honest one.
    let other_key = KeyPair::generate().unwrap();
    let mut attempt = Attempt::open(&mut client, &node).await;
    attempt
        .answer(node.proof(&other_key, &attempt.challenge))
        .await;
    attempt.assert_refused().await;

    // The node's key over another certificate's digest fails the same way.
    let other = Node::issued(&fleet, "node-y");
    let mut attempt = Attempt::open(&mut client, &node).await;
    attempt
        .answer(other.proof(&node.key, &attempt.challenge))
        .await;
    attempt.assert_refused().await;

    assert_eq!(agent_count(&fleet.server), "0 agents\n");
    let log = fleet.server.log();
    assert!(log.contains("x509pop proof of possession refused"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_recorded_from_an_earlier_stream_is_refused() {
    let fleet = tokio::task::block_in_place(X509Fleet::start);
    let node = Node::issued(&fleet, "node-r");
    let mut client = unattested_client(&fleet.server);

    // An honest attestation, whose answer an eavesdropper records.
    let mut first = Attempt::open(&mut client, &node).await;
    let recorded = node.proof(&node.key, &first.challenge);
    first.answer(recorded.clone()).await;
    let svid = first.svid().await;
    assert_eq!(svid.spiffe_id, node.agent_id);
    assert_eq!(
        sigil::x509::spiffe_id_of(&svid.cert_chain[0])
            .unwrap()
            .as_str(),
        node.agent_id
    );
    assert!(first.answers.message().await.unwrap().is_none());
    assert_eq!(agent_count(&fleet.server), "1 agent\n");
    let serial = serial_of(&svid.cert_chain[0]);
    assert_eq!(recorded_serial(&fleet.server, &node.agent_id), serial);

    // Replayed on a new stream, with the same certificate: the challenge
    // is new, so the recorded answer does not prove anything.
    let mut replay = Attempt::open(&mut client, &node).await;
    assert_ne!(replay.challenge, first.challenge);
    replay.answer(recorded).await;
    replay.assert_refused().await;

    // No SVID was signed for the replay: the record keeps the first one.
    assert_eq!(agent_count(&fleet.server), "1 agent\n");
    assert_eq!(recorded_serial(&fleet.server, &node.agent_id), serial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_first_answer_on_a_stream_counts() {
    let fleet = tokio::task::block_in_place(X509Fleet::start);
    let node = Node::issued(&fleet, "node-f");
    let mut client = unattested_client(&fleet.server);

    // A wrong answer, then the right one on the same stream: no second try.
    let mut attempt = Attempt::open(&mut client, &node).await;
    let other_key = KeyPair::generate().unwrap();
    attempt
        .answer(node.proof(&other_key, &attempt.challenge))
        .await;
    attempt
        .answer(node.proof(&node.key, &attempt.challenge))
        .await;
    attempt.assert_refused().await;
    assert_eq!(agent_count(&fleet.server), "0 agents\n");

    // The right answer, then another: one SVID, then the stream ends.
    let mut attempt = Attempt::open(&mut client, &node).await;
    attempt
        .answer(node.proof(&node.key, &attempt.challenge))
        .await;
    attempt
        .answer(node.proof(&node.key, &attempt.challenge))
        .await;
    let svid = attempt.svid().await;
    assert_eq!(svid.spiffe_id, node.agent_id);
    assert!(attempt.answers.message().await.unwrap().is_none());
    assert_eq!(agent_count(&fleet.server), "1 agent\n");
    assert_eq!(
        recorded_serial(&fleet.server, &node.agent_id),
        serial_of(&svid.cert_chain[0])
    );
}
