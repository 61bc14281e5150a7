//! Batches of workload X.509-SVIDs: validated whole, then signed.

use sigil::proto::sigil::agent::v1::{BatchNewX509SvidRequest, X509SvidParams};

use super::*;

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
