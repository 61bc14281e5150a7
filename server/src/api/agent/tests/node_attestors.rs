//! Attestation with the x509pop and k8s_psat node attestors.

use super::*;

/// The issuer of the k8s_psat tokens the test server accepts.
const PSAT_ISSUER: &str = "https://k8s.test";

/// A server trusting `ca` for x509pop, and accepting k8s_psat tokens of
/// `issuer` (named [`PSAT_ISSUER`]) in clusters `prod` and `prod-b`, which
/// share that issuer.
async fn attesting_server(
    ca: &crate::attest::testing::NodeCa,
    issuer: &crate::attest::testing::TokenIssuer,
) -> Server {
    use crate::config::{K8sPsatClusterConfig, K8sPsatConfig, K8sPsatKeys, X509PopConfig};
    server_with(NodeAttestorsConfig {
        x509pop: Some(X509PopConfig {
            ca_bundle_path: "node-ca.pem".into(),
            ca_certs: vec![ca.cert.clone()],
            agent_path_template: crate::attest::x509pop::DEFAULT_PATH_TEMPLATE.into(),
        }),
        k8s_psat: Some(K8sPsatConfig {
            clusters: ["prod", "prod-b"]
                .map(|name| {
                    let cluster = K8sPsatClusterConfig {
                        audience: "sigil-server".into(),
                        keys: K8sPsatKeys::Jwks {
                            path: "jwks.json".into(),
                            jwks: serde_json::from_str(&issuer.jwks()).unwrap(),
                            issuer: PSAT_ISSUER.into(),
                        },
                        allowed_service_accounts: ["sigil:sigil-agent".to_owned()].into(),
                    };
                    (name.to_owned(), cluster)
                })
                .into(),
        }),
    })
    .await
}

/// Opens an x509pop attestation: sends the chain, returns the request
/// sender, the response stream and the challenge.
async fn x509pop_challenge(
    client: &mut AgentApiClient<Channel>,
    node: &crate::attest::testing::NodeCert,
) -> (
    tokio::sync::mpsc::Sender<AttestRequest>,
    tonic::Streaming<sigil::proto::sigil::agent::v1::AttestResponse>,
    Vec<u8>,
) {
    use prost::Message as _;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let key = PrivateKey::generate_p256().unwrap();
    let payload = sigil::proto::sigil::agent::v1::X509PopAttestation {
        cert_chain: vec![node.cert.to_vec()],
    }
    .encode_to_vec();
    tx.send(AttestRequest {
        step: Some(attest_request::Step::Params(params(
            "x509pop",
            &payload,
            sigil::x509::build_csr(&key.key_pair().unwrap(), None).unwrap(),
        ))),
    })
    .await
    .unwrap();
    let mut answers = client
        .attest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let challenge = match answers.message().await.unwrap().unwrap().step {
        Some(attest_response::Step::Challenge(c)) => c,
        other => panic!("expected a challenge, got {other:?}"),
    };
    (tx, answers, challenge)
}

fn respond(signature: Vec<u8>) -> AttestRequest {
    AttestRequest {
        step: Some(attest_request::Step::ChallengeResponse(signature)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509pop_attests_over_the_stream_and_refuses_a_wrong_proof() {
    use crate::attest::testing::{NodeCa, TokenIssuer};
    use crate::attest::x509pop::{fingerprint, signed_message};
    use sigil::proto::sigil::admin::v1::AgentIdRequest;

    let ca = NodeCa::root("Node CA");
    let mut s = attesting_server(&ca, &TokenIssuer::new("k1")).await;
    let node = ca.issue("node1");
    let mut client = s.agent_client(None).await;

    let (tx, mut answers, challenge) = x509pop_challenge(&mut client, &node).await;
    assert_eq!(challenge.len(), 32);
    tx.send(respond(node.sign(&signed_message(&challenge, &node.cert))))
        .await
        .unwrap();
    let svid = match answers.message().await.unwrap().unwrap().step {
        Some(attest_response::Step::Result(svid)) => svid,
        other => panic!("expected the SVID, got {other:?}"),
    };
    let id = format!(
        "spiffe://example.org/sigil/agent/x509pop/{}",
        fingerprint(&node.cert)
    );
    assert_eq!(svid.spiffe_id, id);
    assert_eq!(
        sigil::x509::check_leaf(&svid.cert_chain[0])
            .unwrap()
            .as_str(),
        id
    );
    let record = s
        .admin
        .get_agent(AgentIdRequest {
            spiffe_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.attestation_type, "x509pop");
    let selectors: Vec<String> = record
        .selectors
        .iter()
        .map(|s| format!("{}:{}", s.r#type, s.value))
        .collect();
    assert!(
        selectors.contains(&"x509pop:subject:cn:node1".to_owned()),
        "{selectors:?}"
    );

    // A proof by another key: refused, naming the field.
    let impostor = ca.issue("node1");
    let (tx, mut answers, challenge) = x509pop_challenge(&mut client, &node).await;
    tx.send(respond(
        impostor.sign(&signed_message(&challenge, &node.cert)),
    ))
    .await
    .unwrap();
    let status = answers.message().await.unwrap_err();
    assert_status(
        &status,
        tonic::Code::PermissionDenied,
        "challenge_response: the signature does not verify with the key of the node certificate",
    );

    // A banned node stays refused, even with a valid proof.
    s.admin
        .ban_agent(AgentIdRequest {
            spiffe_id: id.clone(),
        })
        .await
        .unwrap();
    let (tx, mut answers, challenge) = x509pop_challenge(&mut client, &node).await;
    tx.send(respond(node.sign(&signed_message(&challenge, &node.cert))))
        .await
        .unwrap();
    let status = answers.message().await.unwrap_err();
    assert_status(
        &status,
        tonic::Code::PermissionDenied,
        &format!("agent {id} is banned"),
    );
    s.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_challenge_times_out() {
    use crate::attest::testing::{NodeCa, TokenIssuer};
    let ca = NodeCa::root("Node CA");
    let mut s = attesting_server(&ca, &TokenIssuer::new("k1")).await;
    let node = ca.issue("node1");
    let mut client = s.agent_client(None).await;
    let (_tx, mut answers, _challenge) = x509pop_challenge(&mut client, &node).await;
    let status = answers.message().await.unwrap_err();
    assert_status(
        &status,
        tonic::Code::DeadlineExceeded,
        "challenge_response: not received within 30 s",
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_k8s_psat_token_attests_its_agent_again_but_no_other_agent() {
    use crate::attest::testing::{NodeCa, TokenIssuer, psat_claims};
    use prost::Message as _;
    use sigil::proto::sigil::admin::v1::ListAgentsRequest;

    let issuer = TokenIssuer::new("k1");
    let mut s = attesting_server(&NodeCa::root("Node CA"), &issuer).await;
    let mut client = s.agent_client(None).await;
    let token = issuer.sign(&psat_claims(PSAT_ISSUER, "sigil-server", "agent-x1", "n-1"));
    let payload = |cluster: &str| {
        sigil::proto::sigil::agent::v1::K8sPsatAttestation {
            cluster: cluster.into(),
            token: token.clone(),
        }
        .encode_to_vec()
    };
    let csr = || {
        let key = PrivateKey::generate_p256().unwrap();
        sigil::x509::build_csr(&key.key_pair().unwrap(), None).unwrap()
    };
    let attest = |client: &mut AgentApiClient<Channel>, payload: Vec<u8>| {
        let request = AttestRequest {
            step: Some(attest_request::Step::Params(params(
                "k8s_psat",
                &payload,
                csr(),
            ))),
        };
        let mut client = client.clone();
        async move {
            let mut stream = client
                .attest(tokio_stream::once(request))
                .await?
                .into_inner();
            match stream.message().await?.and_then(|m| m.step) {
                Some(attest_response::Step::Result(svid)) => Ok(svid),
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    let svid = attest(&mut client, payload("prod")).await.unwrap();
    let agent_id = "spiffe://example.org/sigil/agent/k8s_psat/prod/n-1";
    assert_eq!(svid.spiffe_id, agent_id);
    // The same agent may attest again with its token (its pod restarted).
    let again = attest(&mut client, payload("prod")).await.unwrap();
    assert_eq!(again.spiffe_id, agent_id);

    // Cluster prod-b trusts the same issuer, so the token verifies there
    // too, for agent .../prod-b/n-1: refused, as the token is spent.
    let status = attest(&mut client, payload("prod-b")).await.unwrap_err();
    assert_status(
        &status,
        tonic::Code::PermissionDenied,
        "params.data.payload: token already used",
    );
    let agents: Vec<String> = s
        .admin
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents
        .into_iter()
        .map(|a| a.spiffe_id)
        .collect();
    assert_eq!(agents, [agent_id]);

    // Another pod's token, naming the same node, attests the prod-b agent.
    let fresh = issuer.sign(&psat_claims(PSAT_ISSUER, "sigil-server", "agent-x2", "n-1"));
    let fresh_payload = sigil::proto::sigil::agent::v1::K8sPsatAttestation {
        cluster: "prod-b".into(),
        token: fresh,
    }
    .encode_to_vec();
    let svid = attest(&mut client, fresh_payload).await.unwrap();
    assert_eq!(
        svid.spiffe_id,
        "spiffe://example.org/sigil/agent/k8s_psat/prod-b/n-1"
    );

    let status = attest(&mut client, payload("dev")).await.unwrap_err();
    assert_status(
        &status,
        tonic::Code::PermissionDenied,
        "params.data.payload: cluster \"dev\" is not configured on this server",
    );
    s.stop().await;
}
