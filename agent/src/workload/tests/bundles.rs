//! `FetchX509Bundles`.

use super::*;

// === FetchX509Bundles ===

#[tokio::test]
async fn bundles_are_keyed_by_trust_domain_id_and_pushed_on_change() {
    let ca = Ca::new();
    let identity = ca.identity("/web", &own_selectors(), "");
    let server = start(ca.snapshot(vec![Arc::clone(&identity)], 1)).await;
    let mut client = server.client().await;
    let mut stream = client
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();

    let first = stream.message().await.unwrap().unwrap();
    assert!(first.crl.is_empty());
    assert_eq!(first.bundles.len(), 1);
    assert_eq!(
        first.bundles.get("spiffe://example.org"),
        Some(&ca.authority.cert().to_vec())
    );

    // An SVID rotation does not change the bundle: nothing is sent...
    server.publish(ca.snapshot(vec![ca.rotated(&identity)], 2));
    // ...a new CA certificate is.
    let td = TrustDomain::new("example.org").unwrap();
    let next_ca = Authority::self_signed(&td, Duration::from_secs(3600)).unwrap();
    let mut two = X509Bundle::new(td.clone(), vec![ca.authority.cert().clone()]);
    two = X509Bundle::new(
        td.clone(),
        [two.authorities(), &[next_ca.cert().clone()]].concat(),
    );
    server.publish(Arc::new(Snapshot {
        bundle_der: Arc::new(two.to_concatenated_der()),
        bundle: Arc::new(two.clone()),
        federated: Arc::default(),
        identities: vec![identity],
        version: 3,
    }));

    let second = stream.message().await.unwrap().unwrap();
    assert_eq!(
        second.bundles.get("spiffe://example.org"),
        Some(&two.to_concatenated_der())
    );
}

#[tokio::test]
async fn bundles_are_denied_to_callers_without_identity() {
    let ca = Ca::new();
    let server =
        start(ca.snapshot(vec![ca.identity("/web", &uid_selectors(OTHER_UID), "")], 1)).await;
    let mut client = server.client().await;
    let status = match client.fetch_x509_bundles(X509BundlesRequest {}).await {
        Err(status) => status,
        Ok(response) => response.into_inner().message().await.unwrap_err(),
    };
    assert_status(&status, Code::PermissionDenied, NO_IDENTITY);
}
