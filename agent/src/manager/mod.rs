//! The SVID manager: holds the entries the agent is entitled to and an
//! X.509-SVID for each, keeps them renewed, and publishes a new
//! [`Snapshot`] on every change.
//!
//! - An entry without an SVID, whose SVID-relevant fields changed, or whose
//!   SVID is due, gets a new key (of the configured `workload_key_type`,
//!   P-256 by default) and a CSR; every such entry is signed
//!   in batches of at most [`MAX_BATCH`] (see [`schedule`] for when an SVID
//!   is due).
//! - A failed batch is retried with backoff (1 s doubling to 30 s); an SVID
//!   that expires meanwhile leaves the snapshot at its notAfter.
//! - Entry changes arrive as [`Update`]s from the entry sync; a removed entry
//!   leaves the snapshot at once. So do new bundles and new sets of
//!   federated bundles, which go into the snapshot as they are.
//! - An SVID signed by a tainted authority (one whose subject key identifier
//!   the server lists) is replaced early, at a time drawn over a short
//!   window (see [`taint`]).
//! - A new SVID whose signing authority is not yet in the trust bundle the
//!   agent holds (an authority activated before its publication reached
//!   this agent) is held back, and the previous SVID served, until a bundle
//!   with that authority arrives or [`MAX_BUNDLE_WAIT`] has passed: no
//!   workload is handed an SVID that the bundles of its peers may not
//!   verify yet.

mod clock;
pub(crate) mod schedule;
mod signer;
pub(crate) mod taint;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil::bundle::X509Bundle;
use sigil::keys::{KeyType, PrivateKey};
use sigil::{Entry, SpiffeId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

pub(crate) use clock::{Clock, SystemClock};
pub(crate) use signer::{BatchSigner, CsrItem, GrpcSigner, IssuedItem};

use crate::cache::{FederatedBundles, Identity, Snapshot, SnapshotReceiver, SnapshotSender, Svid};
use crate::retry::{Backoff, RepeatedErrors, Report};

/// Most CSRs in one `BatchNewX509Svid` call (the server's limit).
pub(crate) const MAX_BATCH: usize = 500;

/// From this many keys on, keys and CSRs are made on the blocking pool.
const BLOCKING_KEYGEN_THRESHOLD: usize = 16;

/// How long a new SVID is held back waiting for a trust bundle that holds
/// its signing authority (never past the expiry of the SVID it replaces).
/// The server publishes an authority long before it signs with it, and
/// pushes the bundle at once, so this only bounds what a lost or late push
/// can delay.
pub(crate) const MAX_BUNDLE_WAIT: Duration = Duration::from_secs(30);

/// A change from the entry sync.
#[derive(Debug, Default)]
pub(crate) struct Update {
    /// New entries, and entries whose revision changed (validated).
    pub(crate) upserted: Vec<Entry>,
    /// IDs of entries to drop.
    pub(crate) deleted: Vec<String>,
    /// A new trust bundle.
    pub(crate) bundle: Option<X509Bundle>,
    /// The full set of federated bundles, when the server sent it.
    pub(crate) federated: Option<FederatedBundles>,
    /// The subject key identifiers of the tainted authorities, when the
    /// server sent them.
    pub(crate) tainted: Option<HashSet<Vec<u8>>>,
    /// Completed once the update is in a published snapshot and the SVIDs
    /// it called for have been requested once.
    pub(crate) applied: Option<oneshot::Sender<()>>,
}

/// One entry and what the manager knows about its SVID.
#[derive(Debug)]
struct Tracked {
    entry: Entry,
    svid: Option<Arc<Svid>>,
    /// When the SVID is due; set with `svid`.
    renew_at: Option<SystemTime>,
    /// The subject key identifier of the authority that signed the SVID.
    authority_key: Option<Vec<u8>>,
    /// The entry changed in a way that calls for a new SVID.
    stale: bool,
    /// The identity as last published, reused while nothing changed.
    published: Option<Arc<Identity>>,
    /// A newly signed SVID waiting for a bundle that holds its authority.
    held: Option<Held>,
}

/// A signed SVID not served yet, and what `Tracked` takes from it when it is.
#[derive(Debug)]
struct Held {
    svid: Arc<Svid>,
    renew_at: SystemTime,
    authority_key: Option<Vec<u8>>,
    /// The key identifier of the authority that signed the top of the
    /// chain, which the bundle must hold (an upstream root when the chain
    /// includes intermediates).
    root_key: Option<Vec<u8>>,
    /// Served from then on even if no bundle holds its authority.
    until: SystemTime,
}

impl Tracked {
    fn is_due(&self, horizon: SystemTime) -> bool {
        if self.held.is_some() {
            return false;
        }
        self.svid.is_none() || self.stale || self.renew_at.is_none_or(|at| at <= horizon)
    }

    /// Serves the held SVID, if any.
    fn release(&mut self) {
        if let Some(held) = self.held.take() {
            self.svid = Some(held.svid);
            self.renew_at = Some(held.renew_at);
            self.authority_key = held.authority_key;
            self.stale = false;
            self.published = None;
        }
    }
}

/// A key and CSR made for an entry.
struct Prepared {
    entry_id: String,
    spiffe_id: SpiffeId,
    key: PrivateKey,
    csr: Vec<u8>,
}

/// The SVID manager. See the module documentation.
#[derive(Debug)]
pub(crate) struct Manager<S, C> {
    signer: S,
    clock: C,
    jitter: fn() -> f64,
    key_type: KeyType,
    tx: SnapshotSender,
    bundle: Arc<X509Bundle>,
    bundle_der: Arc<Vec<u8>>,
    /// The subject key identifiers of the bundle's authorities.
    bundle_keys: HashSet<Vec<u8>>,
    federated: Arc<FederatedBundles>,
    entries: HashMap<String, Tracked>,
    version: u64,
    dirty: bool,
    backoff: Backoff,
    retry_at: Option<Instant>,
    repeated: RepeatedErrors,
    acks: Vec<oneshot::Sender<()>>,
    /// The subject key identifiers of the tainted authorities.
    tainted: HashSet<Vec<u8>>,
}

impl<S: BatchSigner, C: Clock> Manager<S, C> {
    /// A manager with no entries yet, serving `bundle`.
    pub(crate) fn new(signer: S, clock: C, bundle: X509Bundle) -> Self {
        let bundle_der = Arc::new(bundle.to_concatenated_der());
        let bundle_keys = taint::subject_key_ids(&bundle);
        let bundle = Arc::new(bundle);
        let federated = Arc::new(FederatedBundles::new());
        let (tx, _) = watch::channel(Arc::new(Snapshot {
            bundle: Arc::clone(&bundle),
            bundle_der: Arc::clone(&bundle_der),
            federated: Arc::clone(&federated),
            identities: Vec::new(),
            version: 0,
        }));
        Self {
            signer,
            clock,
            jitter: schedule::jitter,
            key_type: KeyType::default(),
            tx,
            bundle,
            bundle_der,
            bundle_keys,
            federated,
            entries: HashMap::new(),
            version: 0,
            dirty: false,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
            retry_at: None,
            repeated: RepeatedErrors::default(),
            acks: Vec::new(),
            tainted: HashSet::new(),
        }
    }

    /// Replaces the source of renewal jitter.
    #[cfg(test)]
    pub(crate) fn with_jitter(mut self, jitter: fn() -> f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Makes workload keys of `key_type` instead of P-256.
    pub(crate) fn with_key_type(mut self, key_type: KeyType) -> Self {
        self.key_type = key_type;
        self
    }

    /// A receiver of the snapshots this manager publishes.
    pub(crate) fn subscribe(&self) -> SnapshotReceiver {
        self.tx.subscribe()
    }

    /// Applies updates and keeps SVIDs renewed until `updates` closes.
    pub(crate) async fn run(mut self, mut updates: mpsc::Receiver<Update>) {
        loop {
            let now = self.clock.now();
            self.drop_expired(now);
            self.release_held(now);
            let due = self.due(now);
            let may_sign = !due.is_empty() && self.retry_at.is_none_or(|at| at <= Instant::now());
            if may_sign {
                // Removals and label changes must not wait for the server.
                self.publish_if_dirty();
                self.sign(due).await;
            }
            self.publish_if_dirty();
            for ack in self.acks.drain(..) {
                let _ = ack.send(());
            }
            if may_sign {
                continue;
            }

            let wake = self.next_wake(now);
            tokio::select! {
                update = updates.recv() => match update {
                    Some(update) => self.apply(update),
                    None => return,
                },
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Applies an entry or bundle change.
    fn apply(&mut self, update: Update) {
        if let Some(bundle) = update.bundle {
            self.bundle_der = Arc::new(bundle.to_concatenated_der());
            self.bundle_keys = taint::subject_key_ids(&bundle);
            self.bundle = Arc::new(bundle);
            self.dirty = true;
            self.release_held(self.clock.now());
        }
        if let Some(federated) = update.federated
            && federated != *self.federated
        {
            self.federated = Arc::new(federated);
            self.dirty = true;
        }
        for id in update.deleted {
            if let Some(gone) = self.entries.remove(&id) {
                tracing::debug!(entry.id = %id, spiffe.id = %gone.entry.spiffe_id, "entry removed");
                self.dirty = true;
            }
        }
        for entry in update.upserted {
            match self.entries.get_mut(&entry.id) {
                Some(tracked) => {
                    if tracked.entry == entry {
                        continue;
                    }
                    if tracked.entry.spiffe_id != entry.spiffe_id {
                        // The old SVID names another identity: never serve it
                        // for this entry again.
                        tracked.svid = None;
                        tracked.renew_at = None;
                        tracked.held = None;
                    } else if tracked.entry.svid_changed(&entry) {
                        tracked.stale = true;
                        tracked.held = None;
                    }
                    tracing::debug!(entry.id = %entry.id, spiffe.id = %entry.spiffe_id, revision = entry.revision, "entry updated");
                    tracked.entry = entry;
                    tracked.published = None;
                }
                None => {
                    tracing::debug!(entry.id = %entry.id, spiffe.id = %entry.spiffe_id, "entry added");
                    self.entries.insert(
                        entry.id.clone(),
                        Tracked {
                            entry,
                            svid: None,
                            renew_at: None,
                            authority_key: None,
                            stale: false,
                            published: None,
                            held: None,
                        },
                    );
                }
            }
            self.dirty = true;
        }
        if let Some(tainted) = update.tainted {
            self.tainted = tainted;
            self.replace_tainted();
        }
        if let Some(ack) = update.applied {
            self.acks.push(ack);
        }
    }

    /// Brings forward the renewal of every SVID signed by a tainted
    /// authority, to a time drawn over the replacement window.
    fn replace_tainted(&mut self) {
        if self.tainted.is_empty() {
            return;
        }
        let now = self.clock.now();
        let mut count = 0usize;
        for tracked in self.entries.values_mut() {
            let Some(svid) = &tracked.svid else {
                continue;
            };
            if !tracked
                .authority_key
                .as_ref()
                .is_some_and(|k| self.tainted.contains(k))
            {
                continue;
            }
            let draw = (self.jitter)() / schedule::MAX_JITTER;
            let at = taint::replacement_time(now, svid.not_after, draw);
            if tracked.renew_at.is_none_or(|r| r > at) {
                tracked.renew_at = Some(at);
                count += 1;
            }
        }
        if count > 0 {
            tracing::info!(
                count,
                "X.509-SVIDs signed by a tainted authority; replacing them"
            );
        }
    }

    /// Serves every held SVID whose authority the bundle now holds, or
    /// whose wait is over.
    fn release_held(&mut self, now: SystemTime) {
        for tracked in self.entries.values_mut() {
            let Some(held) = &tracked.held else {
                continue;
            };
            let covered = held
                .root_key
                .as_ref()
                .is_none_or(|k| self.bundle_keys.contains(k));
            if !covered && held.until > now {
                continue;
            }
            if !covered {
                tracing::warn!(
                    entry.id = %tracked.entry.id,
                    spiffe.id = %tracked.entry.spiffe_id,
                    "no trust bundle with the authority of the new X.509-SVID arrived in time; serving it anyway"
                );
            }
            tracked.release();
            self.dirty = true;
        }
    }

    /// Drops every SVID whose notAfter has passed.
    fn drop_expired(&mut self, now: SystemTime) {
        for tracked in self.entries.values_mut() {
            if tracked.svid.as_ref().is_some_and(|s| s.not_after <= now) {
                tracing::warn!(
                    entry.id = %tracked.entry.id,
                    spiffe.id = %tracked.entry.spiffe_id,
                    "X.509-SVID expired before it could be renewed; workloads no longer get it"
                );
                tracked.svid = None;
                tracked.renew_at = None;
                tracked.published = None;
                self.dirty = true;
            }
        }
    }

    /// The entries to sign now: every one due within the batch window.
    fn due(&self, now: SystemTime) -> Vec<String> {
        let horizon = now + schedule::BATCH_WINDOW;
        self.entries
            .values()
            .filter(|t| t.is_due(horizon))
            .map(|t| t.entry.id.clone())
            .collect()
    }

    /// When to look again: the next renewal, expiry or retry.
    fn next_wake(&self, now: SystemTime) -> Instant {
        let horizon = now + schedule::BATCH_WINDOW;
        let mut wake = Instant::now() + schedule::MAX_SLEEP;
        let mut any_due = false;
        for tracked in self.entries.values() {
            if let Some(svid) = &tracked.svid {
                wake = wake.min(schedule::instant_at(svid.not_after, now));
            }
            if let Some(held) = &tracked.held {
                // Nothing is due for it before the wait ends.
                wake = wake.min(schedule::instant_at(held.until, now));
            } else if tracked.is_due(horizon) {
                any_due = true;
            } else if let Some(at) = tracked.renew_at {
                wake = wake.min(schedule::instant_at(at, now));
            }
        }
        if any_due && let Some(at) = self.retry_at {
            wake = wake.min(at);
        }
        wake
    }

    /// Makes keys and CSRs for the entries and has them signed.
    async fn sign(&mut self, ids: Vec<String>) {
        let specs: Vec<(String, SpiffeId)> = ids
            .into_iter()
            .filter_map(|id| {
                let spiffe_id = self.entries.get(&id)?.entry.spiffe_id.clone();
                Some((id, spiffe_id))
            })
            .collect();
        let total = specs.len();
        let mut prepared = prepare_all(specs, self.key_type).await;
        let mut failed = prepared.len() < total;

        let mut signed = 0usize;
        while !prepared.is_empty() {
            let rest = prepared.split_off(prepared.len().min(MAX_BATCH));
            let batch = std::mem::replace(&mut prepared, rest);
            let items = batch
                .iter()
                .map(|p| CsrItem {
                    entry_id: p.entry_id.clone(),
                    csr: p.csr.clone(),
                })
                .collect();
            match self.signer.sign(items).await {
                Ok(issued) if issued.len() == batch.len() => {
                    for (p, item) in batch.into_iter().zip(issued) {
                        match self.accept(p, item) {
                            Ok(()) => signed += 1,
                            Err((entry_id, error)) => {
                                tracing::warn!(entry.id = %entry_id, error = %error, "rejected an X.509-SVID from the server");
                                failed = true;
                            }
                        }
                    }
                }
                Ok(issued) => {
                    tracing::warn!(
                        requested = batch.len(),
                        received = issued.len(),
                        "the server answered a batch with the wrong number of SVIDs"
                    );
                    failed = true;
                }
                Err(e) => {
                    let message = e.to_string();
                    match self.repeated.observe(&message) {
                        Report::Warn => {
                            tracing::warn!(error = %message, count = batch.len(), "signing a batch of X.509-SVIDs failed")
                        }
                        Report::Quiet(n) => {
                            tracing::debug!(error = %message, count = batch.len(), repeated = n, "signing a batch of X.509-SVIDs failed")
                        }
                    }
                    failed = true;
                }
            }
        }
        if signed > 0 {
            tracing::info!(count = signed, "X.509-SVIDs signed");
        }
        if failed {
            let delay = self.backoff.next_delay();
            tracing::debug!(retry_in = ?delay, "retrying the SVIDs that were not signed");
            self.retry_at = Some(Instant::now() + delay);
        } else {
            self.backoff.reset();
            self.repeated.reset();
            self.retry_at = None;
        }
    }

    /// Checks one returned SVID and installs it.
    fn accept(&mut self, p: Prepared, item: IssuedItem) -> Result<(), (String, String)> {
        let fail = |e: String| (p.entry_id.clone(), e);
        if item.entry_id != p.entry_id {
            return Err(fail(format!("the answer is for entry {:?}", item.entry_id)));
        }
        let leaf = item
            .chain
            .first()
            .ok_or_else(|| fail("the certificate chain is empty".into()))?;
        let id = sigil::x509::check_leaf(leaf).map_err(|e| fail(format!("leaf: {e}")))?;
        if id != p.spiffe_id {
            return Err(fail(format!(
                "the SVID is for {id}, expected {}",
                p.spiffe_id
            )));
        }
        crate::certs::check_key_matches(leaf, &p.key).map_err(|e| fail(format!("leaf: {e}")))?;
        let (not_before, not_after) =
            crate::certs::validity(leaf).map_err(|e| fail(format!("leaf: {e}")))?;
        let now = self.clock.now();
        if not_after <= now + schedule::BATCH_WINDOW {
            return Err(fail("the SVID is already expired".into()));
        }
        let Some(tracked) = self.entries.get_mut(&p.entry_id) else {
            return Ok(());
        };
        let chain_der = sigil::bundle::concatenate(&item.chain);
        let svid = Arc::new(Svid {
            chain: item.chain,
            chain_der,
            key: p.key,
            not_before,
            not_after,
        });
        let authority_key = svid.chain.first().and_then(|c| taint::authority_key_id(c));
        let root_key = svid.chain.last().and_then(|c| taint::authority_key_id(c));
        let mut renew_at =
            schedule::renewal_time(svid.not_before, svid.not_after, now, (self.jitter)());
        if authority_key
            .as_ref()
            .is_some_and(|k| self.tainted.contains(k))
        {
            // Signed just before its authority was tainted: replaced like
            // the others, though never sooner than the shortest delay.
            let draw = (self.jitter)() / schedule::MAX_JITTER;
            let at = taint::replacement_time(now, not_after, draw);
            renew_at = renew_at.min(at.max(now + schedule::MIN_RENEWAL_DELAY));
        }
        tracing::debug!(
            entry.id = %p.entry_id,
            spiffe.id = %id,
            expires = %humantime::format_rfc3339_seconds(not_after),
            renews = %humantime::format_rfc3339_seconds(renew_at),
            "X.509-SVID rotated"
        );
        let mut until = now + MAX_BUNDLE_WAIT;
        if let Some(current) = &tracked.svid {
            until = until.min(current.not_after);
        }
        let covered = root_key
            .as_ref()
            .is_none_or(|k| self.bundle_keys.contains(k));
        tracked.held = Some(Held {
            svid,
            renew_at,
            authority_key,
            root_key,
            until,
        });
        tracked.stale = false;
        if covered {
            tracked.release();
            self.dirty = true;
        } else {
            tracing::info!(
                entry.id = %p.entry_id,
                spiffe.id = %id,
                "new X.509-SVID held until the trust bundle holds its signing authority"
            );
        }
        Ok(())
    }

    fn publish_if_dirty(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let mut tracked: Vec<&mut Tracked> = self.entries.values_mut().collect();
        tracked.sort_by(|a, b| {
            (a.entry.created_at, &a.entry.id).cmp(&(b.entry.created_at, &b.entry.id))
        });
        let identities = tracked
            .into_iter()
            .map(|t| {
                Arc::clone(t.published.get_or_insert_with(|| {
                    Arc::new(Identity {
                        entry: t.entry.clone(),
                        svid: t.svid.clone(),
                    })
                }))
            })
            .collect();
        self.version += 1;
        let snapshot = Arc::new(Snapshot {
            bundle: Arc::clone(&self.bundle),
            bundle_der: Arc::clone(&self.bundle_der),
            federated: Arc::clone(&self.federated),
            identities,
            version: self.version,
        });
        tracing::debug!(
            version = snapshot.version,
            identities = snapshot.identities.len(),
            "snapshot published"
        );
        self.tx.send_replace(snapshot);
    }
}

/// Makes a key of `key_type` and a CSR per entry, on the blocking pool when
/// there are many or the keys are RSA keys (slow to make). Entries whose key
/// or CSR failed are left out (and logged).
async fn prepare_all(specs: Vec<(String, SpiffeId)>, key_type: KeyType) -> Vec<Prepared> {
    let make = move |spec| prepare(spec, key_type);
    let results = if specs.len() >= BLOCKING_KEYGEN_THRESHOLD || key_type == KeyType::Rsa2048 {
        match tokio::task::spawn_blocking(move || specs.into_iter().map(make).collect()).await {
            Ok(results) => results,
            Err(e) => {
                tracing::warn!(error = %e, "making keys and CSRs failed");
                Vec::new()
            }
        }
    } else {
        specs.into_iter().map(make).collect::<Vec<_>>()
    };
    results
        .into_iter()
        .filter_map(|r| match r {
            Ok(p) => Some(p),
            Err((entry_id, error)) => {
                tracing::warn!(entry.id = %entry_id, error = %error, "cannot make a key and CSR");
                None
            }
        })
        .collect()
}

fn prepare(
    (entry_id, spiffe_id): (String, SpiffeId),
    key_type: KeyType,
) -> Result<Prepared, (String, String)> {
    let made = PrivateKey::generate(key_type)
        .map_err(|e| e.to_string())
        .and_then(|key| {
            let pair = key.key_pair().map_err(|e| e.to_string())?;
            let csr = sigil::x509::build_csr(&pair, Some(&spiffe_id)).map_err(|e| e.to_string())?;
            Ok((key, csr))
        });
    match made {
        Ok((key, csr)) => Ok(Prepared {
            entry_id,
            spiffe_id,
            key,
            csr,
        }),
        Err(e) => Err((entry_id, e)),
    }
}

#[cfg(test)]
mod tests;
