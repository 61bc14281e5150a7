//! Node attestation (`AgentApi/Attest`).
//!
//! The agent has no usable SVID, so it connects without a client
//! certificate and verifies the server against a bundle it already trusts.
//! It sends its evidence and a CSR for a new key; for x509pop it then
//! answers the server's challenge. The server answers with the agent SVID
//! and the trust domain's bundle.

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use sigil::TrustDomain;
use sigil::keys::PrivateKey;
use sigil::proto::sigil::agent::v1::agent_api_client::AgentApiClient;
use sigil::proto::sigil::agent::v1::{
    AgentSvid, AttestRequest, AttestationParams, attest_request, attest_response,
};
use sigil::tls::TrustStore;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Evidence, NodeError, NodeIdentity, bundle_from_proto};
use crate::client;

/// Most challenges answered in one attestation.
const MAX_CHALLENGES: usize = 4;

/// Attests to the server at `address` with `evidence`, verifying the server
/// against `trust`, and returns the checked agent identity.
pub(crate) async fn attest(
    address: &str,
    td: &TrustDomain,
    trust: Arc<TrustStore>,
    evidence: &Evidence,
) -> Result<NodeIdentity, NodeError> {
    let connect_error = |detail: String| NodeError::Connect {
        address: address.to_owned(),
        detail,
    };
    let tls = client::tls_config(td, trust, None)?;
    let channel = client::connect(address, tls)
        .await
        .map_err(|e| connect_error(client::error_chain(&e)))?;
    let mut api = AgentApiClient::new(channel);

    let key = PrivateKey::generate_p256().map_err(|e| NodeError::Crypto(e.to_string()))?;
    let pair = key
        .key_pair()
        .map_err(|e| NodeError::Crypto(e.to_string()))?;
    let csr = sigil::x509::build_csr(&pair, None).map_err(|e| NodeError::Crypto(e.to_string()))?;

    // The request stream stays open until the server has answered, so that
    // challenges can be answered on it.
    let (requests, rx) = mpsc::channel(2);
    let params = AttestRequest {
        step: Some(attest_request::Step::Params(AttestationParams {
            data: Some(evidence.data.clone()),
            csr,
        })),
    };
    let closed = || NodeError::InvalidAnswer("the attestation stream closed".into());
    requests.send(params).await.map_err(|_| closed())?;

    let status_error = |status: tonic::Status| {
        if client::is_transport_failure(&status) {
            connect_error(client::describe_status(&status))
        } else if status.message().is_empty() {
            NodeError::AttestationRefused(format!("{:?}", status.code()))
        } else {
            NodeError::AttestationRefused(status.message().to_owned())
        }
    };
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.set_timeout(client::CALL_TIMEOUT);
    let mut answers = api
        .attest(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut challenges = 0;
    let svid = loop {
        let answer = answers
            .message()
            .await
            .map_err(status_error)?
            .ok_or_else(|| {
                NodeError::InvalidAnswer("the server ended attestation without an SVID".into())
            })?;
        match answer.step {
            Some(attest_response::Step::Result(svid)) => break svid,
            Some(attest_response::Step::Challenge(challenge)) => {
                let Some(prover) = &evidence.prover else {
                    return Err(NodeError::InvalidAnswer(format!(
                        "the server sent a challenge, which {} attestation does not have",
                        evidence.data.r#type
                    )));
                };
                challenges += 1;
                if challenges > MAX_CHALLENGES {
                    return Err(NodeError::InvalidAnswer(
                        "the server sent too many challenges".into(),
                    ));
                }
                let response = AttestRequest {
                    step: Some(attest_request::Step::ChallengeResponse(
                        prover.answer(&challenge)?,
                    )),
                };
                requests.send(response).await.map_err(|_| closed())?;
            }
            None => {
                return Err(NodeError::InvalidAnswer(
                    "an attestation answer without a step".into(),
                ));
            }
        }
    };
    drop(requests);
    identity_from_answer(svid, key, td)
}

/// Checks the server's answer and pairs it with the key.
fn identity_from_answer(
    svid: AgentSvid,
    key: PrivateKey,
    td: &TrustDomain,
) -> Result<NodeIdentity, NodeError> {
    let bundle = svid
        .bundle
        .as_ref()
        .ok_or_else(|| NodeError::InvalidAnswer("no bundle in the agent SVID".into()))
        .and_then(|b| bundle_from_proto(b, td).map_err(NodeError::InvalidAnswer))?;
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let identity = NodeIdentity::new(td, chain, key, bundle)
        .map_err(|e| NodeError::InvalidAnswer(format!("agent SVID: {e}")))?;
    if identity.spiffe_id.as_str() != svid.spiffe_id {
        return Err(NodeError::InvalidAnswer(format!(
            "agent SVID: the certificate is for {} but the answer names {:?}",
            identity.spiffe_id, svid.spiffe_id
        )));
    }
    Ok(identity)
}
