//! Banned and evicted agents: refused calls and closed streams.

use sigil::proto::sigil::agent::v1::{
    BatchNewX509SvidRequest, RenewAgentRequest, SyncEntriesRequest,
};

use super::*;

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
            ..Default::default()
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
