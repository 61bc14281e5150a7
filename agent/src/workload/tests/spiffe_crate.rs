//! The Rust `spiffe` crate as a client.

use super::*;

// === the Rust `spiffe` crate as a client ===

#[tokio::test]
async fn the_spiffe_crate_fetches_the_x509_context() {
    let ca = Ca::new();
    let server = start(ca.snapshot(
        vec![
            ca.identity("/web", &own_selectors(), "internal"),
            ca.identity("/db", &own_selectors(), "db"),
        ],
        1,
    ))
    .await;
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix:{}", server.socket.display()))
        .await
        .unwrap();

    let context = client.fetch_x509_context().await.unwrap();
    let default = context.default_svid().unwrap();
    assert_eq!(default.spiffe_id().to_string(), "spiffe://example.org/web");
    assert_eq!(default.hint(), Some("internal"));
    assert_eq!(context.svids().len(), 2);
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let bundle = context.bundle_set().get(&td).unwrap();
    assert_eq!(
        bundle.authorities()[0].as_ref(),
        ca.authority.cert().as_ref()
    );

    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(bundles.get(&td).is_some());
}

#[tokio::test]
async fn the_spiffe_crate_recognizes_no_identity() {
    let ca = Ca::new();
    let server =
        start(ca.snapshot(vec![ca.identity("/web", &uid_selectors(OTHER_UID), "")], 1)).await;
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix:{}", server.socket.display()))
        .await
        .unwrap();
    let err = client.fetch_x509_svid().await.unwrap_err();
    assert!(
        matches!(err, spiffe::WorkloadApiError::NoIdentityIssued),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_x509_source_follows_rotation() {
    let ca = Ca::new();
    let identity = ca.identity("/web", &own_selectors(), "");
    let server = start(ca.snapshot(vec![Arc::clone(&identity)], 1)).await;
    let source = spiffe::X509Source::builder()
        .endpoint(format!("unix:{}", server.socket.display()))
        .build()
        .await
        .unwrap();
    let first = source.svid().unwrap();
    assert_eq!(first.spiffe_id().to_string(), "spiffe://example.org/web");

    let mut updates = source.updated();
    let rotated = ca.rotated(&identity);
    let new_chain = rotated.svid.as_ref().unwrap().chain_der.clone();
    server.publish(ca.snapshot(vec![rotated], 2));
    tokio::time::timeout(Duration::from_secs(10), updates.changed())
        .await
        .unwrap()
        .unwrap();
    let second = source.svid().unwrap();
    assert_eq!(second.leaf().as_ref(), new_chain.as_slice());
}
