//! The agent API (`sigil.agent.v1.AgentApi`): attestation, agent SVID
//! renewal, entry sync and workload SVID signing.
//!
//! `Attest` needs no client certificate; every other call is authenticated
//! by [`AgentService::authenticate`] from the agent SVID the TLS layer has
//! already verified against the bundle.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use rustls_pki_types::CertificateDer;
use sigil::SpiffeId;
use sigil::proto::sigil::agent::v1::agent_api_server::AgentApi;
use sigil::proto::sigil::agent::v1::{
    AgentSvid, AttestRequest, AttestResponse, AttestationData, AttestationParams,
    BatchNewX509SvidRequest, BatchNewX509SvidResponse, RenewAgentRequest, RenewAgentResponse,
    SyncEntriesRequest, SyncEntriesResponse, attest_request, attest_response,
};
use sigil::x509::Csr;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use x509_parser::prelude::FromDer;

use super::{Services, agents, internal, issue, sync};
use crate::attest::{Attested, NodeAttestors, Step, x509pop};
use crate::clock;
use crate::store::AgentRecord;
use crate::tokens::hex;

/// How long `Attest` waits for the agent's first message.
const ATTEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `Attest` waits for the answer to a challenge.
const CHALLENGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Responses of `Attest`.
pub(crate) type AttestStream = Pin<Box<dyn Stream<Item = Result<AttestResponse, Status>> + Send>>;

/// Responses of `SyncEntries`.
pub(crate) type SyncStream =
    Pin<Box<dyn Stream<Item = Result<SyncEntriesResponse, Status>> + Send>>;

/// The agent API service.
#[derive(Debug, Clone)]
pub(crate) struct AgentService {
    services: Arc<Services>,
    attestors: Arc<NodeAttestors>,
}

impl AgentService {
    /// A service over the shared state that attests agents with
    /// `attestors`.
    pub(crate) fn new(services: Arc<Services>, attestors: Arc<NodeAttestors>) -> Self {
        Self {
            services,
            attestors,
        }
    }

    /// Sends the challenge, waits (at most [`CHALLENGE_TIMEOUT`]) for the
    /// agent's answer on `stream`, and admits the agent when it verifies.
    async fn challenge(
        &self,
        challenge: x509pop::Challenge,
        csr: Csr,
        mut stream: Streaming<AttestRequest>,
        tx: &mpsc::Sender<Result<AttestResponse, Status>>,
    ) -> Result<AgentSvid, Status> {
        let ask = AttestResponse {
            step: Some(attest_response::Step::Challenge(challenge.nonce().to_vec())),
        };
        tx.send(Ok(ask))
            .await
            .map_err(|_| Status::cancelled("the agent left"))?;
        let answer = match tokio::time::timeout(CHALLENGE_TIMEOUT, stream.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "challenge_response: not received within {} s",
                    CHALLENGE_TIMEOUT.as_secs()
                )));
            }
            Ok(result) => result?,
        };
        let signature = match answer.and_then(|m| m.step) {
            Some(attest_request::Step::ChallengeResponse(signature)) => signature,
            Some(attest_request::Step::Params(_)) => {
                return Err(Status::invalid_argument(
                    "challenge_response: expected the answer to the challenge, got params",
                ));
            }
            None => return Err(Status::invalid_argument("challenge_response: is required")),
        };
        let attested = challenge.verify(&signature).inspect_err(|status| {
            tracing::warn!(error = %status.message(), "x509pop proof of possession refused");
        })?;
        self.admit(attested, &csr).await
    }

    /// Signs and records the SVID of an attested agent, unless it is banned.
    async fn admit(&self, attested: Attested, csr: &Csr) -> Result<AgentSvid, Status> {
        let agent_id = attested.agent_id.clone();
        let _guard = self.services.agents.lock.lock().await;
        let old = self
            .services
            .store
            .get_agent(&agent_id)
            .await
            .map_err(|e| internal("reading the agent record", e))?;
        if old.as_ref().is_some_and(|r| r.banned) {
            tracing::warn!(
                agent.id = %agent_id,
                "attestation.type" = attested.attestor,
                evidence = %attested.evidence,
                "attestation of a banned agent refused"
            );
            return Err(agents::banned(&agent_id));
        }
        self.attestors.remember(&attested).await?;
        let (svid, serial, expires_at) = self.sign_agent(csr, &agent_id).await?;
        let created_at = old.map_or_else(clock::now_unix, |r| r.created_at);
        self.save_agent(&AgentRecord {
            spiffe_id: agent_id.clone(),
            attestation_type: attested.attestor.into(),
            serial,
            previous_serial: None,
            expires_at,
            created_at,
            banned: false,
            selectors: attested.selectors,
        })
        .await?;
        // Streams already open for this agent ID pick up its new node
        // selectors, and so its new aliases.
        self.services.agents.announce();
        tracing::info!(
            agent.id = %agent_id,
            "attestation.type" = attested.attestor,
            evidence = %attested.evidence,
            "agent attested"
        );
        Ok(svid)
    }

    /// Identifies the caller by its client certificate: the leaf's SPIFFE ID
    /// must be an attested agent that is not banned, and the leaf its
    /// current (or previous) SVID.
    pub(crate) async fn authenticate<T>(
        &self,
        request: &Request<T>,
    ) -> Result<AgentRecord, Status> {
        let certs = request.peer_certs();
        self.authenticate_chain(certs.as_deref().map(Vec::as_slice))
            .await
    }

    async fn authenticate_chain(
        &self,
        certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<AgentRecord, Status> {
        let Some(leaf) = certs.and_then(<[_]>::first) else {
            return Err(Status::unauthenticated(
                "a client certificate (agent SVID) is required",
            ));
        };
        let id = sigil::x509::spiffe_id_of(leaf)
            .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
        let record = self
            .services
            .store
            .get_agent(&id)
            .await
            .map_err(|e| internal("reading the agent record", e))?
            .ok_or_else(|| agents::not_attested(&id))?;
        if record.banned {
            return Err(agents::banned(&id));
        }
        let serial = serial_of(leaf)
            .ok_or_else(|| Status::unauthenticated("client certificate: malformed"))?;
        if serial != record.serial && record.previous_serial.as_deref() != Some(serial.as_str()) {
            return Err(Status::permission_denied(
                "agent SVID is not current; attest again",
            ));
        }
        Ok(record)
    }

    /// Signs an agent SVID for `id` over the CSR's key, and records it
    /// among the live SVIDs of the signing authority.
    async fn sign_agent(
        &self,
        csr: &Csr,
        id: &SpiffeId,
    ) -> Result<(AgentSvid, String, i64), Status> {
        let published = self.services.ca.current();
        let svid = published
            .active
            .sign_leaf(csr.public_key(), id, &[], self.services.agent_svid_ttl)
            .map_err(|e| internal("signing the agent SVID", e))?;
        let expires_at = clock::to_unix(svid.not_after);
        let agent_svid = [(crate::ca::live::AGENT_SVID.to_owned(), expires_at)];
        if let Err(e) = self
            .services
            .svids
            .record(id.as_str(), &published.active_id, agent_svid)
            .await
        {
            tracing::warn!(agent.id = %id, error = %e, "cannot record the agent SVID signed");
        }
        let leaf = svid
            .chain
            .first()
            .ok_or_else(|| internal("signing the agent SVID", "empty chain"))?;
        let serial =
            serial_of(leaf).ok_or_else(|| internal("signing the agent SVID", "no serial"))?;
        let answer = AgentSvid {
            spiffe_id: id.to_string(),
            cert_chain: svid.chain.iter().map(|c| c.to_vec()).collect(),
            bundle: Some(self.services.ca.bundle_proto()),
        };
        Ok((answer, serial, expires_at))
    }

    async fn save_agent(&self, record: &AgentRecord) -> Result<(), Status> {
        let store = &self.services.store;
        store
            .put_agent(record)
            .await
            .map_err(|e| internal("storing the agent record", e))?;
        store
            .flush()
            .await
            .map_err(|e| internal("storing the agent record", e))
    }
}

/// Checks the first `Attest` message: attestation data, and a valid CSR.
/// The evidence itself is checked by its attestor.
pub(crate) fn validate_attestation(
    params: &AttestationParams,
) -> Result<(&AttestationData, Csr), Status> {
    let data = params
        .data
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("params.data: is required"))?;
    let csr = parse_csr("params.csr", &params.csr)?;
    Ok((data, csr))
}

/// Parses and verifies a CSR; errors name `field`.
pub(crate) fn parse_csr(field: &str, der: &[u8]) -> Result<Csr, Status> {
    if der.is_empty() {
        return Err(Status::invalid_argument(format!("{field}: is required")));
    }
    Csr::from_der(der).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

/// The serial number of a certificate, in lowercase hex.
pub(crate) fn serial_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(hex(cert.raw_serial()))
}

#[tonic::async_trait]
impl AgentApi for AgentService {
    type AttestStream = AttestStream;

    async fn attest(
        &self,
        request: Request<Streaming<AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        let mut stream = request.into_inner();
        let first = match tokio::time::timeout(ATTEST_TIMEOUT, stream.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "params: not received within {} s",
                    ATTEST_TIMEOUT.as_secs()
                )));
            }
            Ok(result) => result?,
        };
        let params = match first.and_then(|m| m.step) {
            Some(attest_request::Step::Params(params)) => params,
            Some(attest_request::Step::ChallengeResponse(_)) => {
                return Err(Status::invalid_argument(
                    "params: the first message must carry params",
                ));
            }
            None => return Err(Status::invalid_argument("params: is required")),
        };
        let (data, csr) = validate_attestation(&params)?;
        match self.attestors.begin(&self.services.tokens, data).await? {
            Step::Done(attested) => {
                let svid = self.admit(attested, &csr).await?;
                let reply = AttestResponse {
                    step: Some(attest_response::Step::Result(svid)),
                };
                Ok(Response::new(Box::pin(tokio_stream::once(Ok(reply)))))
            }
            Step::Challenge(challenge) => {
                let (tx, rx) = mpsc::channel(2);
                let service = self.clone();
                tokio::spawn(async move {
                    let outcome = service.challenge(challenge, csr, stream, &tx).await;
                    let reply = outcome.map(|svid| AttestResponse {
                        step: Some(attest_response::Step::Result(svid)),
                    });
                    // The agent may have gone; nothing is left to tell it.
                    let _ = tx.send(reply).await;
                });
                Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
            }
        }
    }

    async fn renew_agent(
        &self,
        request: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        let caller = self.authenticate(&request).await?;
        let csr = parse_csr("csr", &request.get_ref().csr)?;
        let (svid, serial, expires_at) = self.sign_agent(&csr, &caller.spiffe_id).await?;
        // Read again under the lock: an eviction or a ban since the
        // authentication wins over this renewal.
        let _guard = self.services.agents.lock.lock().await;
        let mut record = self
            .services
            .store
            .get_agent(&caller.spiffe_id)
            .await
            .map_err(|e| internal("reading the agent record", e))?
            .ok_or_else(|| agents::not_attested(&caller.spiffe_id))?;
        if record.banned {
            return Err(agents::banned(&record.spiffe_id));
        }
        if record.serial != caller.serial {
            return Err(Status::permission_denied(
                "agent SVID is not current; attest again",
            ));
        }
        record.previous_serial = Some(std::mem::replace(&mut record.serial, serial));
        record.expires_at = expires_at;
        self.save_agent(&record).await?;
        tracing::debug!(
            agent.id = %record.spiffe_id,
            expires_at = %clock::rfc3339(expires_at),
            "agent SVID renewed"
        );
        Ok(Response::new(RenewAgentResponse { svid: Some(svid) }))
    }

    type SyncEntriesStream = SyncStream;

    async fn sync_entries(
        &self,
        request: Request<SyncEntriesRequest>,
    ) -> Result<Response<Self::SyncEntriesStream>, Status> {
        let agent_changes = self.services.agents.changes.subscribe();
        let record = self.authenticate(&request).await?;
        let known = sync::known_entries(&request.get_ref().known)?;
        tracing::debug!(agent.id = %record.spiffe_id, known = known.len(), "entry sync started");
        Ok(Response::new(sync::stream(
            Arc::clone(&self.services),
            record.spiffe_id,
            known,
            agent_changes,
        )))
    }

    async fn batch_new_x509_svid(
        &self,
        request: Request<BatchNewX509SvidRequest>,
    ) -> Result<Response<BatchNewX509SvidResponse>, Status> {
        let record = self.authenticate(&request).await?;
        let params = request.into_inner().params;
        let svids = issue::batch(&self.services, &record.spiffe_id, params).await?;
        Ok(Response::new(BatchNewX509SvidResponse { svids }))
    }
}

#[cfg(test)]
mod tests;
