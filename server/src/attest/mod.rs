//! Node attestation: how an agent proves which node it runs on, and what
//! the server then vouches for (the agent's SPIFFE ID and node selectors).
//!
//! Each attestor reads the `AttestationData` of the first `Attest` message.
//! `join_token` and `k8s_psat` decide at once; `x509pop` first asks the
//! agent to sign a challenge with its node key (see [`Step::Challenge`]).

pub(crate) mod join_token;
pub(crate) mod k8s_psat;
mod oidc;
pub(crate) mod x509pop;

use sigil::proto::sigil::agent::v1::AttestationData;
use sigil::{Selector, Selectors, SpiffeId, TrustDomain};
use tonic::Status;

use std::sync::Arc;

use crate::config::{K8sPsatKeys, NodeAttestorsConfig};
use crate::store::{Store, StoreError};
use crate::tokens::JoinTokens;

/// What an attestor vouches for.
#[derive(Debug, Clone)]
pub(crate) struct Attested {
    /// The agent's SPIFFE ID.
    pub(crate) agent_id: SpiffeId,
    /// The node selectors.
    pub(crate) selectors: Selectors,
    /// The attestor's name, e.g. `x509pop`.
    pub(crate) attestor: &'static str,
    /// What identifies the evidence in logs (never a secret): a token ID,
    /// a certificate fingerprint, a pod.
    pub(crate) evidence: String,
    /// A k8s_psat token to remember as used once the agent is attested.
    pub(crate) used_token: Option<k8s_psat::UsedToken>,
}

/// The outcome of the first message.
#[derive(Debug)]
pub(crate) enum Step {
    /// The agent is attested.
    Done(Attested),
    /// The agent must answer a challenge first.
    Challenge(x509pop::Challenge),
}

/// The node attestors the server accepts.
#[derive(Debug)]
pub(crate) struct NodeAttestors {
    x509pop: Option<x509pop::X509Pop>,
    k8s_psat: Option<k8s_psat::K8sPsat>,
}

impl NodeAttestors {
    /// The attestors of `config` for trust domain `td`; `join_token` is
    /// always on. `k8s_psat` loads the tokens it accepted from `store`.
    pub(crate) async fn load(
        td: &TrustDomain,
        config: &NodeAttestorsConfig,
        store: Arc<dyn Store>,
    ) -> Result<Self, StoreError> {
        if let Some(c) = &config.x509pop {
            tracing::info!(
                ca_bundle_path = %c.ca_bundle_path.display(),
                cas = c.ca_certs.len(),
                agent_path_template = %c.agent_path_template,
                "node attestor x509pop enabled"
            );
        }
        if let Some(c) = &config.k8s_psat {
            for (name, cluster) in &c.clusters {
                let keys = match &cluster.keys {
                    K8sPsatKeys::Jwks { path, .. } => path.display().to_string(),
                    K8sPsatKeys::IssuerUrl(url) => url.clone(),
                };
                tracing::info!(cluster = %name, keys = %keys, audience = %cluster.audience, "node attestor k8s_psat enabled");
            }
        }
        let k8s_psat = match &config.k8s_psat {
            Some(c) => Some(k8s_psat::K8sPsat::load(td.clone(), c, store).await?),
            None => None,
        };
        Ok(Self {
            x509pop: config
                .x509pop
                .as_ref()
                .map(|c| x509pop::X509Pop::new(td.clone(), c)),
            k8s_psat,
        })
    }

    /// Checks the evidence of the first message. Errors name the field.
    pub(crate) async fn begin(
        &self,
        tokens: &JoinTokens,
        data: &AttestationData,
    ) -> Result<Step, Status> {
        match data.r#type.as_str() {
            join_token::NAME => join_token::attest(tokens, &data.payload)
                .await
                .map(Step::Done),
            x509pop::NAME => self
                .x509pop
                .as_ref()
                .ok_or_else(|| not_enabled(x509pop::NAME))?
                .begin(&data.payload)
                .map(Step::Challenge),
            k8s_psat::NAME => self
                .k8s_psat
                .as_ref()
                .ok_or_else(|| not_enabled(k8s_psat::NAME))?
                .attest(&data.payload)
                .await
                .map(Step::Done),
            other => Err(Status::invalid_argument(format!(
                "params.data.type: unsupported attestation type {other:?}"
            ))),
        }
    }

    /// Records a k8s_psat token as used by the agent it attested (in the
    /// store, unflushed: the caller flushes before it answers); refuses it
    /// when it attested another agent meanwhile.
    pub(crate) async fn remember(&self, attested: &Attested) -> Result<(), Status> {
        match (&self.k8s_psat, &attested.used_token) {
            (Some(psat), Some(used)) => psat.remember(used).await,
            _ => Ok(()),
        }
    }
}

/// The refusal of an attestor the server does not run.
fn not_enabled(name: &str) -> Status {
    Status::invalid_argument(format!(
        "params.data.type: the node attestor {name:?} is not enabled on this server"
    ))
}

/// A selector built from trusted parts; values with control characters or
/// of excessive length (which no valid evidence has) are skipped.
fn push_selector(selectors: &mut Selectors, kind: &str, value: &str) {
    match Selector::new(kind, value) {
        Ok(s) => selectors.insert(s),
        Err(e) => tracing::warn!(selector.type = kind, error = %e, "skipping a node selector"),
    }
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    crate::tokens::hex(bytes)
}

#[cfg(test)]
pub(crate) mod testing;
