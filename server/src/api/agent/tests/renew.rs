//! Renewal of the agent SVID, and which agent SVIDs calls are accepted with.

use sigil::proto::sigil::agent::v1::RenewAgentRequest;

use super::*;

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
