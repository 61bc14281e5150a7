//! Removal of expired entries.
//!
//! An entry stops entitling agents the moment it expires (see
//! [`Registry::entitled`]); [`prune`] then deletes it the way an operator's
//! delete does, so the agents' sync streams drop it at once. The pruner wakes
//! every [`PRUNE_INTERVAL`], and also at the earliest expiry in between, so
//! workloads lose an expired identity without waiting for the next round.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::Registry;
use crate::clock;
use crate::shutdown::Shutdown;

/// How often expired entries are looked for when none is due sooner.
pub(crate) const PRUNE_INTERVAL: Duration = Duration::from_secs(30);

/// Deletes expired entries until shutdown.
pub(crate) async fn prune(registry: Arc<Registry>, mut shutdown: Shutdown) {
    let mut changes = registry.subscribe();
    loop {
        changes.borrow_and_update();
        let wait = registry
            .next_expiry()
            .map_or(PRUNE_INTERVAL, |at| until(at).min(PRUNE_INTERVAL));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            // A new or changed entry may expire before the current wait ends.
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            () = shutdown.wait() => return,
        }
        if !prune_once(&registry, clock::now_unix()).await {
            // The store failed; do not retry in a tight loop.
            tokio::select! {
                () = tokio::time::sleep(PRUNE_INTERVAL) => {}
                () = shutdown.wait() => return,
            }
        }
    }
}

/// Deletes the entries expired at `now` and logs the outcome; false if any
/// deletion failed.
pub(crate) async fn prune_once(registry: &Registry, now: i64) -> bool {
    let mut all_deleted = true;
    for result in registry.prune_expired(now).await {
        match result {
            Ok(entry) => tracing::info!(
                entry.id = %entry.id,
                spiffe.id = %entry.spiffe_id,
                expires_at = %clock::rfc3339(entry.expires_at.unwrap_or(now)),
                "expired entry deleted"
            ),
            Err(e) => {
                all_deleted = false;
                tracing::warn!(
                    error = %e,
                    retry_in_secs = PRUNE_INTERVAL.as_secs(),
                    "deleting an expired entry failed"
                );
            }
        }
    }
    all_deleted
}

/// The wall-clock time from now until `at` (seconds since the Unix epoch);
/// zero if it has passed.
fn until(at: i64) -> Duration {
    clock::from_unix(at)
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use sigil::TrustDomain;
    use sigil::proto::sigil::types::v1 as pb;

    use super::*;
    use crate::shutdown;
    use crate::store::SledStore;

    const AGENT: &str = "spiffe://example.org/sigil/agent/join_token/a1";

    fn wire(path: &str, expires_at: i64) -> pb::Entry {
        pb::Entry {
            spiffe_id: format!("spiffe://example.org{path}"),
            parent_id: AGENT.into(),
            selectors: vec![pb::Selector {
                r#type: "unix".into(),
                value: "uid:1".into(),
            }],
            expires_at,
            ..Default::default()
        }
    }

    async fn registry(dir: &tempfile::TempDir) -> Arc<Registry> {
        let store = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
        let td = TrustDomain::new("example.org").unwrap();
        Arc::new(Registry::load(td, store).await.unwrap())
    }

    #[tokio::test]
    async fn the_pruner_deletes_an_expired_entry_and_notifies_subscribers() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(&dir).await;
        let past = clock::now_unix() - 10;
        let far = clock::now_unix() + 3600;
        let results = r
            .create(&[wire("/gone", past), wire("/kept", far), wire("/forever", 0)])
            .await;
        let gone = results[0].as_ref().unwrap().id.clone();
        let mut changes = r.subscribe();
        changes.borrow_and_update();

        let (trigger, shutdown) = shutdown::channel();
        let task = tokio::spawn(prune(Arc::clone(&r), shutdown));
        tokio::time::timeout(Duration::from_secs(10), changes.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(r.get(&gone).is_none());
        assert_eq!(r.len(), 2);
        assert_eq!(r.next_expiry(), Some(far));

        trigger.fire();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_pruner_keeps_waiting_and_stops_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(&dir).await;
        let (trigger, shutdown) = shutdown::channel();
        let task = tokio::spawn(prune(Arc::clone(&r), shutdown));
        tokio::time::sleep(PRUNE_INTERVAL * 3).await;
        assert!(!task.is_finished());
        trigger.fire();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn prune_once_removes_only_expired_entries() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(&dir).await;
        r.create(&[wire("/a", 100), wire("/b", 200), wire("/c", 0)])
            .await;
        assert!(prune_once(&r, 150).await);
        assert_eq!(r.len(), 2);
        assert!(prune_once(&r, 200).await);
        assert_eq!(r.len(), 1);
    }
}
