//! One-time join tokens: how an operator lets a new agent attest.
//!
//! A token is 32 random bytes in hex. The store keeps only its SHA-256, with
//! a random public token ID, the agent's future SPIFFE ID and the expiry;
//! consuming it removes it atomically, so it attests exactly one agent. The
//! token itself is never logged and never part of an ID.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ring::rand::{SecureRandom, SystemRandom};
use sigil::{SpiffeId, TrustDomain};
use zeroize::Zeroizing;

use crate::clock;
use crate::store::{JoinTokenRecord, Store, StoreError};
use sigil::spiffe_id::SERVER_PATH;

/// Lifetime of a token when none is given.
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(600);

/// Longest token accepted from an agent, in bytes.
pub(crate) const MAX_TOKEN_LEN: usize = 256;

/// The path under which agent IDs derived from join tokens live.
const JOIN_TOKEN_AGENT_PATH: &str = "/sigil/agent/join_token";

/// Why a token could not be made or used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenError {
    /// The requested agent ID is unacceptable.
    #[error("agent_id: {0}")]
    AgentId(String),
    /// The token is unknown or was used already.
    #[error("join token is not valid (unknown or already used)")]
    Invalid,
    /// The token has expired (and is now consumed).
    #[error("join token expired")]
    Expired,
    /// The system's random generator failed.
    #[error("the system random generator failed")]
    Random,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A freshly made token. `Debug` elides the secret.
pub(crate) struct NewToken {
    /// The secret to hand to the agent.
    pub(crate) token: Zeroizing<String>,
    /// The token's public ID (not secret).
    pub(crate) token_id: String,
    /// The SPIFFE ID the agent will get.
    pub(crate) agent_id: SpiffeId,
    /// Expiry in seconds since the Unix epoch.
    pub(crate) expires_at: i64,
}

impl fmt::Debug for NewToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewToken")
            .field("token", &"[elided]")
            .field("token_id", &self.token_id)
            .field("agent_id", &self.agent_id)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A token drawn but not stored yet. `Debug` elides the secret.
pub(crate) struct PendingToken {
    token: Zeroizing<String>,
    token_id: String,
    /// The SPIFFE ID the agent will get.
    pub(crate) agent_id: SpiffeId,
}

impl fmt::Debug for PendingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingToken")
            .field("token", &"[elided]")
            .field("token_id", &self.token_id)
            .field("agent_id", &self.agent_id)
            .finish()
    }
}

/// Makes and consumes join tokens.
#[derive(Debug)]
pub(crate) struct JoinTokens {
    td: TrustDomain,
    store: Arc<dyn Store>,
    rng: SystemRandom,
}

impl JoinTokens {
    /// Tokens of the trust domain `td`, kept in `store`.
    pub(crate) fn new(td: TrustDomain, store: Arc<dyn Store>) -> Self {
        Self {
            td,
            store,
            rng: SystemRandom::new(),
        }
    }

    /// Makes a token for `agent_id` (or a derived ID when empty) that
    /// expires after `ttl`, as [`JoinTokens::prepare`] then
    /// [`JoinTokens::save`] do.
    #[cfg(test)]
    async fn generate(&self, agent_id: &str, ttl: Duration) -> Result<NewToken, TokenError> {
        let pending = self.prepare(agent_id)?;
        self.save(pending, ttl).await
    }

    /// Draws a token for `agent_id` (or a derived ID when empty) without
    /// storing it yet, so that the agent ID is known before the token can
    /// attest; [`JoinTokens::save`] makes it usable.
    pub(crate) fn prepare(&self, agent_id: &str) -> Result<PendingToken, TokenError> {
        let mut secret = Zeroizing::new([0u8; 32]);
        self.rng
            .fill(secret.as_mut())
            .map_err(|_| TokenError::Random)?;
        let mut token_id = [0u8; 8];
        self.rng
            .fill(&mut token_id)
            .map_err(|_| TokenError::Random)?;
        let token_id = hex(&token_id);
        let token = Zeroizing::new(hex(secret.as_ref()));

        let agent_id = if agent_id.is_empty() {
            self.td
                .id_with_path(&format!("{JOIN_TOKEN_AGENT_PATH}/{token_id}"))
                .map_err(|e| TokenError::AgentId(e.to_string()))?
        } else {
            self.check_agent_id(agent_id)?
        };
        Ok(PendingToken {
            token,
            token_id,
            agent_id,
        })
    }

    /// Stores a prepared token that expires after `ttl`. The token is
    /// durable when this returns.
    pub(crate) async fn save(
        &self,
        pending: PendingToken,
        ttl: Duration,
    ) -> Result<NewToken, TokenError> {
        let expires_at = clock::to_unix(SystemTime::now() + ttl);
        let record = JoinTokenRecord {
            token_id: pending.token_id,
            agent_id: pending.agent_id.clone(),
            expires_at,
        };
        self.store
            .put_join_token(&digest(&pending.token), &record)
            .await?;
        self.store.flush().await?;
        Ok(NewToken {
            token: pending.token,
            token_id: record.token_id,
            agent_id: pending.agent_id,
            expires_at,
        })
    }

    /// Consumes a token and returns the agent ID it grants. An expired token
    /// is consumed too.
    pub(crate) async fn consume(&self, token: &str) -> Result<JoinTokenRecord, TokenError> {
        let record = self
            .store
            .take_join_token(&digest(token))
            .await?
            .ok_or(TokenError::Invalid)?;
        self.store.flush().await?;
        if record.expires_at <= clock::now_unix() {
            return Err(TokenError::Expired);
        }
        Ok(record)
    }

    fn check_agent_id(&self, value: &str) -> Result<SpiffeId, TokenError> {
        let id: SpiffeId = value
            .parse()
            .map_err(|e| TokenError::AgentId(format!("{value:?} {e}")))?;
        if !id.is_member_of(&self.td) {
            return Err(TokenError::AgentId(format!(
                "{value:?} is not in trust domain {}",
                self.td
            )));
        }
        if !id.is_workload_id() {
            return Err(TokenError::AgentId(format!("{value:?} must have a path")));
        }
        let path = id.path();
        if path == SERVER_PATH || path.starts_with(&format!("{SERVER_PATH}/")) {
            return Err(TokenError::AgentId(format!(
                "{value:?} is reserved for the server"
            )));
        }
        Ok(id)
    }
}

/// The key a token is stored under.
fn digest(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn tokens() -> (JoinTokens, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
        let td = TrustDomain::new("example.org").unwrap();
        (JoinTokens::new(td, store), dir)
    }

    #[tokio::test]
    async fn a_token_attests_once_with_a_derived_id() {
        let (tokens, _dir) = tokens();
        let new = tokens.generate("", DEFAULT_TTL).await.unwrap();
        assert_eq!(new.token.len(), 64);
        assert!(new.token.chars().all(|c| c.is_ascii_hexdigit()));
        let path = new.agent_id.path().to_owned();
        let token_id = path.strip_prefix("/sigil/agent/join_token/").unwrap();
        assert_eq!(token_id.len(), 16);
        assert!(!new.token.contains(token_id));
        assert!(!format!("{new:?}").contains(new.token.as_str()));

        let record = tokens.consume(&new.token).await.unwrap();
        assert_eq!(record.agent_id, new.agent_id);
        assert_eq!(
            tokens.consume(&new.token).await.unwrap_err().to_string(),
            "join token is not valid (unknown or already used)"
        );
    }

    #[tokio::test]
    async fn a_prepared_token_attests_only_once_saved() {
        let (tokens, _dir) = tokens();
        let pending = tokens.prepare("spiffe://example.org/node/p").unwrap();
        assert_eq!(pending.agent_id.as_str(), "spiffe://example.org/node/p");
        assert!(!format!("{pending:?}").contains(pending.token.as_str()));
        let secret = pending.token.as_str().to_owned();
        assert!(matches!(
            tokens.consume(&secret).await,
            Err(TokenError::Invalid)
        ));
        let pending = tokens.prepare("").unwrap();
        let secret = pending.token.as_str().to_owned();
        let agent_id = pending.agent_id.clone();
        let new = tokens.save(pending, DEFAULT_TTL).await.unwrap();
        assert_eq!(new.agent_id, agent_id);
        assert_eq!(tokens.consume(&secret).await.unwrap().agent_id, agent_id);
    }

    #[tokio::test]
    async fn an_expired_token_is_refused_and_consumed() {
        let (tokens, _dir) = tokens();
        let new = tokens.generate("", Duration::ZERO).await.unwrap();
        assert_eq!(
            tokens.consume(&new.token).await.unwrap_err().to_string(),
            "join token expired"
        );
        assert!(matches!(
            tokens.consume(&new.token).await,
            Err(TokenError::Invalid)
        ));
    }

    #[tokio::test]
    async fn requested_agent_ids_are_checked() {
        let (tokens, _dir) = tokens();
        let new = tokens
            .generate("spiffe://example.org/node/1", DEFAULT_TTL)
            .await
            .unwrap();
        assert_eq!(new.agent_id.as_str(), "spiffe://example.org/node/1");

        for (id, reason) in [
            (
                "spiffe://other.org/node",
                "is not in trust domain example.org",
            ),
            ("spiffe://example.org", "must have a path"),
            (
                "spiffe://example.org/sigil/server",
                "is reserved for the server",
            ),
            (
                "spiffe://example.org/sigil/server/x",
                "is reserved for the server",
            ),
            ("spiffe://example.org/a/", "path has an empty segment"),
        ] {
            let err = tokens.generate(id, DEFAULT_TTL).await.unwrap_err();
            let message = err.to_string();
            assert!(
                message.starts_with(&format!("agent_id: {id:?} {reason}")),
                "{message}"
            );
        }
        // A path that merely starts with the same letters is fine.
        tokens
            .generate("spiffe://example.org/sigil/serverless", DEFAULT_TTL)
            .await
            .unwrap();
    }
}
