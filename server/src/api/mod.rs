//! The server's gRPC services: the agent API (TCP, mTLS) and the admin API
//! (local Unix socket, and the agent API's port for admin workloads).

pub(crate) mod admin;
pub(crate) mod agent;
pub(crate) mod agents;
pub(crate) mod federation;
mod issue;
pub(crate) mod localauthority;
mod mint;
mod sync;

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use crate::ca::Ca;
use crate::registry::Registry;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::tokens::JoinTokens;

/// What the services share.
#[derive(Debug)]
pub(crate) struct Services {
    /// The CA and bundle.
    pub(crate) ca: Arc<Ca>,
    /// Durable state.
    pub(crate) store: Arc<dyn Store>,
    /// The registration entries.
    pub(crate) registry: Arc<Registry>,
    /// Join tokens.
    pub(crate) tokens: Arc<JoinTokens>,
    /// Lifetime of workload SVIDs whose entry sets none.
    pub(crate) default_x509_svid_ttl: Duration,
    /// Lifetime of agent SVIDs.
    pub(crate) agent_svid_ttl: Duration,
    /// Fires when the server stops.
    pub(crate) shutdown: Shutdown,
    /// Serializes agent record changes and announces evictions and bans.
    pub(crate) agents: agents::AgentGate,
    /// The live SVIDs each authority signed, and on which agents.
    pub(crate) svids: Arc<crate::ca::live::LiveSvids>,
    /// Other trust domains' bundles.
    pub(crate) federated: federation::FederatedBundles,
}

/// An INTERNAL status for a server-side failure, which is logged.
pub(crate) fn internal(context: &str, error: impl std::fmt::Display) -> Status {
    tracing::error!(error = %error, "{context}");
    Status::internal(format!("{context}: {error}"))
}
