//! The embedded [`Store`] backend, on sled.
//!
//! Its tests are the backends' conformance suite, in `store/tests.rs`.
//!
//! Trees: `entries` (entry ID → JSON entry), `join_tokens` (SHA-256 of the
//! token → JSON record), `used_tokens` (SHA-256 of an accepted k8s_psat
//! token → JSON record), `agents` (SPIFFE ID → JSON record),
//! `federated_bundles` (trust domain name → JSON record) and `meta` (the
//! revision counter, a big-endian u64, and the authority journal, JSON).

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sigil::{Entry, SpiffeId};

use super::{
    AgentRecord, FederatedBundleRecord, JoinTokenRecord, Store, StoreError, UsedTokenRecord,
};

const REVISION_KEY: &[u8] = b"entry_revision";
/// Key of the authority journal (JSON) in `meta`.
const CA_JOURNAL_KEY: &[u8] = b"ca_journal";

/// How many times [`SledStore::open`] tries a locked database.
const LOCK_ATTEMPTS: u32 = 100;

/// The pause between those attempts.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// A sled database holding the server's state.
#[derive(Debug, Clone)]
pub(crate) struct SledStore {
    db: sled::Db,
    entries: sled::Tree,
    join_tokens: sled::Tree,
    used_tokens: sled::Tree,
    agents: sled::Tree,
    meta: sled::Tree,
    federated_bundles: sled::Tree,
    issued_svids: sled::Tree,
}

impl SledStore {
    /// Opens (or creates) the database in `path`.
    ///
    /// The database's file lock is released only when sled's background
    /// flusher of a previous open has stopped, which nothing announces; a
    /// locked database is therefore tried again for up to
    /// [`LOCK_ATTEMPTS`] × [`LOCK_RETRY`] before it is reported as held by
    /// another process.
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        let mut attempt = 1;
        loop {
            match sled::Config::new().path(path).open() {
                Ok(db) => return Self::with_db(db),
                Err(sled::Error::Io(io)) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    if attempt == LOCK_ATTEMPTS {
                        return Err(StoreError::Backend(format!(
                            "{} is locked by another process (is another server using this data_dir?)",
                            path.display()
                        )));
                    }
                    attempt += 1;
                    std::thread::sleep(LOCK_RETRY);
                }
                Err(other) => return Err(backend(other)),
            }
        }
    }

    /// A database deleted when dropped.
    #[cfg(test)]
    pub(crate) fn temporary() -> Result<Self, StoreError> {
        Self::with_db(
            sled::Config::new()
                .temporary(true)
                .open()
                .map_err(backend)?,
        )
    }

    fn with_db(db: sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            entries: db.open_tree("entries").map_err(backend)?,
            join_tokens: db.open_tree("join_tokens").map_err(backend)?,
            used_tokens: db.open_tree("used_tokens").map_err(backend)?,
            agents: db.open_tree("agents").map_err(backend)?,
            meta: db.open_tree("meta").map_err(backend)?,
            federated_bundles: db.open_tree("federated_bundles").map_err(backend)?,
            issued_svids: db.open_tree("issued_svids").map_err(backend)?,
            db,
        })
    }
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Backend(format!("encoding a record: {e}")))
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn decode_counter(bytes: &[u8]) -> u64 {
    <[u8; 8]>::try_from(bytes).map_or(0, u64::from_be_bytes)
}

#[tonic::async_trait]
impl Store for SledStore {
    async fn put_entry(&self, entry: &Entry) -> Result<(), StoreError> {
        self.entries
            .insert(entry.id.as_bytes(), encode(entry)?)
            .map_err(backend)?;
        Ok(())
    }

    async fn get_entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        self.entries
            .get(id.as_bytes())
            .map_err(backend)?
            .map(|v| decode(id.as_bytes(), &v))
            .transpose()
    }

    async fn delete_entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        self.entries
            .remove(id.as_bytes())
            .map_err(backend)?
            .map(|v| decode(id.as_bytes(), &v))
            .transpose()
    }

    async fn list_entries(&self) -> Result<Vec<Entry>, StoreError> {
        self.entries
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(backend)?;
                decode(&k, &v)
            })
            .collect()
    }

    async fn next_revision(&self) -> Result<u64, StoreError> {
        let new = self
            .meta
            .update_and_fetch(REVISION_KEY, |old| {
                let next = old.map_or(0, decode_counter).saturating_add(1);
                Some(next.to_be_bytes().to_vec())
            })
            .map_err(backend)?;
        Ok(new.map_or(0, |v| decode_counter(&v)))
    }

    async fn put_join_token(
        &self,
        token_hash: &[u8],
        record: &JoinTokenRecord,
    ) -> Result<(), StoreError> {
        self.join_tokens
            .insert(token_hash, encode(record)?)
            .map_err(backend)?;
        Ok(())
    }

    async fn take_join_token(
        &self,
        token_hash: &[u8],
    ) -> Result<Option<JoinTokenRecord>, StoreError> {
        // `remove` is atomic: of concurrent removals only one sees the value.
        self.join_tokens
            .remove(token_hash)
            .map_err(backend)?
            .map(|v| decode(b"join token", &v))
            .transpose()
    }

    async fn put_used_token(
        &self,
        digest: &[u8],
        record: &UsedTokenRecord,
    ) -> Result<(), StoreError> {
        self.used_tokens
            .insert(digest, encode(record)?)
            .map_err(backend)?;
        Ok(())
    }

    async fn list_used_tokens(&self) -> Result<Vec<(Vec<u8>, UsedTokenRecord)>, StoreError> {
        self.used_tokens
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(backend)?;
                Ok((k.to_vec(), decode(b"used token", &v)?))
            })
            .collect()
    }

    async fn delete_used_tokens(&self, digests: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for digest in digests {
            batch.remove(digest.as_slice());
        }
        self.used_tokens.apply_batch(batch).map_err(backend)
    }

    async fn put_agent(&self, record: &AgentRecord) -> Result<(), StoreError> {
        self.agents
            .insert(record.spiffe_id.as_str().as_bytes(), encode(record)?)
            .map_err(backend)?;
        Ok(())
    }

    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>, StoreError> {
        let key = id.as_str().as_bytes();
        self.agents
            .get(key)
            .map_err(backend)?
            .map(|v| decode(key, &v))
            .transpose()
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.agents
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(backend)?;
                decode(&k, &v)
            })
            .collect()
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>, StoreError> {
        let key = id.as_str().as_bytes();
        self.agents
            .remove(key)
            .map_err(backend)?
            .map(|v| decode(key, &v))
            .transpose()
    }

    async fn put_federated_bundle(&self, record: &FederatedBundleRecord) -> Result<(), StoreError> {
        self.federated_bundles
            .insert(record.trust_domain.as_bytes(), encode(record)?)
            .map_err(backend)?;
        Ok(())
    }

    async fn list_federated_bundles(&self) -> Result<Vec<FederatedBundleRecord>, StoreError> {
        self.federated_bundles
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(backend)?;
                decode(&k, &v)
            })
            .collect()
    }

    async fn delete_federated_bundle(
        &self,
        trust_domain: &str,
    ) -> Result<Option<FederatedBundleRecord>, StoreError> {
        let key = trust_domain.as_bytes();
        self.federated_bundles
            .remove(key)
            .map_err(backend)?
            .map(|v| decode(key, &v))
            .transpose()
    }

    async fn get_ca_journal(&self) -> Result<Option<crate::ca::journal::Journal>, StoreError> {
        self.meta
            .get(CA_JOURNAL_KEY)
            .map_err(backend)?
            .map(|v| decode(CA_JOURNAL_KEY, &v))
            .transpose()
    }

    async fn put_ca_journal(
        &self,
        journal: &crate::ca::journal::Journal,
    ) -> Result<(), StoreError> {
        self.meta
            .insert(CA_JOURNAL_KEY, encode(journal)?)
            .map_err(backend)?;
        Ok(())
    }

    async fn put_issued_svids(
        &self,
        records: &[crate::ca::live::IssuedSvidRecord],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for record in records {
            batch.insert(record.key(), encode(record)?);
        }
        self.issued_svids.apply_batch(batch).map_err(backend)
    }

    async fn list_issued_svids(
        &self,
    ) -> Result<Vec<crate::ca::live::IssuedSvidRecord>, StoreError> {
        self.issued_svids
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(backend)?;
                decode(&key, &value)
            })
            .collect()
    }

    async fn delete_issued_svids(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key.as_slice());
        }
        self.issued_svids.apply_batch(batch).map_err(backend)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await.map_err(backend)?;
        Ok(())
    }
}
