//! `FetchX509SVID`: the first message, matching, rotation, refusals and
//! the end of streams.

use super::*;

// === FetchX509SVID ===

#[tokio::test]
async fn the_first_message_holds_the_callers_svid_key_and_bundle() {
    let ca = Ca::new();
    let identity = ca.identity("/web", &own_selectors(), "internal");
    let svid = Arc::clone(identity.svid.as_ref().unwrap());
    let server = start(ca.snapshot(vec![identity], 1)).await;
    let mut client = server.client().await;

    let response = next_x509(&mut open_x509(&mut client).await).await;
    assert_eq!(response.svids.len(), 1);
    assert!(response.crl.is_empty());
    assert!(response.federated_bundles.is_empty());
    let got = &response.svids[0];
    assert_eq!(got.spiffe_id, "spiffe://example.org/web");
    assert_eq!(got.hint, "internal");
    assert_eq!(
        sigil::x509::check_leaf(&got.x509_svid).unwrap().to_string(),
        "spiffe://example.org/web"
    );
    assert_eq!(got.x509_svid, svid.chain_der);
    assert_eq!(got.bundle, ca.authority.cert().to_vec());
    sigil::x509::check_ca(&got.bundle).unwrap();

    let key = PrivateKey::from_pkcs8_der(got.x509_svid_key.clone()).unwrap();
    assert_eq!(
        key.key_pair().unwrap().public_key_raw(),
        leaf_public_key(&got.x509_svid).as_slice(),
        "the key is the leaf's"
    );
}

#[tokio::test]
async fn only_matching_entries_are_served_in_snapshot_order() {
    let ca = Ca::new();
    let mine = own_selectors();
    let mut mine_and_more = mine.clone();
    mine_and_more.insert(Selector::new("unix", "gid:4000000000").unwrap());
    let server = start(ca.snapshot(
        vec![
            ca.identity("/other", &uid_selectors(OTHER_UID), ""),
            ca.identity("/first", &mine, ""),
            ca.identity("/needs-more", &mine_and_more, ""),
            ca.identity("/second", &mine, ""),
        ],
        1,
    ))
    .await;
    let mut client = server.client().await;

    let response = next_x509(&mut open_x509(&mut client).await).await;
    let ids: Vec<&str> = response
        .svids
        .iter()
        .map(|s| s.spiffe_id.as_str())
        .collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/first", "spiffe://example.org/second"]
    );
}

#[tokio::test]
async fn a_rotated_svid_is_pushed_on_the_open_stream() {
    let ca = Ca::new();
    let identity = ca.identity("/web", &own_selectors(), "");
    let server = start(ca.snapshot(vec![Arc::clone(&identity)], 1)).await;
    let mut client = server.client().await;
    let mut stream = open_x509(&mut client).await;
    let first = next_x509(&mut stream).await;

    // A new snapshot that changes nothing for this caller sends nothing...
    let unrelated = ca.identity("/other", &uid_selectors(OTHER_UID), "");
    server.publish(ca.snapshot(vec![Arc::clone(&identity), Arc::clone(&unrelated)], 2));
    // ...so the next message is the rotation.
    let rotated = ca.rotated(&identity);
    let new_serial = serial_of(&rotated.svid.as_ref().unwrap().chain_der);
    server.publish(ca.snapshot(vec![rotated, unrelated], 3));

    let second = next_x509(&mut stream).await;
    assert_eq!(second.svids.len(), 1);
    assert_eq!(second.svids[0].spiffe_id, "spiffe://example.org/web");
    assert_eq!(serial_of(&second.svids[0].x509_svid), new_serial);
    assert_ne!(
        serial_of(&first.svids[0].x509_svid),
        new_serial,
        "a new certificate"
    );
    assert_ne!(first.svids[0].x509_svid_key, second.svids[0].x509_svid_key);
}

#[tokio::test]
async fn a_caller_matching_no_entry_gets_no_identity() {
    let ca = Ca::new();
    let server =
        start(ca.snapshot(vec![ca.identity("/web", &uid_selectors(OTHER_UID), "")], 1)).await;
    let mut client = server.client().await;
    assert_status(
        &x509_refusal(&mut client).await,
        Code::PermissionDenied,
        NO_IDENTITY,
    );
}

#[tokio::test]
async fn an_open_stream_ends_with_permission_denied_when_the_identity_goes() {
    let ca = Ca::new();
    let server = start(ca.snapshot(vec![ca.identity("/web", &own_selectors(), "")], 1)).await;
    let mut client = server.client().await;
    let mut stream = open_x509(&mut client).await;
    next_x509(&mut stream).await;

    server.publish(ca.snapshot(vec![ca.identity("/web", &uid_selectors(OTHER_UID), "")], 2));
    let status = stream.message().await.unwrap_err();
    assert_status(&status, Code::PermissionDenied, NO_IDENTITY);
}

#[tokio::test]
async fn a_caller_waits_for_an_svid_not_signed_yet() {
    let ca = Ca::new();
    let pending = ca.pending_identity("/web", &own_selectors());
    let server = start(ca.snapshot(vec![Arc::clone(&pending)], 1)).await;
    let mut client = server.client().await;
    let mut stream = open_x509(&mut client).await;

    server.publish(ca.snapshot(vec![ca.rotated(&pending)], 2));
    let response = next_x509(&mut stream).await;
    assert_eq!(response.svids[0].spiffe_id, "spiffe://example.org/web");
}

#[tokio::test]
async fn streams_end_with_unavailable_when_the_snapshot_sender_goes() {
    let ca = Ca::new();
    let mut server = start(ca.snapshot(vec![ca.identity("/web", &own_selectors(), "")], 1)).await;
    let mut client = server.client().await;
    let mut stream = open_x509(&mut client).await;
    next_x509(&mut stream).await;

    let (replacement, _) = watch::channel(ca.snapshot(vec![], 0));
    drop(std::mem::replace(&mut server.snapshots, replacement));
    let status = stream.message().await.unwrap_err();
    assert_status(&status, Code::Unavailable, SHUTTING_DOWN);
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_removes_the_socket() {
    let ca = Ca::new();
    let server = start(ca.snapshot(vec![ca.identity("/web", &own_selectors(), "")], 1)).await;
    let socket = server.socket.clone();
    let mut client = server.client().await;
    let mut stream = open_x509(&mut client).await;
    next_x509(&mut stream).await;

    let (stopped, status) = tokio::join!(server.stop(), stream.message());
    stopped.unwrap();
    assert_status(&status.unwrap_err(), Code::Unavailable, SHUTTING_DOWN);
    assert!(!socket.exists());
}

#[tokio::test]
async fn a_cancelled_stream_releases_its_resources() {
    let ca = Ca::new();
    let server = start(ca.snapshot(vec![ca.identity("/web", &own_selectors(), "")], 1)).await;
    let idle = server.snapshots.receiver_count();
    let mut client = server.client().await;
    let mut stream = open_x509(&mut client).await;
    next_x509(&mut stream).await;
    assert_eq!(server.snapshots.receiver_count(), idle + 1);

    drop(stream);
    // The server learns of the cancellation asynchronously (RST_STREAM);
    // there is nothing to wait on but the count itself.
    tokio::time::timeout(Duration::from_secs(5), async {
        while server.snapshots.receiver_count() > idle {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the stream's receiver was dropped");
}
