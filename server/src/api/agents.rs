//! Attested agents as the admin API sees them: listing with filters,
//! eviction and bans, and the gate every agent call passes.
//!
//! Changes to agent records go through [`AgentGate::lock`], so that an
//! eviction or a ban cannot be undone by a renewal or an attestation that
//! read the record just before. Each eviction, ban or unban bumps
//! [`AgentGate::changes`]; open `SyncEntries` streams then read their agent
//! again and close when it is gone or banned.

use sigil::proto::sigil::admin::v1 as admin_pb;
use sigil::{Selector, Selectors, SpiffeId};
use tokio::sync::{Mutex, watch};
use tonic::Status;
use tonic::metadata::MetadataValue;

use super::{Services, internal};
use crate::store::AgentRecord;

/// Metadata key set on the PERMISSION_DENIED status of a banned agent, so
/// that the agent can tell a ban (wait for the unban) from an eviction.
pub(crate) const BANNED_METADATA: &str = "sigil-agent-banned";

/// Serializes changes to agent records and announces evictions and bans.
#[derive(Debug)]
pub(crate) struct AgentGate {
    /// Held while reading and writing an agent record.
    pub(crate) lock: Mutex<()>,
    /// Bumped after each attestation, eviction, ban or unban.
    pub(crate) changes: watch::Sender<u64>,
}

impl Default for AgentGate {
    fn default() -> Self {
        Self {
            lock: Mutex::new(()),
            changes: watch::Sender::new(0),
        }
    }
}

impl AgentGate {
    /// Tells every open entry stream that an agent record changed.
    pub(crate) fn announce(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The refusal of a banned agent.
pub(crate) fn banned(id: &SpiffeId) -> Status {
    let mut status = Status::permission_denied(format!("agent {id} is banned"));
    status
        .metadata_mut()
        .insert(BANNED_METADATA, MetadataValue::from_static("true"));
    status
}

/// The refusal of an agent whose record is gone.
pub(crate) fn not_attested(id: &SpiffeId) -> Status {
    Status::permission_denied(format!("agent {id} is not attested"))
}

/// An agent record on the wire.
pub(crate) fn to_proto(record: &AgentRecord) -> admin_pb::Agent {
    admin_pb::Agent {
        spiffe_id: record.spiffe_id.to_string(),
        attestation_type: record.attestation_type.clone(),
        expires_at: record.expires_at,
        created_at: record.created_at,
        banned: record.banned,
        serial: record.serial.clone(),
        selectors: record
            .selectors
            .iter()
            .map(|s| sigil::proto::sigil::types::v1::Selector {
                r#type: s.kind().to_owned(),
                value: s.value().to_owned(),
            })
            .collect(),
    }
}

/// The filters of `ListAgents` and `CountAgents`, checked.
#[derive(Debug, Default)]
pub(crate) struct AgentFilter {
    attestation_type: Option<String>,
    selectors: Selectors,
    expires_before: Option<i64>,
    banned: Option<bool>,
}

impl AgentFilter {
    /// Checks the filter fields; an empty field filters nothing.
    pub(crate) fn parse(req: &admin_pb::ListAgentsRequest) -> Result<Self, Status> {
        let selectors = req
            .by_selectors
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Selector::new(&s.r#type, &s.value)
                    .map_err(|e| Status::invalid_argument(format!("by_selectors[{i}]: {e}")))
            })
            .collect::<Result<Selectors, _>>()?;
        if req.by_expires_before < 0 {
            return Err(Status::invalid_argument(
                "by_expires_before: must not be negative",
            ));
        }
        Ok(Self {
            attestation_type: Some(req.by_attestation_type.clone()).filter(|t| !t.is_empty()),
            selectors,
            expires_before: Some(req.by_expires_before).filter(|t| *t != 0),
            banned: req.by_banned,
        })
    }

    /// Whether `record` passes every filter; the selector filter asks for a
    /// subset of the agent's node selectors, the implicit
    /// `spiffe_id:<agent ID>` included, as node aliases see them.
    pub(crate) fn matches(&self, record: &AgentRecord) -> bool {
        self.attestation_type
            .as_ref()
            .is_none_or(|t| *t == record.attestation_type)
            && (self.selectors.is_empty()
                || self
                    .selectors
                    .is_subset_of(&crate::registry::node_selectors(record)))
            && self.expires_before.is_none_or(|t| record.expires_at < t)
            && self.banned.is_none_or(|b| b == record.banned)
    }
}

/// The agents that pass `filter`, sorted by SPIFFE ID.
pub(crate) async fn list(
    services: &Services,
    filter: &AgentFilter,
) -> Result<Vec<AgentRecord>, Status> {
    let mut agents: Vec<AgentRecord> = services
        .store
        .list_agents()
        .await
        .map_err(|e| internal("reading the agent records", e))?
        .into_iter()
        .filter(|r| filter.matches(r))
        .collect();
    agents.sort_by(|a, b| a.spiffe_id.as_str().cmp(b.spiffe_id.as_str()));
    Ok(agents)
}

/// Checks the `spiffe_id` field of a request naming one agent.
pub(crate) fn parse_agent_id(value: &str) -> Result<SpiffeId, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument("spiffe_id: is required"));
    }
    value
        .parse()
        .map_err(|e| Status::invalid_argument(format!("spiffe_id: {value:?} {e}")))
}

fn not_found(id: &SpiffeId) -> Status {
    Status::not_found(format!("no agent \"{id}\""))
}

/// One agent.
pub(crate) async fn get(services: &Services, id: &SpiffeId) -> Result<AgentRecord, Status> {
    services
        .store
        .get_agent(id)
        .await
        .map_err(|e| internal("reading the agent record", e))?
        .ok_or_else(|| not_found(id))
}

/// Deletes an agent's record; returns it as it was.
pub(crate) async fn evict(services: &Services, id: &SpiffeId) -> Result<AgentRecord, Status> {
    let _guard = services.agents.lock.lock().await;
    let record = services
        .store
        .delete_agent(id)
        .await
        .map_err(|e| internal("deleting the agent record", e))?
        .ok_or_else(|| not_found(id))?;
    services
        .store
        .flush()
        .await
        .map_err(|e| internal("deleting the agent record", e))?;
    services.agents.announce();
    tracing::info!(agent.id = %id, "agent evicted");
    Ok(record)
}

/// Bans or unbans an agent; returns it as it is now.
pub(crate) async fn set_banned(
    services: &Services,
    id: &SpiffeId,
    banned: bool,
) -> Result<AgentRecord, Status> {
    let _guard = services.agents.lock.lock().await;
    let mut record = get(services, id).await?;
    if record.banned != banned {
        record.banned = banned;
        let store = &services.store;
        store
            .put_agent(&record)
            .await
            .map_err(|e| internal("storing the agent record", e))?;
        store
            .flush()
            .await
            .map_err(|e| internal("storing the agent record", e))?;
        services.agents.announce();
    }
    if banned {
        tracing::info!(agent.id = %id, "agent banned");
    } else {
        tracing::info!(agent.id = %id, "agent unbanned");
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use sigil::proto::sigil::types::v1 as pb;

    use super::*;

    fn record(banned: bool, expires_at: i64) -> AgentRecord {
        AgentRecord {
            spiffe_id: "spiffe://example.org/sigil/agent/a".parse().unwrap(),
            attestation_type: "join_token".into(),
            serial: "01".into(),
            previous_serial: None,
            expires_at,
            created_at: 1,
            banned,
            selectors: Selectors::new(),
        }
    }

    #[test]
    fn filters_select_agents() {
        let parse = |req: admin_pb::ListAgentsRequest| AgentFilter::parse(&req).unwrap();
        let a = record(false, 1000);
        let b = record(true, 3000);
        assert!(parse(Default::default()).matches(&a));
        let banned = parse(admin_pb::ListAgentsRequest {
            by_banned: Some(true),
            ..Default::default()
        });
        assert!(!banned.matches(&a) && banned.matches(&b));
        let early = parse(admin_pb::ListAgentsRequest {
            by_expires_before: 2000,
            ..Default::default()
        });
        assert!(early.matches(&a) && !early.matches(&b));
        let other = parse(admin_pb::ListAgentsRequest {
            by_attestation_type: "k8s_psat".into(),
            ..Default::default()
        });
        assert!(!other.matches(&a));
        let selector = parse(admin_pb::ListAgentsRequest {
            by_selectors: vec![pb::Selector {
                r#type: "k8s".into(),
                value: "ns:prod".into(),
            }],
            ..Default::default()
        });
        assert!(!selector.matches(&a));
    }

    #[test]
    fn bad_filters_name_the_field() {
        let status = AgentFilter::parse(&admin_pb::ListAgentsRequest {
            by_selectors: vec![pb::Selector {
                r#type: String::new(),
                value: "x".into(),
            }],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with("by_selectors[0]: "),
            "{status:?}"
        );
        let status = parse_agent_id("spiffe://example.org/a/").unwrap_err();
        assert!(status.message().starts_with("spiffe_id: "), "{status:?}");
        assert_eq!(
            parse_agent_id("").unwrap_err().message(),
            "spiffe_id: is required"
        );
    }

    #[test]
    fn a_ban_is_marked_for_the_agent() {
        let id: SpiffeId = "spiffe://example.org/sigil/agent/a".parse().unwrap();
        let status = banned(&id);
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            status.message(),
            "agent spiffe://example.org/sigil/agent/a is banned"
        );
        assert!(status.metadata().get(BANNED_METADATA).is_some());
    }
}
