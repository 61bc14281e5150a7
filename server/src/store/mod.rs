//! Durable state of the server: registration entries, the entry revision
//! counter, join tokens, attested agents, used k8s_psat tokens and other
//! trust domains' bundles.
//!
//! [`Store`] is backend-neutral: records travel as serde values of the
//! domain types, so a SQL backend can implement it as well as the embedded
//! [`sled`](self::sled) one; [`postgres`](self::postgres) is that SQL
//! backend. Mutating methods do not flush; callers call
//! [`Store::flush`] once before they report success, so a batch costs one
//! disk sync.

pub(crate) mod postgres;
pub(crate) mod sled;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use sigil::{Entry, Selectors, SpiffeId};

pub(crate) use self::postgres::PostgresStore;
pub(crate) use self::sled::SledStore;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// The storage backend failed.
    #[error("storage backend: {0}")]
    Backend(String),
    /// A stored record could not be decoded.
    #[error("stored record {key:?} is corrupt: {reason}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// Why it could not be decoded.
        reason: String,
    },
}

/// A one-time join token as stored: only the token's SHA-256 is the key, so
/// the store never holds the secret itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JoinTokenRecord {
    /// A random public identifier of the token (not the secret).
    pub(crate) token_id: String,
    /// The SPIFFE ID the agent attesting with the token receives.
    pub(crate) agent_id: SpiffeId,
    /// Expiry in seconds since the Unix epoch.
    pub(crate) expires_at: i64,
}

/// A k8s_psat token the server accepted, stored under its SHA-256 (never
/// the token itself) until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct UsedTokenRecord {
    /// The agent ID the token attested: the only one it may attest again.
    pub(crate) agent_id: SpiffeId,
    /// The token's expiry in seconds since the Unix epoch.
    pub(crate) expires_at: i64,
}

/// An attested agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AgentRecord {
    /// The agent's SPIFFE ID.
    pub(crate) spiffe_id: SpiffeId,
    /// The node attestor it attested with, e.g. `join_token`.
    pub(crate) attestation_type: String,
    /// Serial number (lowercase hex) of the agent's current SVID.
    pub(crate) serial: String,
    /// Serial number of the SVID it held before its last renewal, still
    /// accepted so that a lost renewal response does not lock it out.
    pub(crate) previous_serial: Option<String>,
    /// notAfter of the current SVID, in seconds since the Unix epoch.
    pub(crate) expires_at: i64,
    /// First attestation, in seconds since the Unix epoch.
    pub(crate) created_at: i64,
    /// A banned agent can neither renew, sync, sign nor attest again.
    #[serde(default)]
    pub(crate) banned: bool,
    /// Node selectors its node attestor vouched for (none for join tokens).
    #[serde(default)]
    pub(crate) selectors: Selectors,
}

/// Another trust domain's bundle, kept for federation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FederatedBundleRecord {
    /// The trust domain's name, e.g. `other.org`.
    pub(crate) trust_domain: String,
    /// Its X.509 authorities as PEM certificates.
    pub(crate) x509_authorities_pem: String,
    /// The sequence number the bundle came with, or 0.
    pub(crate) sequence: u64,
}

/// Durable storage of the server's state.
#[tonic::async_trait]
pub(crate) trait Store: Send + Sync + std::fmt::Debug {
    /// Inserts or replaces an entry, keyed by its ID.
    async fn put_entry(&self, entry: &Entry) -> Result<(), StoreError>;

    /// One entry.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "the registry serves reads from memory")
    )]
    async fn get_entry(&self, id: &str) -> Result<Option<Entry>, StoreError>;

    /// Removes an entry and returns it, if it existed.
    async fn delete_entry(&self, id: &str) -> Result<Option<Entry>, StoreError>;

    /// Every entry.
    async fn list_entries(&self) -> Result<Vec<Entry>, StoreError>;

    /// The next entry revision: larger than every revision returned before,
    /// also across restarts.
    async fn next_revision(&self) -> Result<u64, StoreError>;

    /// Stores a join token under the SHA-256 of the secret.
    async fn put_join_token(
        &self,
        token_hash: &[u8],
        record: &JoinTokenRecord,
    ) -> Result<(), StoreError>;

    /// Removes a join token and returns it: of concurrent callers with the
    /// same hash, exactly one gets the record.
    async fn take_join_token(
        &self,
        token_hash: &[u8],
    ) -> Result<Option<JoinTokenRecord>, StoreError>;

    /// Inserts or replaces a used k8s_psat token under its SHA-256.
    async fn put_used_token(
        &self,
        digest: &[u8],
        record: &UsedTokenRecord,
    ) -> Result<(), StoreError>;

    /// Every used k8s_psat token with its SHA-256.
    async fn list_used_tokens(&self) -> Result<Vec<(Vec<u8>, UsedTokenRecord)>, StoreError>;

    /// Removes used k8s_psat tokens, by SHA-256.
    async fn delete_used_tokens(&self, digests: &[Vec<u8>]) -> Result<(), StoreError>;

    /// Inserts or replaces an agent, keyed by its SPIFFE ID.
    async fn put_agent(&self, record: &AgentRecord) -> Result<(), StoreError>;

    /// One agent.
    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>, StoreError>;

    /// Every agent.
    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError>;

    /// Removes an agent and returns it, if it existed.
    async fn delete_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>, StoreError>;

    /// The journal of the X.509 signing authorities, if one was stored.
    async fn get_ca_journal(&self) -> Result<Option<crate::ca::journal::Journal>, StoreError>;

    /// Replaces the journal of the X.509 signing authorities.
    async fn put_ca_journal(&self, journal: &crate::ca::journal::Journal)
    -> Result<(), StoreError>;

    /// Inserts or replaces another trust domain's bundle, keyed by its name.
    async fn put_federated_bundle(&self, record: &FederatedBundleRecord) -> Result<(), StoreError>;

    /// Every stored bundle of another trust domain, ordered by name.
    async fn list_federated_bundles(&self) -> Result<Vec<FederatedBundleRecord>, StoreError>;

    /// Removes another trust domain's bundle and returns it, if it existed.
    async fn delete_federated_bundle(
        &self,
        trust_domain: &str,
    ) -> Result<Option<FederatedBundleRecord>, StoreError>;

    /// Inserts or replaces SVIDs in the index of live SVIDs (keyed by agent
    /// and entry), without waiting for durability.
    async fn put_issued_svids(
        &self,
        records: &[crate::ca::live::IssuedSvidRecord],
    ) -> Result<(), StoreError>;

    /// Every SVID in the index of live SVIDs.
    async fn list_issued_svids(&self)
    -> Result<Vec<crate::ca::live::IssuedSvidRecord>, StoreError>;

    /// Removes SVIDs from the index of live SVIDs, by key.
    async fn delete_issued_svids(&self, keys: &[Vec<u8>]) -> Result<(), StoreError>;

    /// Makes every write so far durable.
    async fn flush(&self) -> Result<(), StoreError>;
}
