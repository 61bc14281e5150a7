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
    AgentSvid, AttestRequest, AttestResponse, AttestationParams, BatchNewX509SvidRequest,
    BatchNewX509SvidResponse, RenewAgentRequest, RenewAgentResponse, SyncEntriesRequest,
    SyncEntriesResponse, attest_request, attest_response,
};
use sigil::x509::Csr;
use tonic::{Request, Response, Status, Streaming};
use x509_parser::prelude::FromDer;

use super::{Services, agents, internal, issue, sync};
use crate::clock;
use crate::store::AgentRecord;
use crate::tokens::{MAX_TOKEN_LEN, TokenError, hex};

/// How long `Attest` waits for the agent's first message.
const ATTEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The only node attestor of this version.
pub(crate) const JOIN_TOKEN: &str = "join_token";

/// Responses of `Attest`.
pub(crate) type AttestStream = Pin<Box<dyn Stream<Item = Result<AttestResponse, Status>> + Send>>;

/// Responses of `SyncEntries`.
pub(crate) type SyncStream =
    Pin<Box<dyn Stream<Item = Result<SyncEntriesResponse, Status>> + Send>>;

/// The agent API service.
#[derive(Debug, Clone)]
pub(crate) struct AgentService {
    services: Arc<Services>,
}

/// What a valid first `Attest` message carries.
#[derive(Debug)]
pub(crate) struct Attestation<'a> {
    /// The join token (secret; never logged).
    pub(crate) token: &'a str,
    /// The agent's CSR, signature verified.
    pub(crate) csr: Csr,
}

impl AgentService {
    /// A service over the shared state.
    pub(crate) fn new(services: Arc<Services>) -> Self {
        Self { services }
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

    /// Signs an agent SVID for `id` over the CSR's key.
    fn sign_agent(&self, csr: &Csr, id: &SpiffeId) -> Result<(AgentSvid, String, i64), Status> {
        let svid = self
            .services
            .ca
            .authority()
            .sign_leaf(csr.public_key(), id, &[], self.services.agent_svid_ttl)
            .map_err(|e| internal("signing the agent SVID", e))?;
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
        Ok((answer, serial, clock::to_unix(svid.not_after)))
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

/// Checks the first `Attest` message: a `join_token` attestation with a
/// UTF-8 token of at most [`MAX_TOKEN_LEN`] bytes, and a valid CSR.
pub(crate) fn validate_attestation(params: &AttestationParams) -> Result<Attestation<'_>, Status> {
    let data = params
        .data
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("params.data: is required"))?;
    if data.r#type != JOIN_TOKEN {
        return Err(Status::invalid_argument(format!(
            "params.data.type: unsupported attestation type {:?}",
            data.r#type
        )));
    }
    if data.payload.is_empty() {
        return Err(Status::invalid_argument(
            "params.data.payload: the join token is required",
        ));
    }
    if data.payload.len() > MAX_TOKEN_LEN {
        return Err(Status::invalid_argument(format!(
            "params.data.payload: a join token has at most {MAX_TOKEN_LEN} bytes"
        )));
    }
    let token = std::str::from_utf8(&data.payload).map_err(|_| {
        Status::invalid_argument("params.data.payload: the join token is not UTF-8")
    })?;
    let csr = parse_csr("params.csr", &params.csr)?;
    Ok(Attestation { token, csr })
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

fn token_status(e: TokenError) -> Status {
    match e {
        TokenError::Invalid | TokenError::Expired => Status::permission_denied(e.to_string()),
        other => internal("consuming the join token", other),
    }
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
        let attestation = validate_attestation(&params)?;
        let token = self
            .services
            .tokens
            .consume(attestation.token)
            .await
            .map_err(token_status)?;
        let agent_id = token.agent_id;

        let _guard = self.services.agents.lock.lock().await;
        let old = self
            .services
            .store
            .get_agent(&agent_id)
            .await
            .map_err(|e| internal("reading the agent record", e))?;
        if old.as_ref().is_some_and(|r| r.banned) {
            tracing::warn!(agent.id = %agent_id, token.id = %token.token_id, "attestation of a banned agent refused");
            return Err(agents::banned(&agent_id));
        }
        let (svid, serial, expires_at) = self.sign_agent(&attestation.csr, &agent_id)?;
        let created_at = old.map_or_else(clock::now_unix, |r| r.created_at);
        self.save_agent(&AgentRecord {
            spiffe_id: agent_id.clone(),
            attestation_type: JOIN_TOKEN.into(),
            serial,
            previous_serial: None,
            expires_at,
            created_at,
            banned: false,
            selectors: sigil::Selectors::new(),
        })
        .await?;
        tracing::info!(
            agent.id = %agent_id,
            "attestation.type" = JOIN_TOKEN,
            token.id = %token.token_id,
            "agent attested"
        );

        let reply = AttestResponse {
            step: Some(attest_response::Step::Result(svid)),
        };
        Ok(Response::new(Box::pin(tokio_stream::once(Ok(reply)))))
    }

    async fn renew_agent(
        &self,
        request: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        let caller = self.authenticate(&request).await?;
        let csr = parse_csr("csr", &request.get_ref().csr)?;
        let (svid, serial, expires_at) = self.sign_agent(&csr, &caller.spiffe_id)?;
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
