//! Which live SVIDs each authority signed, and on which agents: an index
//! agent ID → entry ID → (authority ID, notAfter), kept in memory and in the
//! store. An agent's own SVID is filed under the entry ID
//! [`AGENT_SVID`]. A newer SVID for the same agent and entry replaces the
//! older one; expired SVIDs do not count and are pruned when the index is
//! read.
//!
//! Issuance writes the store without flushing (the store flushes on its own
//! shortly after): a crash may lose the last SVIDs signed, which then do not
//! count until the agent renews them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

/// The entry ID under which an agent's own SVID is filed.
pub(crate) const AGENT_SVID: &str = "";

/// One SVID, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IssuedSvidRecord {
    /// The agent holding it.
    pub(crate) agent_id: String,
    /// Its entry ([`AGENT_SVID`] for the agent's own).
    pub(crate) entry_id: String,
    /// The ID of the authority that signed it.
    pub(crate) authority_id: String,
    /// Its notAfter, in seconds since the Unix epoch.
    pub(crate) not_after: i64,
}

impl IssuedSvidRecord {
    /// The store key: agent ID and entry ID, separated by a NUL byte.
    pub(crate) fn key(&self) -> Vec<u8> {
        key(&self.agent_id, &self.entry_id)
    }
}

/// The store key of an agent's SVID for an entry.
pub(crate) fn key(agent_id: &str, entry_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(agent_id.len() + 1 + entry_id.len());
    key.extend_from_slice(agent_id.as_bytes());
    key.push(0);
    key.extend_from_slice(entry_id.as_bytes());
    key
}

/// The authority ID and notAfter of one SVID.
#[derive(Debug, Clone)]
struct Signed {
    authority_id: Arc<str>,
    not_after: i64,
}

/// The live SVIDs one authority signed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// All agents together.
    pub(crate) svids: usize,
    /// Per agent, ordered by agent ID.
    pub(crate) agents: BTreeMap<String, usize>,
}

/// The index. See the module documentation.
#[derive(Debug)]
pub(crate) struct LiveSvids {
    store: Option<Arc<dyn Store>>,
    index: Mutex<HashMap<String, HashMap<String, Signed>>>,
}

impl Default for LiveSvids {
    /// An index kept in memory only.
    fn default() -> Self {
        Self {
            store: None,
            index: Mutex::new(HashMap::new()),
        }
    }
}

impl LiveSvids {
    /// Loads the index from `store`, leaving out (and deleting) SVIDs
    /// expired by `now`, and keeps it there.
    pub(crate) async fn load(store: Arc<dyn Store>, now: i64) -> Result<Self, StoreError> {
        let mut index: HashMap<String, HashMap<String, Signed>> = HashMap::new();
        let mut expired = Vec::new();
        let mut authorities: HashMap<String, Arc<str>> = HashMap::new();
        for record in store.list_issued_svids().await? {
            if record.not_after <= now {
                expired.push(record.key());
                continue;
            }
            let authority_id = Arc::clone(
                authorities
                    .entry(record.authority_id.clone())
                    .or_insert_with(|| Arc::from(record.authority_id.as_str())),
            );
            index.entry(record.agent_id).or_default().insert(
                record.entry_id,
                Signed {
                    authority_id,
                    not_after: record.not_after,
                },
            );
        }
        if !expired.is_empty() {
            store.delete_issued_svids(&expired).await?;
        }
        Ok(Self {
            store: Some(store),
            index: Mutex::new(index),
        })
    }

    /// Records SVIDs just signed by `authority_id` for `agent_id`: pairs of
    /// entry ID and notAfter. Each replaces the agent's previous SVID for
    /// the entry.
    pub(crate) async fn record(
        &self,
        agent_id: &str,
        authority_id: &str,
        svids: impl IntoIterator<Item = (String, i64)>,
    ) -> Result<(), StoreError> {
        let svids: Vec<(String, i64)> = svids.into_iter().collect();
        let authority: Arc<str> = Arc::from(authority_id);
        {
            let mut index = self.lock();
            let held = index.entry(agent_id.to_owned()).or_default();
            for (entry_id, not_after) in &svids {
                held.insert(
                    entry_id.clone(),
                    Signed {
                        authority_id: Arc::clone(&authority),
                        not_after: *not_after,
                    },
                );
            }
        }
        let Some(store) = &self.store else {
            return Ok(());
        };
        let records: Vec<IssuedSvidRecord> = svids
            .into_iter()
            .map(|(entry_id, not_after)| IssuedSvidRecord {
                agent_id: agent_id.to_owned(),
                entry_id,
                authority_id: authority_id.to_owned(),
                not_after,
            })
            .collect();
        store.put_issued_svids(&records).await
    }

    /// The live SVIDs each authority signed, by authority ID, as of `now`.
    /// Expired SVIDs are pruned from the index and the store.
    pub(crate) async fn usage(&self, now: i64) -> Result<HashMap<String, Usage>, StoreError> {
        let mut usage: HashMap<String, Usage> = HashMap::new();
        let mut expired = Vec::new();
        {
            let mut index = self.lock();
            index.retain(|agent_id, held| {
                held.retain(|entry_id, signed| {
                    if signed.not_after <= now {
                        expired.push(key(agent_id, entry_id));
                        return false;
                    }
                    let of = usage.entry(signed.authority_id.to_string()).or_default();
                    of.svids += 1;
                    *of.agents.entry(agent_id.clone()).or_default() += 1;
                    true
                });
                !held.is_empty()
            });
        }
        if let Some(store) = &self.store
            && !expired.is_empty()
        {
            store.delete_issued_svids(&expired).await?;
        }
        Ok(usage)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, Signed>>> {
        // A panic while holding the lock leaves a map that is still
        // consistent (every change is a single insert or retain).
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    #[tokio::test]
    async fn newer_svids_replace_older_ones_expired_ones_do_not_count_and_a_reload_agrees() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let live = LiveSvids::load(Arc::clone(&store), 0).await.unwrap();
        live.record("agent-1", "a", [("e1".into(), 100), ("e2".into(), 100)])
            .await
            .unwrap();
        live.record("agent-1", "a", [(AGENT_SVID.into(), 50)])
            .await
            .unwrap();
        live.record("agent-2", "a", [("e1".into(), 100)])
            .await
            .unwrap();
        // e2 renewed by another authority on agent-1.
        live.record("agent-1", "b", [("e2".into(), 200)])
            .await
            .unwrap();

        let usage = live.usage(10).await.unwrap();
        assert_eq!(usage["a"].svids, 3);
        assert_eq!(
            usage["a"].agents,
            [("agent-1".to_owned(), 2), ("agent-2".to_owned(), 1)].into()
        );
        assert_eq!(usage["b"].svids, 1);

        // The agent SVID expired at 50.
        let usage = live.usage(60).await.unwrap();
        assert_eq!(usage["a"].svids, 2);

        store.flush().await.unwrap();
        drop(live);
        let reloaded = LiveSvids::load(Arc::clone(&store), 60).await.unwrap();
        assert_eq!(reloaded.usage(60).await.unwrap(), usage);
        assert_eq!(store.list_issued_svids().await.unwrap().len(), 3);
        assert!(!reloaded.usage(100).await.unwrap().contains_key("a"));
        assert_eq!(store.list_issued_svids().await.unwrap().len(), 1);
    }
}
