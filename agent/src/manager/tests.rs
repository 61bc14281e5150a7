//! The scheduling decisions of the SVID manager, on paused tokio time, with
//! a signer that issues real certificates dated by the test clock.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{Issuer, KeyPair};
use rustls_pki_types::CertificateDer;
use sigil::bundle::X509Bundle;
use sigil::x509::{Authority, Csr};
use sigil::{Entry, Selector, Selectors, SpiffeId};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::clock::TokioClock;
use super::signer::SignError;
use super::*;
use crate::testing::td;

/// Whole seconds, so certificate dates (whole seconds) match the clock.
const START: Duration = Duration::from_secs(1_800_000_000);

/// One call to the signer.
#[derive(Debug, Clone)]
struct Call {
    /// Seconds since the test started.
    at: f64,
    entries: Vec<String>,
    ok: bool,
}

struct SignerState {
    issuer: Mutex<Issuer<'static, KeyPair>>,
    clock: TokioClock,
    started: Instant,
    ttl: Duration,
    fail: AtomicBool,
    calls: Mutex<Vec<Call>>,
}

#[derive(Clone)]
struct FakeSigner(Arc<SignerState>);

impl FakeSigner {
    fn calls(&self) -> Vec<Call> {
        self.0.calls.lock().unwrap().clone()
    }

    fn fail(&self, fail: bool) {
        self.0.fail.store(fail, Ordering::SeqCst);
    }

    /// Signs with `ca` from now on.
    fn sign_with(&self, ca: &Authority) {
        *self.0.issuer.lock().unwrap() =
            Issuer::from_ca_cert_der(ca.cert(), ca.key().key_pair().unwrap()).unwrap();
    }
}

impl BatchSigner for FakeSigner {
    async fn sign(&self, items: Vec<CsrItem>) -> Result<Vec<IssuedItem>, SignError> {
        let state = &self.0;
        let failing = state.fail.load(Ordering::SeqCst);
        state.calls.lock().unwrap().push(Call {
            // Timers fire on whole milliseconds.
            at: (state.started.elapsed().as_secs_f64() * 100.0).round() / 100.0,
            entries: items.iter().map(|i| i.entry_id.clone()).collect(),
            ok: !failing,
        });
        if failing {
            return Err(SignError("Unavailable: server down".into()));
        }
        // Back-dated as the server does.
        let now = state.clock.now();
        let not_before = now - sigil::x509::BACKDATE;
        let not_after = now + state.ttl;
        Ok(items
            .into_iter()
            .map(|item| {
                let csr = Csr::from_der(&item.csr).unwrap();
                let id = csr.spiffe_id().unwrap().clone();
                let params =
                    sigil::x509::leaf_params(&td(), &id, &[], not_before, not_after).unwrap();
                let issuer = state.issuer.lock().unwrap();
                let cert = params.signed_by(csr.public_key(), &*issuer).unwrap();
                IssuedItem {
                    entry_id: item.entry_id,
                    chain: vec![CertificateDer::from(cert.der().to_vec())],
                }
            })
            .collect())
    }
}

/// A manager running on its own task, and the handles to drive it.
struct Harness {
    signer: FakeSigner,
    updates: mpsc::Sender<Update>,
    snapshots: crate::cache::SnapshotReceiver,
    _task: tokio::task::JoinHandle<()>,
}

fn start(ttl: Duration, jitter: Option<fn() -> f64>) -> Harness {
    let clock = TokioClock::starting_at(SystemTime::UNIX_EPOCH + START);
    let ca = Authority::self_signed(&td(), Duration::from_secs(365 * 24 * 3600)).unwrap();
    let issuer = Issuer::from_ca_cert_der(ca.cert(), ca.key().key_pair().unwrap()).unwrap();
    let signer = FakeSigner(Arc::new(SignerState {
        issuer: Mutex::new(issuer),
        clock,
        started: Instant::now(),
        ttl,
        fail: AtomicBool::new(false),
        calls: Mutex::new(Vec::new()),
    }));
    let bundle = X509Bundle::new(td(), vec![ca.cert().clone()]);
    let mut manager = Manager::new(signer.clone(), clock, bundle);
    if let Some(jitter) = jitter {
        manager = manager.with_jitter(jitter);
    }
    let snapshots = manager.subscribe();
    let (updates, rx) = mpsc::channel(16);
    let task = tokio::spawn(manager.run(rx));
    Harness {
        signer,
        updates,
        snapshots,
        _task: task,
    }
}

fn entry(id: &str, path: &str) -> Entry {
    let parent: SpiffeId = "spiffe://example.org/sigil/agent/join_token/1"
        .parse()
        .unwrap();
    Entry::from_proto(&crate::testing::entry(id, path, &parent), &td()).unwrap()
}

impl Harness {
    /// Sends an update and waits until the manager has applied it and
    /// requested the SVIDs it calls for once.
    async fn apply(&self, mut update: Update) {
        let (tx, rx) = oneshot::channel();
        update.applied = Some(tx);
        self.updates.send(update).await.unwrap();
        rx.await.unwrap();
    }

    async fn add(&self, entries: Vec<Entry>) {
        self.apply(Update {
            upserted: entries,
            ..Update::default()
        })
        .await;
    }

    /// Sends the bundle of the latest snapshot with `ca` added, as the
    /// entry sync does when the server publishes a new authority.
    async fn publish_too(&self, ca: &Authority) -> Vec<CertificateDer<'static>> {
        let mut authorities = self.snapshot().bundle.authorities().to_vec();
        authorities.push(ca.cert().clone());
        self.apply(Update {
            bundle: Some(X509Bundle::new(td(), authorities.clone())),
            ..Update::default()
        })
        .await;
        authorities
    }

    fn snapshot(&self) -> Arc<crate::cache::Snapshot> {
        self.snapshots.borrow().clone()
    }

    fn svid_of(&self, id: &str) -> Option<Arc<crate::cache::Svid>> {
        self.snapshot()
            .identities
            .iter()
            .find(|i| i.entry.id == id)
            .and_then(|i| i.svid.clone())
    }
}

async fn advance(secs: u64) {
    tokio::time::sleep(Duration::from_secs(secs)).await;
}

/// The times (seconds) of the calls that included `entry`.
fn calls_with(calls: &[Call], entry: &str) -> Vec<f64> {
    calls
        .iter()
        .filter(|c| c.entries.iter().any(|e| e == entry))
        .map(|c| c.at)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_new_entry_gets_an_svid_for_its_spiffe_id_and_key() {
    let h = start(Duration::from_secs(1000), None);
    h.add(vec![entry("e1", "/web")]).await;
    let snapshot = h.snapshot();
    assert_eq!(snapshot.identities.len(), 1);
    let svid = snapshot.identities[0].svid.clone().unwrap();
    assert_eq!(
        sigil::x509::check_leaf(&svid.chain[0]).unwrap().as_str(),
        "spiffe://example.org/web"
    );
    assert_eq!(svid.chain_der, svid.chain[0].to_vec());
    crate::certs::check_key_matches(&svid.chain[0], &svid.key).unwrap();
    assert_eq!(
        svid.not_after,
        SystemTime::UNIX_EPOCH + START + Duration::from_secs(1000)
    );
    assert_eq!(
        snapshot.bundle_der.as_slice(),
        snapshot.bundle.authorities()[0].as_ref()
    );
}

/// (a) Renewal happens between 40 % and 50 % of the lifetime.
#[tokio::test(start_paused = true)]
async fn renewal_happens_between_40_and_50_percent_of_the_lifetime() {
    let h = start(Duration::from_secs(1000), None);
    let ids: Vec<String> = (0..20).map(|i| format!("e{i}")).collect();
    h.add(
        ids.iter()
            .map(|id| entry(id, &format!("/w/{id}")))
            .collect(),
    )
    .await;
    let first: Vec<_> = ids.iter().map(|id| h.svid_of(id).unwrap()).collect();

    advance(600).await;
    let calls = h.signer.calls();
    for (id, old) in ids.iter().zip(first) {
        let times = calls_with(&calls, id);
        assert_eq!(times.len(), 2, "{id}: signed once, renewed once: {times:?}");
        // Batched with SVIDs due up to 1 s later, so at most 1 s early.
        assert!(
            (399.0..=500.0).contains(&times[1]),
            "{id} renewed at {}",
            times[1]
        );
        let new = h.svid_of(id).unwrap();
        assert!(new.not_after > old.not_after);
        assert_ne!(new.key.der(), old.key.der(), "a new key per renewal");
    }
}

/// (b) Many SVIDs with the same lifetime are renewed across a window, not at
/// one instant.
#[tokio::test(start_paused = true)]
async fn renewals_of_many_svids_spread_across_a_window() {
    let h = start(Duration::from_secs(1000), None);
    let ids: Vec<String> = (0..100).map(|i| format!("e{i:03}")).collect();
    h.add(
        ids.iter()
            .map(|id| entry(id, &format!("/w/{id}")))
            .collect(),
    )
    .await;
    assert_eq!(h.signer.calls().len(), 1, "the first issuance is one batch");

    advance(600).await;
    let renewals: Vec<Call> = h.signer.calls().into_iter().skip(1).collect();
    let renewed: usize = renewals.iter().map(|c| c.entries.len()).sum();
    assert_eq!(renewed, 100);
    let first = renewals.first().unwrap().at;
    let last = renewals.last().unwrap().at;
    assert!(
        renewals.len() >= 10,
        "{} renewal calls: {renewals:?}",
        renewals.len()
    );
    assert!(
        last - first >= 50.0,
        "renewals spread over {}s",
        last - first
    );
    assert!(renewals.iter().all(|c| c.entries.len() < 50));
}

/// (c) SVIDs due together go in one batch call, of at most 500.
#[tokio::test(start_paused = true)]
async fn svids_due_together_go_in_one_batch() {
    let h = start(Duration::from_secs(1000), Some(|| 0.05));
    let ids: Vec<String> = (0..3).map(|i| format!("e{i}")).collect();
    h.add(
        ids.iter()
            .map(|id| entry(id, &format!("/w/{id}")))
            .collect(),
    )
    .await;
    advance(600).await;
    let calls = h.signer.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    for call in &calls {
        let mut got = call.entries.clone();
        got.sort();
        assert_eq!(got, ids);
    }
    // 1000 s × (0.5 − 0.05) = 450 s after notBefore.
    assert_eq!(calls[1].at, 450.0);
}

#[tokio::test(start_paused = true)]
async fn more_than_500_due_svids_are_split_into_batches_of_500() {
    let h = start(Duration::from_secs(1000), None);
    let entries: Vec<Entry> = (0..501)
        .map(|i| entry(&format!("e{i:03}"), &format!("/w/{i}")))
        .collect();
    h.add(entries).await;
    let sizes: Vec<usize> = h.signer.calls().iter().map(|c| c.entries.len()).collect();
    assert_eq!(sizes, [500, 1]);
    let snapshot = h.snapshot();
    assert_eq!(snapshot.identities.len(), 501);
    assert!(snapshot.identities.iter().all(|i| i.svid.is_some()));
}

/// (d) After a failure the retry backs off, and an SVID that expires in the
/// meantime leaves the snapshot.
#[tokio::test(start_paused = true)]
async fn failed_renewals_back_off_and_expired_svids_leave_the_snapshot() {
    let h = start(Duration::from_secs(100), Some(|| 0.0));
    h.add(vec![entry("e1", "/web")]).await;
    assert!(h.svid_of("e1").is_some());
    h.signer.fail(true);

    // Due at 50 s; retried after 1, 2, 4, 8, 16 and 30 s (50, 51, 53, 57,
    // 65, 81, 111 s); the SVID expires at 100 s.
    advance(99).await;
    assert!(h.svid_of("e1").is_some(), "still valid at 99 s");
    advance(2).await;
    let snapshot = h.snapshot();
    assert_eq!(snapshot.identities.len(), 1, "the entry stays");
    assert!(
        snapshot.identities[0].svid.is_none(),
        "the expired SVID is gone"
    );

    advance(11).await;
    let times: Vec<f64> = h.signer.calls().iter().skip(1).map(|c| c.at).collect();
    assert_eq!(times, [50.0, 51.0, 53.0, 57.0, 65.0, 81.0, 111.0]);

    // Back up: the next retry (30 s later) succeeds.
    h.signer.fail(false);
    advance(30).await;
    let last = h.signer.calls().last().unwrap().clone();
    assert!(last.ok && last.at == 141.0, "{last:?}");
    let svid = h.svid_of("e1").unwrap();
    assert!(svid.not_after > SystemTime::UNIX_EPOCH + START + Duration::from_secs(141));
}

/// (e) A change of dns_names calls for a new SVID; a change of the hint
/// only updates the snapshot.
#[tokio::test(start_paused = true)]
async fn dns_name_changes_resign_but_hint_changes_do_not() {
    let h = start(Duration::from_secs(1000), None);
    let original = entry("e1", "/web");
    h.add(vec![original.clone()]).await;
    let first = h.svid_of("e1").unwrap();
    advance(10).await;

    let mut relabelled = original.clone();
    relabelled.hint = "internal".into();
    relabelled.revision = 2;
    h.add(vec![relabelled.clone()]).await;
    assert_eq!(h.signer.calls().len(), 1, "no signing for a hint");
    let snapshot = h.snapshot();
    assert_eq!(snapshot.identities[0].entry.hint, "internal");
    assert!(Arc::ptr_eq(
        snapshot.identities[0].svid.as_ref().unwrap(),
        &first
    ));

    let mut renamed = relabelled.clone();
    renamed.dns_names = vec!["web.example.org".into()];
    renamed.revision = 3;
    h.add(vec![renamed]).await;
    let calls = h.signer.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (calls[1].at, calls[1].entries.clone()),
        (10.0, vec!["e1".to_owned()])
    );
    assert!(!Arc::ptr_eq(&h.svid_of("e1").unwrap(), &first));
}

/// A TTL change re-signs; a change of selectors or parent only changes who
/// is served the SVID the agent already holds, which stays the same.
#[tokio::test(start_paused = true)]
async fn ttl_changes_resign_but_selector_and_parent_changes_do_not() {
    let h = start(Duration::from_secs(1000), None);
    let original = entry("e1", "/web");
    h.add(vec![original.clone()]).await;
    let first = h.svid_of("e1").unwrap();
    advance(10).await;

    let mut moved = original.clone();
    moved.selectors = Selectors::new();
    moved
        .selectors
        .insert(Selector::new("unix", "uid:2002").unwrap());
    moved.parent_id = "spiffe://example.org/node/alias".parse().unwrap();
    moved.revision = 2;
    h.add(vec![moved.clone()]).await;
    assert_eq!(
        h.signer.calls().len(),
        1,
        "no signing for selectors or parent"
    );
    let snapshot = h.snapshot();
    assert_eq!(snapshot.identities[0].entry.selectors, moved.selectors);
    assert_eq!(snapshot.identities[0].entry.parent_id, moved.parent_id);
    assert!(Arc::ptr_eq(
        snapshot.identities[0].svid.as_ref().unwrap(),
        &first
    ));

    let mut shortened = moved;
    shortened.x509_svid_ttl = Some(Duration::from_secs(300));
    shortened.revision = 3;
    h.add(vec![shortened]).await;
    let calls = h.signer.calls();
    assert_eq!(
        calls
            .iter()
            .map(|c| (c.at, c.entries.clone()))
            .collect::<Vec<_>>(),
        vec![(0.0, vec!["e1".to_owned()]), (10.0, vec!["e1".to_owned()])]
    );
    assert!(!Arc::ptr_eq(&h.svid_of("e1").unwrap(), &first));
}

#[tokio::test(start_paused = true)]
async fn a_spiffe_id_change_drops_the_old_svid_and_signs_a_new_one() {
    let h = start(Duration::from_secs(1000), None);
    h.add(vec![entry("e1", "/web")]).await;
    let moved = Entry {
        revision: 2,
        ..entry("e1", "/api")
    };
    h.add(vec![moved]).await;
    let svid = h.svid_of("e1").unwrap();
    assert_eq!(
        sigil::x509::check_leaf(&svid.chain[0]).unwrap().as_str(),
        "spiffe://example.org/api"
    );
}

/// (f) Removing an entry removes its identity from the next snapshot.
#[tokio::test(start_paused = true)]
async fn removing_an_entry_removes_its_identity() {
    let h = start(Duration::from_secs(1000), None);
    h.add(vec![entry("e1", "/web"), entry("e2", "/api")]).await;
    let before = h.snapshot();
    assert_eq!(before.identities.len(), 2);

    let mut rx = h.snapshots.clone();
    rx.mark_unchanged();
    h.updates
        .send(Update {
            deleted: vec!["e1".into()],
            ..Update::default()
        })
        .await
        .unwrap();
    rx.changed().await.unwrap();
    let after = rx.borrow().clone();
    assert!(after.version > before.version);
    let ids: Vec<&str> = after
        .identities
        .iter()
        .map(|i| i.entry.id.as_str())
        .collect();
    assert_eq!(ids, ["e2"]);
    assert_eq!(h.signer.calls().len(), 1, "nothing to sign for a removal");
}

#[tokio::test(start_paused = true)]
async fn identities_are_ordered_by_creation_time_then_id() {
    let h = start(Duration::from_secs(1000), None);
    let mut late = entry("a-late", "/late");
    late.created_at += 10;
    let early_b = entry("b", "/b");
    let early_a = entry("a", "/a");
    h.add(vec![late, early_b, early_a]).await;
    let ids: Vec<String> = h
        .snapshot()
        .identities
        .iter()
        .map(|i| i.entry.id.clone())
        .collect();
    assert_eq!(ids, ["a", "b", "a-late"]);
}

#[tokio::test(start_paused = true)]
async fn a_bundle_update_is_published() {
    let h = start(Duration::from_secs(1000), None);
    let other = Authority::self_signed(&td(), Duration::from_secs(3600)).unwrap();
    let bundle = X509Bundle::new(td(), vec![other.cert().clone()]);
    h.apply(Update {
        bundle: Some(bundle.clone()),
        ..Update::default()
    })
    .await;
    let snapshot = h.snapshot();
    assert_eq!(*snapshot.bundle, bundle);
    assert_eq!(*snapshot.bundle_der, other.cert().to_vec());
}

/// The subject key identifier of a CA certificate.
fn subject_key_id(der: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                Some(id.0.to_vec())
            }
            _ => None,
        })
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn svids_of_a_tainted_authority_and_only_those_are_replaced_within_the_window() {
    let h = start(Duration::from_secs(1000), None);
    let first_ca = {
        // The harness's authority signed these.
        h.add(vec![entry("e1", "/one"), entry("e2", "/two")]).await;
        h.svid_of("e1").unwrap()
    };
    let tainted_key = taint::authority_key_id(&first_ca.chain[0]).unwrap();
    let next = Authority::self_signed(&td(), Duration::from_secs(365 * 24 * 3600)).unwrap();
    let next_key = subject_key_id(next.cert());
    assert_ne!(tainted_key, next_key);
    h.signer.sign_with(&next);
    h.publish_too(&next).await;
    h.add(vec![entry("e3", "/three")]).await;
    let e3 = h.svid_of("e3").unwrap();
    assert_eq!(
        taint::authority_key_id(&e3.chain[0]),
        Some(next_key.clone())
    );
    let before: Vec<_> = ["e1", "e2"]
        .iter()
        .map(|id| h.svid_of(id).unwrap())
        .collect();
    let calls_before = h.signer.calls().len();

    // Another key listed, as the first message of a stream would.
    let tainted: HashSet<Vec<u8>> = [tainted_key.clone(), vec![1, 2, 3]].into();
    let at = h.signer.0.started.elapsed().as_secs_f64();
    h.apply(Update {
        tainted: Some(tainted),
        ..Update::default()
    })
    .await;
    // The window: min(30 s, 10 % of the ~1000 s left).
    advance(31).await;

    let calls: Vec<Call> = h.signer.calls().into_iter().skip(calls_before).collect();
    let mut replaced: Vec<String> = calls.iter().flat_map(|c| c.entries.clone()).collect();
    replaced.sort();
    assert_eq!(replaced, ["e1", "e2"], "{calls:?}");
    for call in &calls {
        assert!(
            call.at >= at && call.at <= at + 30.0,
            "replaced at {} (tainted at {at})",
            call.at
        );
    }
    for (id, old) in ["e1", "e2"].iter().zip(before) {
        let new = h.svid_of(id).unwrap();
        assert_eq!(
            taint::authority_key_id(&new.chain[0]),
            Some(next_key.clone()),
            "{id}"
        );
        assert_ne!(new.key.der(), old.key.der());
    }
    assert_eq!(h.svid_of("e3").unwrap().chain, e3.chain, "e3 is kept");

    // The same set again asks for nothing more.
    h.apply(Update {
        tainted: Some([tainted_key].into()),
        ..Update::default()
    })
    .await;
    advance(31).await;
    assert_eq!(h.signer.calls().len(), calls_before + calls.len());
}

fn signed_by(svid: &crate::cache::Svid, ca: &Authority) -> bool {
    taint::authority_key_id(&svid.chain[0]) == Some(subject_key_id(ca.cert()))
}

/// An SVID from an authority missing from the agent's bundle is held back,
/// with the SVID it replaces still served, until a bundle holding that
/// authority arrives; then both reach workloads in one snapshot.
#[tokio::test(start_paused = true)]
async fn an_svid_from_an_unpublished_authority_waits_for_the_bundle() {
    let h = start(Duration::from_secs(1000), Some(|| 0.0));
    h.add(vec![entry("e1", "/web")]).await;
    let first = h.svid_of("e1").unwrap();
    let next = Authority::self_signed(&td(), Duration::from_secs(365 * 24 * 3600)).unwrap();
    h.signer.sign_with(&next);

    // Past the renewal (40-50 % of the lifetime), within the wait: renewed,
    // not served.
    advance(510).await;
    assert_eq!(calls_with(&h.signer.calls(), "e1").len(), 2);
    assert!(Arc::ptr_eq(&h.svid_of("e1").unwrap(), &first));
    h.add(vec![entry("e2", "/api")]).await;
    assert!(h.svid_of("e2").is_none(), "no SVID its peers cannot verify");
    assert_eq!(h.signer.calls().len(), 3);

    let authorities = h.publish_too(&next).await;
    let snapshot = h.snapshot();
    assert_eq!(snapshot.bundle.authorities(), authorities.as_slice());
    for id in ["e1", "e2"] {
        assert!(signed_by(&h.svid_of(id).unwrap(), &next), "{id}");
    }
    assert_eq!(h.signer.calls().len(), 3, "nothing signed again");
}

/// A held SVID is served anyway once no bundle came for MAX_BUNDLE_WAIT.
#[tokio::test(start_paused = true)]
async fn a_held_svid_is_served_when_no_bundle_comes_in_time() {
    let h = start(Duration::from_secs(1000), None);
    let next = Authority::self_signed(&td(), Duration::from_secs(365 * 24 * 3600)).unwrap();
    h.signer.sign_with(&next);
    h.add(vec![entry("e1", "/web")]).await;
    assert!(h.svid_of("e1").is_none());

    advance(MAX_BUNDLE_WAIT.as_secs() - 1).await;
    assert!(h.svid_of("e1").is_none());
    advance(2).await;
    assert!(signed_by(&h.svid_of("e1").unwrap(), &next));
    assert_eq!(h.signer.calls().len(), 1, "signed once");
}
