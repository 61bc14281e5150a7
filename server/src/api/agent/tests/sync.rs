//! The entry sync stream: the diff, the pushes, and its end at shutdown.

use sigil::proto::sigil::admin::v1::BatchDeleteEntryRequest;
use sigil::proto::sigil::agent::v1::SyncEntriesRequest;

use super::*;

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
