//! The [`Store`] backend on PostgreSQL, for a server whose state lives in
//! a database server rather than in its data directory.
//!
//! Tables (all prefixed `sigil_`): `schema` (one row: the schema version),
//! `entries` (entry ID → JSONB entry), `join_tokens` (SHA-256 of the token
//! → JSONB record), `used_tokens` (SHA-256 of an accepted k8s_psat token →
//! JSONB record), `agents` (SPIFFE ID → JSONB record), `ca_journal` (one
//! row: the authority journal), `federated_bundles` (trust domain name →
//! JSONB record) and `issued_svids` (agent and entry → JSONB record), plus
//! the sequence `sigil_entry_revision`. The records are the same serde
//! values the sled backend stores. Text keys use the `C` collation, so
//! listings come in the byte order sled lists them in.
//!
//! Every method is one statement, which PostgreSQL commits (durably) before
//! it answers: a write is durable when the method returns, and
//! [`Store::flush`] has nothing left to do.
//!
//! One server per database: [`PostgresStore::connect`] takes a
//! session-level advisory lock, waiting up to [`LOCK_WAIT`] for it, that
//! PostgreSQL releases when the connection ends. The connection is not re-established when it is lost;
//! the receiver `connect` returns reports the loss so the server can stop.
//! The connection is made without TLS.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sigil::{Entry, SpiffeId};
use tokio::sync::oneshot;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};

use super::{
    AgentRecord, FederatedBundleRecord, JoinTokenRecord, Store, StoreError, UsedTokenRecord,
};
use crate::ca::journal::Journal;
use crate::ca::live::IssuedSvidRecord;

/// The version of the tables below; a database holding another version is
/// refused.
const SCHEMA_VERSION: i32 = 1;

/// The key of the advisory lock a server holds on its database.
const LOCK_KEY: i64 = 0x5349_4749_4c00_0001;

/// How long [`PostgresStore::connect`] waits for the advisory lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// What a start-up reports when another server holds the lock.
pub(crate) const LOCKED_MESSAGE: &str = "another sigil-server is using this database";

const SCHEMA_TABLE: &str = "
    CREATE TABLE IF NOT EXISTS sigil_schema (version INTEGER NOT NULL);
    INSERT INTO sigil_schema (version)
        SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM sigil_schema);
";

const TABLES: &str = r#"
    CREATE TABLE IF NOT EXISTS sigil_entries (
        id TEXT COLLATE "C" PRIMARY KEY, record JSONB NOT NULL);
    CREATE SEQUENCE IF NOT EXISTS sigil_entry_revision;
    CREATE TABLE IF NOT EXISTS sigil_join_tokens (
        token_hash BYTEA PRIMARY KEY, record JSONB NOT NULL);
    CREATE TABLE IF NOT EXISTS sigil_used_tokens (
        digest BYTEA PRIMARY KEY, record JSONB NOT NULL);
    CREATE TABLE IF NOT EXISTS sigil_agents (
        spiffe_id TEXT COLLATE "C" PRIMARY KEY, record JSONB NOT NULL);
    CREATE TABLE IF NOT EXISTS sigil_ca_journal (
        id BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id), record JSONB NOT NULL);
    CREATE TABLE IF NOT EXISTS sigil_federated_bundles (
        trust_domain TEXT COLLATE "C" PRIMARY KEY, record JSONB NOT NULL);
    CREATE TABLE IF NOT EXISTS sigil_issued_svids (
        key BYTEA PRIMARY KEY, record JSONB NOT NULL);
"#;

/// A connection to the PostgreSQL database holding the server's state.
pub(crate) struct PostgresStore {
    client: Client,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects, takes the database's advisory lock and creates the tables
    /// that are missing. The receiver gets why the connection ended, once
    /// it has.
    pub(crate) async fn connect(
        config: &tokio_postgres::Config,
    ) -> Result<(Self, oneshot::Receiver<String>), StoreError> {
        let (client, connection) = config.connect(NoTls).await.map_err(|e| {
            StoreError::Backend(format!("connecting to PostgreSQL: {}", detail(&e)))
        })?;
        let (lost_tx, lost) = oneshot::channel();
        tokio::spawn(async move {
            let reason = match connection.await {
                Ok(()) => "the connection to PostgreSQL closed".to_owned(),
                Err(e) => format!("the connection to PostgreSQL failed: {}", detail(&e)),
            };
            let _ = lost_tx.send(reason);
        });

        // The lock of a server that just stopped is released when
        // PostgreSQL has ended its session, a moment after the server has
        // gone: wait that long for it.
        client
            .batch_execute(&format!("SET lock_timeout = '{}ms'", LOCK_WAIT.as_millis()))
            .await
            .map_err(backend)?;
        match client
            .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
            .await
        {
            Ok(_) => {}
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                return Err(StoreError::Backend(LOCKED_MESSAGE.into()));
            }
            Err(e) => return Err(backend(e)),
        }
        client
            .batch_execute("RESET lock_timeout")
            .await
            .map_err(backend)?;
        client.batch_execute(SCHEMA_TABLE).await.map_err(backend)?;
        let version: i32 = client
            .query_one("SELECT max(version) FROM sigil_schema", &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(backend)?;
        if version != SCHEMA_VERSION {
            return Err(StoreError::Backend(format!(
                "the database holds schema version {version}; this server uses version {SCHEMA_VERSION}"
            )));
        }
        client.batch_execute(TABLES).await.map_err(backend)?;
        Ok((Self { client }, lost))
    }

    /// Runs a statement that returns at most one record.
    async fn record<T: DeserializeOwned>(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<T>, StoreError> {
        self.client
            .query_opt(sql, params)
            .await
            .map_err(backend)?
            .map(|row| decode(what, &row, 0))
            .transpose()
    }

    /// Runs a statement whose rows are (key, record).
    async fn records<T: DeserializeOwned>(&self, sql: &str) -> Result<Vec<T>, StoreError> {
        self.client
            .query(sql, &[])
            .await
            .map_err(backend)?
            .iter()
            .map(|row| {
                let key: String = row.try_get(0).map_err(backend)?;
                decode(&key, row, 1)
            })
            .collect()
    }

    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<(), StoreError> {
        self.client.execute(sql, params).await.map_err(backend)?;
        Ok(())
    }
}

/// The message of an error with its causes (tokio-postgres puts the
/// server's message in the source).
pub(crate) fn detail(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn backend(e: tokio_postgres::Error) -> StoreError {
    StoreError::Backend(format!("PostgreSQL: {}", detail(&e)))
}

fn encode<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Backend(format!("encoding a record: {e}")))
}

/// Decodes column `index` of `row`, the record as JSON text.
fn decode<T: DeserializeOwned>(key: &str, row: &Row, index: usize) -> Result<T, StoreError> {
    let text: String = row.try_get(index).map_err(backend)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

#[tonic::async_trait]
impl Store for PostgresStore {
    async fn put_entry(&self, entry: &Entry) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO sigil_entries (id, record) VALUES ($1, $2::text::jsonb)
             ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
            &[&entry.id, &encode(entry)?],
        )
        .await
    }

    async fn get_entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        self.record(
            id,
            "SELECT record::text FROM sigil_entries WHERE id = $1",
            &[&id],
        )
        .await
    }

    async fn delete_entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        self.record(
            id,
            "DELETE FROM sigil_entries WHERE id = $1 RETURNING record::text",
            &[&id],
        )
        .await
    }

    async fn list_entries(&self) -> Result<Vec<Entry>, StoreError> {
        self.records("SELECT id, record::text FROM sigil_entries ORDER BY id")
            .await
    }

    async fn next_revision(&self) -> Result<u64, StoreError> {
        // A sequence never hands out a value twice, also across crashes.
        let next: i64 = self
            .client
            .query_one("SELECT nextval('sigil_entry_revision')", &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(backend)?;
        u64::try_from(next)
            .map_err(|_| StoreError::Backend(format!("entry revision {next} is negative")))
    }

    async fn put_join_token(
        &self,
        token_hash: &[u8],
        record: &JoinTokenRecord,
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO sigil_join_tokens (token_hash, record) VALUES ($1, $2::text::jsonb)
             ON CONFLICT (token_hash) DO UPDATE SET record = EXCLUDED.record",
            &[&token_hash, &encode(record)?],
        )
        .await
    }

    async fn take_join_token(
        &self,
        token_hash: &[u8],
    ) -> Result<Option<JoinTokenRecord>, StoreError> {
        // Of concurrent deletions of one row only one returns it.
        self.record(
            "join token",
            "DELETE FROM sigil_join_tokens WHERE token_hash = $1 RETURNING record::text",
            &[&token_hash],
        )
        .await
    }

    async fn put_used_token(
        &self,
        digest: &[u8],
        record: &UsedTokenRecord,
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO sigil_used_tokens (digest, record) VALUES ($1, $2::text::jsonb)
             ON CONFLICT (digest) DO UPDATE SET record = EXCLUDED.record",
            &[&digest, &encode(record)?],
        )
        .await
    }

    async fn list_used_tokens(&self) -> Result<Vec<(Vec<u8>, UsedTokenRecord)>, StoreError> {
        self.client
            .query(
                "SELECT digest, record::text FROM sigil_used_tokens ORDER BY digest",
                &[],
            )
            .await
            .map_err(backend)?
            .iter()
            .map(|row| {
                let digest: Vec<u8> = row.try_get(0).map_err(backend)?;
                Ok((digest, decode("used token", row, 1)?))
            })
            .collect()
    }

    async fn delete_used_tokens(&self, digests: &[Vec<u8>]) -> Result<(), StoreError> {
        if digests.is_empty() {
            return Ok(());
        }
        self.execute(
            "DELETE FROM sigil_used_tokens WHERE digest = ANY($1)",
            &[&digests],
        )
        .await
    }

    async fn put_agent(&self, record: &AgentRecord) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO sigil_agents (spiffe_id, record) VALUES ($1, $2::text::jsonb)
             ON CONFLICT (spiffe_id) DO UPDATE SET record = EXCLUDED.record",
            &[&record.spiffe_id.as_str(), &encode(record)?],
        )
        .await
    }

    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>, StoreError> {
        self.record(
            id.as_str(),
            "SELECT record::text FROM sigil_agents WHERE spiffe_id = $1",
            &[&id.as_str()],
        )
        .await
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.records("SELECT spiffe_id, record::text FROM sigil_agents ORDER BY spiffe_id")
            .await
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>, StoreError> {
        self.record(
            id.as_str(),
            "DELETE FROM sigil_agents WHERE spiffe_id = $1 RETURNING record::text",
            &[&id.as_str()],
        )
        .await
    }

    async fn get_ca_journal(&self) -> Result<Option<Journal>, StoreError> {
        self.record(
            "ca_journal",
            "SELECT record::text FROM sigil_ca_journal",
            &[],
        )
        .await
    }

    async fn put_ca_journal(&self, journal: &Journal) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO sigil_ca_journal (record) VALUES ($1::text::jsonb)
             ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
            &[&encode(journal)?],
        )
        .await
    }

    async fn put_federated_bundle(&self, record: &FederatedBundleRecord) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO sigil_federated_bundles (trust_domain, record)
             VALUES ($1, $2::text::jsonb)
             ON CONFLICT (trust_domain) DO UPDATE SET record = EXCLUDED.record",
            &[&record.trust_domain, &encode(record)?],
        )
        .await
    }

    async fn list_federated_bundles(&self) -> Result<Vec<FederatedBundleRecord>, StoreError> {
        self.records(
            "SELECT trust_domain, record::text FROM sigil_federated_bundles ORDER BY trust_domain",
        )
        .await
    }

    async fn delete_federated_bundle(
        &self,
        trust_domain: &str,
    ) -> Result<Option<FederatedBundleRecord>, StoreError> {
        self.record(
            trust_domain,
            "DELETE FROM sigil_federated_bundles WHERE trust_domain = $1 RETURNING record::text",
            &[&trust_domain],
        )
        .await
    }

    async fn put_issued_svids(&self, records: &[IssuedSvidRecord]) -> Result<(), StoreError> {
        // One statement may not update a row twice: the last record of a
        // key wins, as in a sled batch.
        let mut by_key = BTreeMap::new();
        for record in records {
            by_key.insert(record.key(), encode(record)?);
        }
        if by_key.is_empty() {
            return Ok(());
        }
        let (keys, values): (Vec<Vec<u8>>, Vec<String>) = by_key.into_iter().unzip();
        self.execute(
            "INSERT INTO sigil_issued_svids (key, record)
             SELECT key, record::jsonb FROM unnest($1::bytea[], $2::text[]) AS t(key, record)
             ON CONFLICT (key) DO UPDATE SET record = EXCLUDED.record",
            &[&keys, &values],
        )
        .await
    }

    async fn list_issued_svids(&self) -> Result<Vec<IssuedSvidRecord>, StoreError> {
        self.client
            .query(
                "SELECT key, record::text FROM sigil_issued_svids ORDER BY key",
                &[],
            )
            .await
            .map_err(backend)?
            .iter()
            .map(|row| {
                let key: Vec<u8> = row.try_get(0).map_err(backend)?;
                decode(&String::from_utf8_lossy(&key), row, 1)
            })
            .collect()
    }

    async fn delete_issued_svids(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.execute(
            "DELETE FROM sigil_issued_svids WHERE key = ANY($1)",
            &[&keys],
        )
        .await
    }

    /// Nothing to do: PostgreSQL has committed every write durably before
    /// the method that made it returned.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
