//! The Workload API service's streams and responses: pending and vanished
//! callers, shutdown, shared responses, hints, federated bundles and the
//! security header.

use tokio_stream::StreamExt;

use futures::FutureExt;

use super::*;
use crate::cache::Identity;
use crate::workload::tests::{Ca, own_selectors};

#[tokio::test(start_paused = true)]
async fn a_caller_whose_svid_does_not_come_is_denied_after_the_wait() {
    let ca = Ca::new();
    let pending = ca.pending_identity("/web", &own_selectors());
    let (_tx, rx) = watch::channel(ca.snapshot(vec![pending], 1));
    let (_stop_tx, stop_rx) = watch::channel(false);
    let feed = X509SvidFeed {
        selectors: own_selectors(),
        responses: Arc::default(),
    };

    let started = Instant::now();
    let mut stream = Box::pin(drive(feed, rx, stop_rx));
    let status = stream.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(status.message(), NO_IDENTITY);
    assert_eq!(started.elapsed(), PENDING_WAIT);
    assert!(stream.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn an_svid_that_comes_within_the_wait_is_sent() {
    let ca = Ca::new();
    let pending = ca.pending_identity("/web", &own_selectors());
    let (tx, rx) = watch::channel(ca.snapshot(vec![pending], 1));
    let (_stop_tx, stop_rx) = watch::channel(false);
    let feed = X509SvidFeed {
        selectors: own_selectors(),
        responses: Arc::default(),
    };
    let mut stream = Box::pin(drive(feed, rx, stop_rx));

    let ready = ca.identity("/web", &own_selectors(), "");
    let sender = async {
        tokio::time::sleep(PENDING_WAIT - Duration::from_secs(1)).await;
        tx.send_replace(ca.snapshot(vec![ready], 2));
    };
    let (first, ()) = tokio::join!(stream.next(), sender);
    let response = first.unwrap().unwrap();
    assert_eq!(response.svids.len(), 1);
    assert_eq!(response.svids[0].spiffe_id, "spiffe://example.org/web");
}

#[tokio::test]
async fn the_stopping_signal_ends_streams_with_unavailable() {
    let ca = Ca::new();
    let identity = ca.identity("/web", &own_selectors(), "");
    let (_tx, rx) = watch::channel(ca.snapshot(vec![identity], 1));
    let (stop_tx, stop_rx) = watch::channel(false);
    let feed = X509BundlesFeed {
        selectors: own_selectors(),
    };
    let mut stream = Box::pin(drive(feed, rx, stop_rx));
    stream.next().await.unwrap().unwrap();
    stop_tx.send_replace(true);
    let status = stream.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(status.message(), SHUTTING_DOWN);
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn a_caller_without_peer_credentials_is_unavailable() {
    let ca = Ca::new();
    let identity = ca.identity("/web", &own_selectors(), "");
    let (_tx, rx) = watch::channel(ca.snapshot(vec![identity], 1));
    let (_stop_tx, stop_rx) = watch::channel(false);
    let api = WorkloadApi::new(rx, stop_rx, Arc::new(Attestor::default()));
    // No UdsConnectInfo in the request: not a Unix socket caller.
    let Err(status) = api.fetch_x509svid(Request::new(X509svidRequest {})).await else {
        panic!("served a caller without credentials");
    };
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(status.message(), ATTESTATION_FAILED);
}

#[test]
fn a_container_not_yet_listed_is_unavailable_and_a_vanished_caller_denied() {
    let peer = Peer {
        pid: 42,
        uid: 1000,
        gid: 1000,
    };
    let not_listed = AttestError::K8s(crate::workload::attestor::K8sError::NotListed {
        pod_uid: "7d2a6c3e-91b4-4f0a-8e5d-2b1c9a8f7e6d".into(),
        container_id: "3f4b".into(),
    });
    let status = attest_error_status(peer, &not_listed);
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(status.message(), ATTESTATION_FAILED);

    let status = attest_error_status(peer, &AttestError::Vanished { pid: 42 });
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(status.message(), NO_IDENTITY);
}

#[test]
fn hints_are_unique_in_a_response_and_order_is_kept() {
    let ca = Ca::new();
    let mine = own_selectors();
    let other = crate::workload::tests::uid_selectors(u32::MAX - 7);
    let snapshot = ca.snapshot(
        vec![
            ca.identity("/a", &mine, "internal"),
            ca.identity("/b", &other, "external"),
            ca.pending_identity("/c", &mine),
            ca.identity("/d", &mine, "internal"),
            ca.identity("/e", &mine, "external"),
            ca.identity("/f", &mine, ""),
        ],
        1,
    );
    let response = X509SvidFeed {
        selectors: mine,
        responses: Arc::default(),
    }
    .build_new(&snapshot);
    let got: Vec<(&str, &str)> = response
        .svids
        .iter()
        .map(|s| (s.spiffe_id.as_str(), s.hint.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("spiffe://example.org/a", "internal"),
            ("spiffe://example.org/d", ""),
            ("spiffe://example.org/e", "external"),
            ("spiffe://example.org/f", ""),
        ]
    );
}

#[test]
fn callers_with_the_same_svids_share_one_response_until_the_snapshot_changes() {
    let ca = Ca::new();
    let mine = own_selectors();
    let responses = Arc::new(ResponseCache::default());
    let caller = || X509SvidFeed {
        selectors: own_selectors(),
        responses: Arc::clone(&responses),
    };
    let cached = || responses.latest.lock().unwrap().responses.len();
    let ready = |feed: &X509SvidFeed, snapshot: &Snapshot| match feed.view(snapshot) {
        View::Ready(key) => key,
        _ => panic!("no response for the caller"),
    };

    let first = ca.snapshot(vec![ca.identity("/web", &mine, "")], 1);
    let (a, b) = (caller(), caller());
    let from_a = a.build(&first, &ready(&a, &first));
    let from_b = b.build(&first, &ready(&b, &first));
    assert_eq!(from_a, from_b);
    assert_eq!(from_a, a.build_new(&first));
    assert_eq!(cached(), 1, "one response for both callers");

    // A rotated SVID is a new response, and the old one is let go.
    let rotated = ca.snapshot(vec![ca.identity("/web", &mine, "")], 2);
    let from_a = a.build(&rotated, &ready(&a, &rotated));
    assert_eq!(from_a, a.build_new(&rotated));
    assert_ne!(from_a.svids[0].x509_svid, from_b.svids[0].x509_svid);
    assert_eq!(cached(), 1);

    // A caller still on the older snapshot gets its response, built
    // for it.
    assert_eq!(b.build(&first, &ready(&b, &first)), from_b);
    assert_eq!(cached(), 1);
}

/// `snapshot` with `federated` as its federated bundles.
fn federating(
    snapshot: &Snapshot,
    federated: &[(&str, &Arc<Vec<u8>>)],
    version: u64,
) -> Arc<Snapshot> {
    Arc::new(Snapshot {
        federated: Arc::new(
            federated
                .iter()
                .map(|(name, der)| (TrustDomain::new(name).unwrap(), Arc::clone(der)))
                .collect(),
        ),
        version,
        ..snapshot.clone()
    })
}

/// An identity of `ca` for the caller, whose entry federates with
/// `names`.
fn federating_identity(
    ca: &Ca,
    path: &str,
    selectors: &Selectors,
    names: &[&str],
) -> Arc<Identity> {
    let mut entry = ca.entry(path, selectors, "");
    entry.federates_with = names.iter().map(|n| TrustDomain::new(n).unwrap()).collect();
    Arc::new(Identity {
        entry,
        svid: Some(ca.svid(path)),
    })
}

fn foreign_ca(name: &str) -> Arc<Vec<u8>> {
    let td = TrustDomain::new(name).unwrap();
    let ca = sigil::x509::Authority::self_signed(&td, Duration::from_secs(3600)).unwrap();
    Arc::new(ca.cert().to_vec())
}

fn keys<V>(map: &HashMap<String, V>) -> Vec<&str> {
    let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

#[tokio::test]
async fn callers_get_the_bundles_their_entries_federate_with_and_lose_removed_ones() {
    let ca = Ca::new();
    let mine = own_selectors();
    let other = crate::workload::tests::uid_selectors(u32::MAX - 7);
    let (one, two, third, own) = (
        foreign_ca("one.org"),
        foreign_ca("two.org"),
        foreign_ca("third.org"),
        foreign_ca("example.org"),
    );
    let empty = Arc::new(Vec::new());
    let base = ca.snapshot(
        vec![
            // The agent's own trust domain and a trust domain with a
            // zero-length bundle are never sent.
            federating_identity(&ca, "/web", &mine, &["example.org", "empty.org", "one.org"]),
            federating_identity(&ca, "/api", &mine, &["two.org"]),
            federating_identity(&ca, "/db", &other, &["third.org"]),
        ],
        1,
    );
    let all = [
        ("one.org", &one),
        ("two.org", &two),
        ("third.org", &third),
        ("example.org", &own),
        ("empty.org", &empty),
    ];
    let (tx, rx) = watch::channel(federating(&base, &all, 1));
    let (_stop_tx, stop_rx) = watch::channel(false);
    let svid_feed = X509SvidFeed {
        selectors: mine.clone(),
        responses: Arc::default(),
    };
    let bundles_feed = X509BundlesFeed { selectors: mine };
    let mut svids = Box::pin(drive(svid_feed, rx.clone(), stop_rx.clone()));
    let mut bundles = Box::pin(drive(bundles_feed, rx, stop_rx));

    let first = svids.next().await.unwrap().unwrap();
    assert_eq!(
        keys(&first.federated_bundles),
        ["spiffe://one.org", "spiffe://two.org"]
    );
    assert_eq!(first.federated_bundles["spiffe://one.org"], *one);
    assert_eq!(first.federated_bundles["spiffe://two.org"], *two);
    assert_eq!(first.svids[0].bundle, ca.authority.cert().to_vec());
    let first = bundles.next().await.unwrap().unwrap();
    assert_eq!(
        keys(&first.bundles),
        [
            "spiffe://example.org",
            "spiffe://one.org",
            "spiffe://two.org"
        ]
    );
    assert_eq!(
        first.bundles["spiffe://example.org"],
        ca.authority.cert().to_vec()
    );
    assert_eq!(first.bundles["spiffe://one.org"], *one);

    // one.org's bundle is deleted: the next messages lack its key.
    let without_one = [
        ("two.org", &two),
        ("third.org", &third),
        ("example.org", &own),
    ];
    tx.send_replace(federating(&base, &without_one, 2));
    let next = svids.next().await.unwrap().unwrap();
    assert_eq!(keys(&next.federated_bundles), ["spiffe://two.org"]);
    let next = bundles.next().await.unwrap().unwrap();
    assert_eq!(
        keys(&next.bundles),
        ["spiffe://example.org", "spiffe://two.org"]
    );

    // A bundle the caller does not federate with changes: nothing is
    // sent. two.org's new bundle is.
    let third_renewed = foreign_ca("third.org");
    tx.send_replace(federating(
        &base,
        &[("two.org", &two), ("third.org", &third_renewed)],
        3,
    ));
    assert!(svids.next().now_or_never().is_none());
    assert!(bundles.next().now_or_never().is_none());
    let renewed = foreign_ca("two.org");
    tx.send_replace(federating(&base, &[("two.org", &renewed)], 4));
    let next = svids.next().await.unwrap().unwrap();
    assert_eq!(next.federated_bundles["spiffe://two.org"], *renewed);
    let next = bundles.next().await.unwrap().unwrap();
    assert_eq!(next.bundles["spiffe://two.org"], *renewed);
}

#[test]
fn the_header_must_be_exactly_one_true() {
    let with = |values: &[&'static str]| {
        let mut request = Request::new(());
        for v in values {
            request.metadata_mut().append(
                SECURITY_HEADER,
                tonic::metadata::MetadataValue::from_static(v),
            );
        }
        check_security_header(request).map(|_| ())
    };
    assert!(with(&["true"]).is_ok());
    for bad in [&[][..], &["false"], &["TRUE"], &["true", "true"], &[""]] {
        let status = with(bad).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad:?}");
        assert_eq!(status.message(), MISSING_HEADER);
    }
}
