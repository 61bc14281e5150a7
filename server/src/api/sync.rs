//! `SyncEntries`: the entries an agent is entitled to, first as a diff
//! against what the agent holds, then as a diff each time they change; the
//! bundle first and then each time it changes; the federated bundles its
//! entries federate with (and no other) first and then each time that set
//! changes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use sigil::proto::sigil::agent::v1::{FederatedBundles, KnownEntry, SyncEntriesResponse};
use sigil::proto::sigil::types::v1 as pb;
use sigil::{Entry, SpiffeId};
use tonic::Status;

use super::agent::SyncStream;
use super::{Services, agents, federation};
use crate::store::AgentRecord;

/// Most known entries an agent may report.
pub(crate) const MAX_KNOWN: usize = 100_000;

/// Entry ID → revision.
pub(crate) type Revisions = HashMap<String, u64>;

/// Checks the agent's known entries and indexes them.
pub(crate) fn known_entries(known: &[KnownEntry]) -> Result<Revisions, Status> {
    if known.len() > MAX_KNOWN {
        return Err(Status::invalid_argument(format!(
            "known: at most {MAX_KNOWN} entries"
        )));
    }
    Ok(known.iter().map(|k| (k.id.clone(), k.revision)).collect())
}

/// What to send to an agent that holds `held` so that it holds
/// `entitled`: the entries it lacks or holds at another revision, and the
/// IDs it holds that are no longer entitled (sorted).
pub(crate) fn diff(held: &Revisions, entitled: &[Arc<Entry>]) -> SyncEntriesResponse {
    let upserted = entitled
        .iter()
        .filter(|e| held.get(&e.id) != Some(&e.revision))
        .map(|e| e.to_proto())
        .collect();
    let current: HashSet<&str> = entitled.iter().map(|e| e.id.as_str()).collect();
    let mut deleted: Vec<String> = held
        .keys()
        .filter(|id| !current.contains(id.as_str()))
        .cloned()
        .collect();
    deleted.sort();
    SyncEntriesResponse {
        upserted,
        deleted,
        bundle: None,
        tainted_authority_keys: Vec::new(),
        federated_bundles: None,
    }
}

/// The federated bundles for `entitled`, if they differ from `sent`
/// (which then holds them).
fn federated_update(
    bundles: &federation::BundleMap,
    entitled: &[Arc<Entry>],
    sent: &mut Option<Vec<pb::Bundle>>,
) -> Option<FederatedBundles> {
    let relevant = federation::relevant(bundles, entitled);
    let unchanged = sent.as_ref().is_some_and(|sent| {
        sent.len() == relevant.len() && sent.iter().zip(&relevant).all(|(a, b)| a == *b)
    });
    if unchanged {
        return None;
    }
    let now: Vec<pb::Bundle> = relevant.into_iter().cloned().collect();
    *sent = Some(now.clone());
    Some(FederatedBundles { bundles: now })
}

fn revisions(entitled: &[Arc<Entry>]) -> Revisions {
    entitled
        .iter()
        .map(|e| (e.id.clone(), e.revision))
        .collect()
}

/// The stream for `agent`, which holds `known`. It ends only with an error:
/// UNAVAILABLE when the server shuts down, PERMISSION_DENIED when the agent
/// is evicted or banned. `agent_changes` must have been subscribed before
/// the agent was authenticated, so that no eviction or ban in between is
/// missed.
///
/// What the agent is entitled to is computed again after every entry
/// change (alias entries included) and every change of agent records, with
/// the agent's node selectors as its record holds them then, so the
/// entries under a node alias follow the agent as it gains or loses the
/// alias.
pub(crate) fn stream(
    services: Arc<Services>,
    agent: SpiffeId,
    known: Revisions,
    mut agent_changes: tokio::sync::watch::Receiver<u64>,
) -> SyncStream {
    let mut changes = services.registry.subscribe();
    let mut bundle_changes = services.ca.subscribe();
    let mut federated_changes = services.federated.subscribe();
    let mut shutdown = services.shutdown.clone();
    Box::pin(async_stream::stream! {
        changes.borrow_and_update();
        bundle_changes.borrow_and_update();
        let mut federated = Arc::clone(&federated_changes.borrow_and_update());
        let mut sent_federated = None;
        agent_changes.borrow_and_update();
        let mut record = match current_record(&services, &agent).await {
            Ok(record) => record,
            Err(status) => {
                yield Err(status);
                return;
            }
        };
        let entitled = services.registry.entitled(&record);
        let mut first = diff(&known, &entitled);
        let bundle = services.ca.bundle_proto();
        let mut sent_sequence = bundle.sequence;
        first.bundle = Some(bundle);
        let mut sent_tainted = services.ca.current().tainted.clone();
        first.tainted_authority_keys = sent_tainted.clone();
        first.federated_bundles = federated_update(&federated, &entitled, &mut sent_federated);
        let mut held = revisions(&entitled);
        tracing::debug!(
            agent.id = %agent,
            upserted = first.upserted.len(),
            deleted = first.deleted.len(),
            "entry sync: initial state sent"
        );
        yield Ok(first);

        let ending = loop {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        break shutting_down();
                    }
                }
                changed = agent_changes.changed() => {
                    if changed.is_err() {
                        break shutting_down();
                    }
                    match current_record(&services, &agent).await {
                        Ok(now) => record = now,
                        Err(status) => {
                            tracing::info!(agent.id = %agent, reason = %status.message(), "entry sync closed");
                            break status;
                        }
                    }
                }
                changed = bundle_changes.changed() => {
                    if changed.is_err() {
                        break shutting_down();
                    }
                }
                changed = federated_changes.changed() => {
                    if changed.is_err() {
                        break shutting_down();
                    }
                    federated = Arc::clone(&federated_changes.borrow_and_update());
                }
                () = shutdown.wait() => break shutting_down(),
            }
            let entitled = services.registry.entitled(&record);
            let mut update = diff(&held, &entitled);
            let bundle = services.ca.bundle_proto();
            if bundle.sequence != sent_sequence {
                sent_sequence = bundle.sequence;
                update.bundle = Some(bundle);
            }
            let tainted = &services.ca.current().tainted;
            if *tainted != sent_tainted {
                sent_tainted.clone_from(tainted);
                update.tainted_authority_keys.clone_from(tainted);
            }
            update.federated_bundles = federated_update(&federated, &entitled, &mut sent_federated);
            if update.upserted.is_empty()
                && update.deleted.is_empty()
                && update.bundle.is_none()
                && update.tainted_authority_keys.is_empty()
                && update.federated_bundles.is_none()
            {
                continue;
            }
            held = revisions(&entitled);
            tracing::debug!(
                agent.id = %agent,
                upserted = update.upserted.len(),
                deleted = update.deleted.len(),
                bundle.sequence = update.bundle.as_ref().map(|b| b.sequence),
                federated_bundles = update.federated_bundles.as_ref().map(|f| f.bundles.len()),
                "entry sync: changes sent"
            );
            yield Ok(update);
        };
        yield Err(ending);
    })
}

fn shutting_down() -> Status {
    Status::unavailable("server shutting down")
}

/// The record of `agent`, which must still be attested and not banned.
pub(crate) async fn current_record(
    services: &Services,
    agent: &SpiffeId,
) -> Result<AgentRecord, Status> {
    match services.store.get_agent(agent).await {
        Ok(Some(record)) if record.banned => Err(agents::banned(agent)),
        Ok(Some(record)) => Ok(record),
        Ok(None) => Err(agents::not_attested(agent)),
        Err(e) => Err(super::internal("reading the agent record", e)),
    }
}

#[cfg(test)]
mod tests {
    use sigil::TrustDomain;
    use sigil::proto::sigil::types::v1 as pb;

    use super::*;
    use crate::ca::{Ca, Published};

    fn entry(id: &str, revision: u64) -> Arc<Entry> {
        let td = TrustDomain::new("example.org").unwrap();
        let mut e = Entry::from_proto(
            &pb::Entry {
                spiffe_id: "spiffe://example.org/web".into(),
                parent_id: "spiffe://example.org/agent".into(),
                selectors: vec![pb::Selector {
                    r#type: "unix".into(),
                    value: "uid:1".into(),
                }],
                ..Default::default()
            },
            &td,
        )
        .unwrap();
        e.id = id.into();
        e.revision = revision;
        Arc::new(e)
    }

    #[test]
    fn the_diff_holds_new_changed_and_removed_entries() {
        let held: Revisions = [("same".into(), 1), ("old".into(), 1), ("gone".into(), 4)]
            .into_iter()
            .collect();
        let entitled = [entry("same", 1), entry("old", 2), entry("new", 3)];
        let d = diff(&held, &entitled);
        let mut upserted: Vec<(String, u64)> = d
            .upserted
            .iter()
            .map(|e| (e.id.clone(), e.revision))
            .collect();
        upserted.sort();
        assert_eq!(upserted, [("new".into(), 3), ("old".into(), 2)]);
        assert_eq!(d.deleted, ["gone"]);
        assert!(diff(&revisions(&entitled), &entitled).upserted.is_empty());
    }

    fn attested(id: &SpiffeId) -> AgentRecord {
        AgentRecord {
            spiffe_id: id.clone(),
            attestation_type: "join_token".into(),
            serial: "01".into(),
            previous_serial: None,
            expires_at: i64::MAX,
            created_at: 1,
            banned: false,
            selectors: sigil::Selectors::new(),
        }
    }

    fn published(authorities: &[&Arc<sigil::x509::Authority>], sequence: u64) -> Published {
        let td = TrustDomain::new("example.org").unwrap();
        let active = authorities[authorities.len() - 1];
        Published {
            active_id: format!("{sequence}"),
            active: Arc::clone(active),
            bundle: sigil::bundle::X509Bundle::new(
                td,
                authorities.iter().map(|a| a.cert().clone()).collect(),
            ),
            sequence,
            tainted: Vec::new(),
        }
    }

    /// Services over a fresh store and `ca`; keep the directory and the
    /// shutdown trigger alive while they are used.
    async fn services(ca: Arc<Ca>) -> (Arc<Services>, tempfile::TempDir, crate::shutdown::Trigger) {
        let td = TrustDomain::new("example.org").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::store::Store> =
            Arc::new(crate::store::SledStore::open(dir.path()).unwrap());
        let ttl = std::time::Duration::from_secs(3600);
        let (stop, shutdown) = crate::shutdown::channel();
        let services = Arc::new(Services {
            ca,
            store: Arc::clone(&store),
            registry: Arc::new(
                crate::registry::Registry::load(td.clone(), Arc::clone(&store))
                    .await
                    .unwrap(),
            ),
            tokens: Arc::new(crate::tokens::JoinTokens::new(td, Arc::clone(&store))),
            default_x509_svid_ttl: ttl,
            agent_svid_ttl: ttl,
            shutdown,
            agents: Default::default(),
            svids: Default::default(),
            federated: Default::default(),
        });
        (services, dir, stop)
    }

    /// The IDs of the entries a message adds or changes, sorted.
    fn upserted_ids(message: &SyncEntriesResponse) -> Vec<String> {
        let mut ids: Vec<String> = message.upserted.iter().map(|e| e.id.clone()).collect();
        ids.sort();
        ids
    }

    #[tokio::test]
    async fn entries_under_an_alias_follow_the_alias_and_the_agents_selectors() {
        use futures::StreamExt;

        let td = TrustDomain::new("example.org").unwrap();
        let ttl = std::time::Duration::from_secs(3600);
        let authority = Arc::new(sigil::x509::Authority::self_signed(&td, ttl).unwrap());
        let ca = Arc::new(Ca::new(published(&[&authority], 1), ttl));
        let (services, _dir, _stop) = services(ca).await;
        let agent: SpiffeId = "spiffe://example.org/sigil/agent/x509pop/1"
            .parse()
            .unwrap();
        let mut record = attested(&agent);
        services.store.put_agent(&record).await.unwrap();
        let changes = services.agents.changes.subscribe();
        let mut sync = stream(Arc::clone(&services), agent, Revisions::new(), changes);
        let initial = sync.next().await.unwrap().unwrap();
        assert!(initial.upserted.is_empty() && initial.deleted.is_empty());

        let wire = |spiffe_id: &str, parent_id: &str, selector: (&str, &str)| pb::Entry {
            spiffe_id: spiffe_id.into(),
            parent_id: parent_id.into(),
            selectors: vec![pb::Selector {
                r#type: selector.0.into(),
                value: selector.1.into(),
            }],
            ..Default::default()
        };
        let registry = &services.registry;
        let child = registry
            .create(&[wire(
                "spiffe://example.org/app",
                "spiffe://example.org/nodes/web",
                ("unix", "uid:1"),
            )])
            .await
            .remove(0)
            .unwrap();
        let alias = registry
            .create(&[wire(
                "spiffe://example.org/nodes/web",
                "spiffe://example.org/sigil/server",
                ("x509pop", "subject:cn:web"),
            )])
            .await
            .remove(0)
            .unwrap();

        // The agent attests again, now with the alias's selector: the
        // entry under the alias arrives (the alias entry itself does not).
        record.selectors = ["x509pop:subject:cn:web".parse().unwrap()]
            .into_iter()
            .collect();
        services.store.put_agent(&record).await.unwrap();
        services.agents.changes.send_modify(|n| *n += 1);
        let update = sync.next().await.unwrap().unwrap();
        assert_eq!(upserted_ids(&update), [child.id.as_str()]);

        // The alias entry is deleted: the entry leaves the agent.
        registry.delete(std::slice::from_ref(&alias.id)).await;
        let update = sync.next().await.unwrap().unwrap();
        assert!(update.upserted.is_empty());
        assert_eq!(update.deleted, [child.id.as_str()]);

        // A new alias entry naming the agent by its SPIFFE ID brings it
        // back.
        registry
            .create(&[wire(
                "spiffe://example.org/nodes/web",
                "spiffe://example.org/sigil/server",
                ("spiffe_id", "spiffe://example.org/sigil/agent/x509pop/1"),
            )])
            .await
            .remove(0)
            .unwrap();
        let update = sync.next().await.unwrap().unwrap();
        assert_eq!(upserted_ids(&update), [child.id.as_str()]);

        // Banned: the stream closes.
        record.banned = true;
        services.store.put_agent(&record).await.unwrap();
        services.agents.changes.send_modify(|n| *n += 1);
        let status = sync.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            status.message(),
            "agent spiffe://example.org/sigil/agent/x509pop/1 is banned"
        );
    }

    #[tokio::test]
    async fn a_bundle_change_is_pushed_on_an_open_stream() {
        use futures::StreamExt;

        let td = TrustDomain::new("example.org").unwrap();
        let ttl = std::time::Duration::from_secs(3600);
        let first = Arc::new(sigil::x509::Authority::self_signed(&td, ttl).unwrap());
        let second = Arc::new(sigil::x509::Authority::self_signed(&td, ttl).unwrap());
        let ca = Arc::new(Ca::new(published(&[&first], 1), ttl));
        let (services, _dir, _stop) = services(Arc::clone(&ca)).await;
        let agent: SpiffeId = "spiffe://example.org/agent".parse().unwrap();
        let store = Arc::clone(&services.store);
        store.put_agent(&attested(&agent)).await.unwrap();
        let changes = services.agents.changes.subscribe();
        let mut sync = stream(services, agent, Revisions::new(), changes);

        let initial = sync.next().await.unwrap().unwrap();
        assert_eq!(initial.bundle.unwrap().x509_authorities.len(), 1);

        // A new authority published: the bundle is pushed, with no entries.
        ca.publish(published(&[&first, &second], 2));
        let update = sync.next().await.unwrap().unwrap();
        let bundle = update.bundle.unwrap();
        assert_eq!(bundle.sequence, 2);
        assert_eq!(
            bundle.x509_authorities,
            [first.cert().to_vec(), second.cert().to_vec()]
        );
        assert!(update.upserted.is_empty() && update.deleted.is_empty());

        // Another signing authority with the same bundle sends nothing; the
        // next message is the next bundle.
        let mut same = published(&[&first, &second], 2);
        same.active = Arc::clone(&second);
        ca.publish(same);
        ca.publish(published(&[&second], 3));
        let update = sync.next().await.unwrap().unwrap();
        let bundle = update.bundle.unwrap();
        assert_eq!(bundle.sequence, 3);
        assert_eq!(bundle.x509_authorities, [second.cert().to_vec()]);
    }

    /// A bundle of `name` with one fresh authority.
    fn foreign_bundle(name: &str) -> pb::Bundle {
        let td = TrustDomain::new(name).unwrap();
        let ca =
            sigil::x509::Authority::self_signed(&td, std::time::Duration::from_secs(3600)).unwrap();
        pb::Bundle {
            trust_domain: name.into(),
            x509_authorities: vec![ca.cert().to_vec()],
            sequence: 1,
        }
    }

    /// The trust domains of the federated bundles a message carries, if it
    /// carries the set.
    fn federated_names(message: &SyncEntriesResponse) -> Option<Vec<&str>> {
        message
            .federated_bundles
            .as_ref()
            .map(|f| f.bundles.iter().map(|b| b.trust_domain.as_str()).collect())
    }

    #[tokio::test]
    async fn only_the_bundles_the_agents_entries_federate_with_are_sent_and_pushed() {
        use futures::StreamExt;

        let td = TrustDomain::new("example.org").unwrap();
        let ttl = std::time::Duration::from_secs(3600);
        let authority = Arc::new(sigil::x509::Authority::self_signed(&td, ttl).unwrap());
        let ca = Arc::new(Ca::new(published(&[&authority], 1), ttl));
        let (services, _dir, _stop) = services(ca).await;
        let agent: SpiffeId = "spiffe://example.org/agent".parse().unwrap();
        services.store.put_agent(&attested(&agent)).await.unwrap();
        let one = foreign_bundle("one.org");
        federation::set(&services, Some(one.clone())).await.unwrap();
        federation::set(&services, Some(foreign_bundle("two.org")))
            .await
            .unwrap();
        let wire = |spiffe_id: &str, parent_id: &str, federates_with: &[&str]| pb::Entry {
            spiffe_id: spiffe_id.into(),
            parent_id: parent_id.into(),
            selectors: vec![pb::Selector {
                r#type: "unix".into(),
                value: "uid:1".into(),
            }],
            federates_with: federates_with.iter().map(|&n| n.into()).collect(),
            ..Default::default()
        };
        // The agent's entry federates with one.org and with four.org, which
        // has no bundle yet; another agent's entry federates with two.org.
        let mine = services
            .registry
            .create(&[
                wire(
                    "spiffe://example.org/web",
                    "spiffe://example.org/agent",
                    &["four.org", "one.org"],
                ),
                wire(
                    "spiffe://example.org/db",
                    "spiffe://example.org/other-agent",
                    &["two.org"],
                ),
            ])
            .await
            .remove(0)
            .unwrap();
        let changes = services.agents.changes.subscribe();
        let mut sync = stream(Arc::clone(&services), agent, Revisions::new(), changes);

        let initial = sync.next().await.unwrap().unwrap();
        assert_eq!(upserted_ids(&initial), [mine.id.as_str()]);
        let sent = initial.federated_bundles.unwrap().bundles;
        assert_eq!(sent, [one]);

        // A bundle no entry of the agent federates with sends nothing; the
        // next message is the new one.org bundle.
        federation::set(&services, Some(foreign_bundle("three.org")))
            .await
            .unwrap();
        let renewed = foreign_bundle("one.org");
        federation::set(&services, Some(renewed.clone()))
            .await
            .unwrap();
        let update = sync.next().await.unwrap().unwrap();
        assert!(update.upserted.is_empty() && update.deleted.is_empty());
        assert!(update.bundle.is_none());
        assert_eq!(update.federated_bundles.unwrap().bundles, [renewed]);

        // four.org's bundle arrives: the full set is sent again.
        federation::set(&services, Some(foreign_bundle("four.org")))
            .await
            .unwrap();
        let update = sync.next().await.unwrap().unwrap();
        assert_eq!(federated_names(&update), Some(vec!["four.org", "one.org"]));

        // Deleting one.org's bundle removes it from the set.
        federation::delete(&services, "one.org").await.unwrap();
        let update = sync.next().await.unwrap().unwrap();
        assert_eq!(federated_names(&update), Some(vec!["four.org"]));

        // The entry stops federating: the set is sent, now empty, with the
        // entry.
        let mut changed = mine.to_proto();
        changed.federates_with.clear();
        services
            .registry
            .update(&[changed])
            .await
            .remove(0)
            .unwrap();
        let update = sync.next().await.unwrap().unwrap();
        assert_eq!(upserted_ids(&update), [mine.id.as_str()]);
        assert_eq!(federated_names(&update), Some(vec![]));

        // An entry change that leaves the set alone does not send it.
        let mut hinted = services.registry.get(&mine.id).unwrap().to_proto();
        hinted.hint = "web".into();
        services.registry.update(&[hinted]).await.remove(0).unwrap();
        let update = sync.next().await.unwrap().unwrap();
        assert_eq!(upserted_ids(&update), [mine.id.as_str()]);
        assert!(update.federated_bundles.is_none());
    }

    #[test]
    fn too_many_known_entries_are_refused() {
        let known = vec![KnownEntry::default(); MAX_KNOWN + 1];
        let status = known_entries(&known).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "known: at most 100000 entries");
    }
}
