//! `SyncEntries`: the entries an agent is entitled to, first as a diff
//! against what the agent holds, then as a diff each time they change.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use sigil::proto::sigil::agent::v1::{KnownEntry, SyncEntriesResponse};
use sigil::{Entry, SpiffeId};
use tonic::Status;

use super::Services;
use super::agent::SyncStream;

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
    }
}

fn revisions(entitled: &[Arc<Entry>]) -> Revisions {
    entitled
        .iter()
        .map(|e| (e.id.clone(), e.revision))
        .collect()
}

/// The stream for `agent`, which holds `known`. It ends only with an error:
/// UNAVAILABLE when the server shuts down.
pub(crate) fn stream(services: Arc<Services>, agent: SpiffeId, known: Revisions) -> SyncStream {
    let mut changes = services.registry.subscribe();
    let mut shutdown = services.shutdown.clone();
    Box::pin(async_stream::stream! {
        changes.borrow_and_update();
        let entitled = services.registry.entitled(&agent);
        let mut first = diff(&known, &entitled);
        first.bundle = Some(services.ca.bundle_proto());
        let mut held = revisions(&entitled);
        tracing::debug!(
            agent.id = %agent,
            upserted = first.upserted.len(),
            deleted = first.deleted.len(),
            "entry sync: initial state sent"
        );
        yield Ok(first);

        loop {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = shutdown.wait() => break,
            }
            let entitled = services.registry.entitled(&agent);
            let update = diff(&held, &entitled);
            if update.upserted.is_empty() && update.deleted.is_empty() {
                continue;
            }
            held = revisions(&entitled);
            tracing::debug!(
                agent.id = %agent,
                upserted = update.upserted.len(),
                deleted = update.deleted.len(),
                "entry sync: changes sent"
            );
            yield Ok(update);
        }
        yield Err(Status::unavailable("server shutting down"));
    })
}

#[cfg(test)]
mod tests {
    use sigil::TrustDomain;
    use sigil::proto::sigil::types::v1 as pb;

    use super::*;

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

    #[test]
    fn too_many_known_entries_are_refused() {
        let known = vec![KnownEntry::default(); MAX_KNOWN + 1];
        let status = known_entries(&known).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "known: at most 100000 entries");
    }
}
