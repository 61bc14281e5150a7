//! The entry sync: a `SyncEntries` stream from the server, applied to the
//! SVID manager and the trust store.
//!
//! The agent sends the (id, revision) pairs it holds, so the server sends
//! only differences; the stream then stays open and carries every change.
//! When it breaks, the agent reconnects with backoff (200 ms doubling to
//! 10 s, reset once a message arrived), again sending what it holds. A
//! refusal of the agent SVID asks the agent SVID renewal to act at once: it
//! either gets a new SVID or finds the agent evicted.
//!
//! The server lists the tainted authorities in the first message of each
//! stream and whenever they change: the manager replaces the workload SVIDs
//! they signed, and an agent SVID they signed is renewed early (after a
//! delay drawn like the workload SVIDs' replacements).
//!
//! The server sends the full set of federated bundles (those of the trust
//! domains the agent's entries federate with) in the first message of each
//! stream and whenever it changes; the manager serves it to workloads. A
//! bundle that fails its checks is left out of the set, with a warning.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use sigil::proto::sigil::agent::v1::{
    FederatedBundles as WireFederatedBundles, KnownEntry, SyncEntriesRequest, SyncEntriesResponse,
};
use sigil::tls::TrustStore;
use sigil::{Entry, TrustDomain};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::cache::FederatedBundles;
use crate::client::{self, AgentChannel};
use crate::manager::Update;
use crate::node::{self, Storage};
use crate::retry::{Backoff, RepeatedErrors, Report};

/// Why the sync stopped for good.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SyncError {
    /// The SVID manager is gone (the agent is shutting down).
    #[error("the SVID manager stopped")]
    ManagerGone,
}

/// Keeps the agent's entries in sync with the server.
#[derive(Debug)]
pub(crate) struct EntrySync {
    channel: Arc<AgentChannel>,
    renew_now: Arc<Notify>,
    td: TrustDomain,
    trust: Arc<TrustStore>,
    storage: Storage,
    updates: mpsc::Sender<Update>,
    first_applied: Option<oneshot::Sender<()>>,
    /// The entries handed to the manager, by ID, with their revision.
    known: HashMap<String, u64>,
    /// The sequence number of the bundle last applied.
    bundle_sequence: Option<u64>,
    /// The federated bundles last handed to the manager.
    federated: FederatedBundles,
}

impl EntrySync {
    /// A sync feeding `updates`. `first_applied` completes once the first
    /// message has been applied by the manager. A refusal of the agent SVID
    /// notifies `renew_now`.
    pub(crate) fn new(
        channel: Arc<AgentChannel>,
        td: TrustDomain,
        trust: Arc<TrustStore>,
        storage: Storage,
        updates: mpsc::Sender<Update>,
        first_applied: oneshot::Sender<()>,
        renew_now: Arc<Notify>,
    ) -> Self {
        Self {
            channel,
            renew_now,
            td,
            trust,
            storage,
            updates,
            first_applied: Some(first_applied),
            known: HashMap::new(),
            bundle_sequence: None,
            federated: FederatedBundles::new(),
        }
    }

    /// Syncs until a fatal error.
    pub(crate) async fn run(mut self) -> SyncError {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut repeated = RepeatedErrors::default();
        loop {
            let error = match self.stream_once(&mut backoff, &mut repeated).await {
                Ok(never) => match never {},
                Err(Stop::Fatal(e)) => return e,
                Err(Stop::Retry(e)) => e,
            };
            let delay = backoff.next_delay();
            match repeated.observe(&error) {
                Report::Warn => {
                    tracing::warn!(error = %error, retry_in = ?delay, "entry sync interrupted; reconnecting");
                }
                Report::Quiet(n) => {
                    tracing::debug!(error = %error, retry_in = ?delay, repeated = n, "entry sync interrupted; reconnecting");
                }
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// Opens one stream and applies its messages until it breaks.
    async fn stream_once(
        &mut self,
        backoff: &mut Backoff,
        repeated: &mut RepeatedErrors,
    ) -> Result<std::convert::Infallible, Stop> {
        let known = self
            .known
            .iter()
            .map(|(id, revision)| KnownEntry {
                id: id.clone(),
                revision: *revision,
            })
            .collect();
        let mut stream = self
            .channel
            .api()
            .sync_entries(SyncEntriesRequest { known })
            .await
            .map_err(|s| self.stop(&s))?
            .into_inner();
        let mut first = true;
        loop {
            match stream.message().await {
                Ok(Some(message)) => {
                    backoff.reset();
                    repeated.reset();
                    self.apply(message, first).await?;
                    first = false;
                }
                Ok(None) => return Err(Stop::Retry("the server ended the stream".into())),
                Err(status) => return Err(self.stop(&status)),
            }
        }
    }

    fn stop(&self, status: &tonic::Status) -> Stop {
        if node::is_refusal(status) {
            // The renewal decides: a new SVID, or the end of the agent.
            tracing::info!(
                error = %client::describe_status(status),
                "the server refused a call with the agent SVID; asking for a renewal"
            );
            self.renew_now.notify_one();
        }
        Stop::Retry(client::describe_status(status))
    }

    /// Applies one message (`first` of its stream): checks the entries and
    /// the bundle, and hands the result to the manager.
    async fn apply(&mut self, message: SyncEntriesResponse, first: bool) -> Result<(), Stop> {
        let mut update = Update::default();
        if first || !message.tainted_authority_keys.is_empty() {
            let tainted: HashSet<Vec<u8>> =
                message.tainted_authority_keys.iter().cloned().collect();
            self.check_agent_svid(&tainted);
            update.tainted = Some(tainted);
        }
        for wire in &message.upserted {
            match check_entry(wire, &self.td) {
                Ok(entry) => {
                    self.known.insert(entry.id.clone(), entry.revision);
                    update.upserted.push(entry);
                }
                Err(error) => {
                    tracing::warn!(entry.id = %wire.id, error = %error, "ignoring an invalid entry from the server");
                    // An older revision may be held: it is no longer what
                    // the server has.
                    if self.known.remove(&wire.id).is_some() {
                        update.deleted.push(wire.id.clone());
                    }
                }
            }
        }
        for id in message.deleted {
            self.known.remove(&id);
            update.deleted.push(id);
        }
        if let Some(wire) = &message.bundle {
            self.apply_bundle(wire, &mut update);
        }
        if let Some(wire) = &message.federated_bundles {
            self.federated = federated_bundles(wire, &self.td, &self.federated);
            update.federated = Some(self.federated.clone());
        }
        update.applied = self.first_applied.take();
        tracing::debug!(
            upserted = update.upserted.len(),
            deleted = update.deleted.len(),
            bundle = update.bundle.is_some(),
            federated_bundles = update.federated.as_ref().map(FederatedBundles::len),
            "entry sync message"
        );
        self.updates
            .send(update)
            .await
            .map_err(|_| Stop::Fatal(SyncError::ManagerGone))
    }

    /// Renews the agent SVID early if a tainted authority signed it.
    fn check_agent_svid(&self, tainted: &HashSet<Vec<u8>>) {
        if tainted.is_empty() {
            return;
        }
        let identity = match self.storage.load(&self.td) {
            Ok(identity) => identity,
            Err(error) => {
                tracing::warn!(error = %error, "cannot read the agent SVID to check its authority");
                return;
            }
        };
        let Some(leaf) = identity.chain.first() else {
            return;
        };
        if !crate::manager::taint::authority_key_id(leaf).is_some_and(|k| tainted.contains(&k)) {
            return;
        }
        let now = std::time::SystemTime::now();
        let at = crate::manager::taint::replacement_time(now, identity.not_after, fastrand::f64());
        let delay = at.duration_since(now).unwrap_or(Duration::ZERO);
        tracing::info!(
            spiffe.id = %identity.spiffe_id,
            renew_in = ?delay,
            "the agent SVID was signed by a tainted authority; renewing it early"
        );
        let renew_now = Arc::clone(&self.renew_now);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            renew_now.notify_one();
        });
    }

    fn apply_bundle(&mut self, wire: &sigil::proto::sigil::types::v1::Bundle, update: &mut Update) {
        if self.bundle_sequence == Some(wire.sequence) {
            return;
        }
        let bundle = match node::bundle_from_proto(wire, &self.td) {
            Ok(b) => b,
            Err(error) => {
                tracing::warn!(error = %error, "ignoring an invalid bundle from the server");
                return;
            }
        };
        if let Err(error) = self.trust.replace(&bundle) {
            tracing::warn!(error = %error, "ignoring an unusable bundle from the server");
            return;
        }
        if let Err(error) = self.storage.save_bundle(&bundle) {
            tracing::warn!(error = %error, "cannot store the bundle");
        }
        tracing::info!(
            sequence = wire.sequence,
            authorities = bundle.authorities().len(),
            "trust bundle updated"
        );
        self.bundle_sequence = Some(wire.sequence);
        update.bundle = Some(bundle);
    }
}

/// Why a stream stopped.
enum Stop {
    /// Reconnect after the backoff.
    Retry(String),
    /// Stop syncing.
    Fatal(SyncError),
}

/// Converts a wire entry, which must have an ID.
fn check_entry(
    wire: &sigil::proto::sigil::types::v1::Entry,
    td: &TrustDomain,
) -> Result<Entry, String> {
    if wire.id.is_empty() {
        return Err("id: is required".into());
    }
    Entry::from_proto(wire, td).map_err(|e| e.to_string())
}

/// The federated bundles of a message, keyed by trust domain, as
/// concatenated DER. A bundle for an invalid or the agent's own (`td`) trust
/// domain, a repeated trust domain, and a bundle that fails
/// [`node::bundle_from_proto`] are left out and logged. A bundle equal to
/// one in `previous` keeps its allocation, so that workloads' streams see
/// it unchanged.
fn federated_bundles(
    wire: &WireFederatedBundles,
    td: &TrustDomain,
    previous: &FederatedBundles,
) -> FederatedBundles {
    let mut bundles = FederatedBundles::new();
    for (i, bundle) in wire.bundles.iter().enumerate() {
        let checked = TrustDomain::new(&bundle.trust_domain)
            .map_err(|e| format!("trust domain {:?}: {e}", bundle.trust_domain))
            .and_then(|other| {
                if other == *td {
                    Err(format!("{other} is the agent's own trust domain"))
                } else if bundles.contains_key(&other) {
                    Err(format!("a second bundle for {other}"))
                } else {
                    Ok(other)
                }
            })
            .and_then(|other| Ok((node::bundle_from_proto(bundle, &other)?, other)));
        let (parsed, other) = match checked {
            Ok(checked) => checked,
            Err(error) => {
                tracing::warn!(index = i, error = %error, "ignoring an invalid federated bundle from the server");
                continue;
            }
        };
        let der = parsed.to_concatenated_der();
        let der = match previous.get(&other) {
            Some(same) if **same == der => Arc::clone(same),
            _ => Arc::new(der),
        };
        bundles.insert(other, der);
    }
    bundles
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sigil::proto::sigil::types::v1 as pb;
    use sigil::x509::Authority;

    use super::*;

    fn wire(name: &str, authorities: Vec<Vec<u8>>) -> pb::Bundle {
        pb::Bundle {
            trust_domain: name.into(),
            x509_authorities: authorities,
            sequence: 1,
        }
    }

    fn ca_of(name: &str) -> Vec<u8> {
        let td = TrustDomain::new(name).unwrap();
        Authority::self_signed(&td, Duration::from_secs(3600))
            .unwrap()
            .cert()
            .to_vec()
    }

    #[test]
    fn invalid_federated_bundles_are_left_out_and_equal_ones_keep_their_allocation() {
        let own = TrustDomain::new("example.org").unwrap();
        let other = ca_of("other.org");
        let message = WireFederatedBundles {
            bundles: vec![
                wire("other.org", vec![other.clone()]),
                wire("example.org", vec![ca_of("example.org")]),
                wire("Bad!", vec![ca_of("bad.org")]),
                wire("empty.org", Vec::new()),
                wire("junk.org", vec![b"junk".to_vec()]),
                wire("other.org", vec![ca_of("other.org")]),
            ],
        };
        let first = federated_bundles(&message, &own, &FederatedBundles::new());
        let names: Vec<&str> = first.keys().map(TrustDomain::name).collect();
        assert_eq!(names, ["other.org"]);
        assert_eq!(*first[&TrustDomain::new("other.org").unwrap()], other);

        let again = federated_bundles(&message, &own, &first);
        let key = TrustDomain::new("other.org").unwrap();
        assert!(Arc::ptr_eq(&first[&key], &again[&key]));
    }
}
