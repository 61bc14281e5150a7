//! The local authority API (`sigil.admin.v1.LocalAuthority`): the
//! operator's view of the X.509 signing authorities and control over their
//! rotation, taint and revocation. Served beside the admin API, to the same
//! callers; every change (and every refused change) is audited as
//! `authority.prepare`, `authority.activate`, `authority.taint` or
//! `authority.revoke`.

use std::sync::Arc;

use sigil::proto::sigil::admin::v1::local_authority_server::LocalAuthority;
use sigil::proto::sigil::admin::v1::{
    AgentSvidCount, GetX509AuthoritiesRequest, GetX509AuthoritiesResponse,
    PrepareX509AuthorityRequest, RevokeX509AuthorityRequest, X509Authority, X509AuthorityRequest,
    X509AuthorityState,
};
use tonic::{Request, Response, Status};

use super::admin::AdminService;
use super::internal;
use crate::audit::{Caller, Event, Outcome};
use crate::ca::journal::{AuthorityRecord, AuthorityState, Refusal};
use crate::ca::live::Usage;
use crate::ca::rotation::{Authorities, Operation, OperationError};
use crate::clock;

/// The local authority service.
#[derive(Debug, Clone)]
pub(crate) struct LocalAuthorityService {
    admin: AdminService,
    authorities: Arc<Authorities>,
}

impl LocalAuthorityService {
    /// A service over `authorities`, allowing the callers `admin` allows.
    pub(crate) fn new(admin: AdminService, authorities: Arc<Authorities>) -> Self {
        Self { admin, authorities }
    }

    /// Applies `operation` for `caller`, audits it as `action`, and answers
    /// with the changed authority and its live SVIDs.
    async fn operate(
        &self,
        caller: &Caller,
        action: &'static str,
        operation: Operation,
        field: Option<&str>,
    ) -> Result<Response<X509Authority>, Status> {
        let named = operation_id(&operation);
        let forced = matches!(operation, Operation::Revoke { force: true, .. });
        let result = self.apply(operation, field).await;
        let id = match &result {
            Ok(answer) => Some(answer.get_ref().authority_id.clone()),
            Err(_) => named,
        };
        let mut event = Event::new(caller, action)
            .ids(id)
            .outcome(Outcome::of(&result));
        if forced {
            event = event.detail("force", true);
        }
        self.admin.record_event(&event);
        result
    }

    async fn apply(
        &self,
        operation: Operation,
        field: Option<&str>,
    ) -> Result<Response<X509Authority>, Status> {
        let record = self
            .authorities
            .operate(&operation)
            .await
            .map_err(|e| operation_status(e, field))?;
        let usage = self.usage().await?;
        let (_, certs) = self.authorities.journal().await;
        let answer = to_proto(
            &record,
            usage.get(&record.id),
            certs.get(&record.id).map(|c| c.to_vec()),
        );
        Ok(Response::new(answer))
    }

    /// The authority ID of a request, checked; a refusal is audited.
    fn checked_id(
        &self,
        caller: &Caller,
        action: &'static str,
        value: &str,
    ) -> Result<String, Status> {
        let checked = parse_authority_id("authority_id", value);
        if checked.is_err() {
            let id = Some(value).filter(|v| !v.is_empty());
            self.admin.record(caller, action, id, &checked);
        }
        checked
    }

    async fn usage(&self) -> Result<std::collections::HashMap<String, Usage>, Status> {
        self.authorities
            .live()
            .usage(clock::now_unix())
            .await
            .map_err(|e| internal("reading the live SVIDs", e))
    }
}

/// The authority an operation names, if any.
fn operation_id(operation: &Operation) -> Option<String> {
    match operation {
        Operation::Prepare => None,
        Operation::Activate(id) | Operation::Taint(id) | Operation::Revoke { id, .. } => {
            Some(id.clone())
        }
    }
}

/// Checks an authority ID: the hex of a subject key identifier, with or
/// without colons, in any case. Returns it in lowercase without colons.
pub(crate) fn parse_authority_id(field: &str, value: &str) -> Result<String, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field}: is required")));
    }
    let id: String = value
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if id.is_empty() || !id.len().is_multiple_of(2) || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Status::invalid_argument(format!(
            "{field}: {value:?} is not a subject key identifier in hex"
        )));
    }
    Ok(id)
}

/// The status of a refused or failed operation; refusals name `field`.
fn operation_status(error: OperationError, field: Option<&str>) -> Status {
    let refusal = match error {
        OperationError::Refused(refusal) => refusal,
        OperationError::Failed(e) => return internal("changing the X.509 authorities", e),
    };
    let message = match field {
        Some(field) => format!("{field}: {refusal}"),
        None => refusal.to_string(),
    };
    match refusal {
        Refusal::Unknown(_) => Status::not_found(message),
        _ => Status::failed_precondition(message),
    }
}

fn state_of(state: AuthorityState) -> X509AuthorityState {
    match state {
        AuthorityState::Prepared => X509AuthorityState::Prepared,
        AuthorityState::Active => X509AuthorityState::Active,
        AuthorityState::Old => X509AuthorityState::Old,
        AuthorityState::Tainted => X509AuthorityState::Tainted,
        AuthorityState::Revoked => X509AuthorityState::Revoked,
    }
}

fn to_proto(
    record: &AuthorityRecord,
    usage: Option<&Usage>,
    certificate: Option<Vec<u8>>,
) -> X509Authority {
    X509Authority {
        authority_id: record.id.clone(),
        state: state_of(record.state) as i32,
        created_at: record.created_at,
        not_after: record.not_after,
        activated_at: record.activated_at.unwrap_or_default(),
        deactivated_at: record.deactivated_at.unwrap_or_default(),
        retire_at: record.retire_at.unwrap_or_default(),
        tainted_at: record.tainted_at.unwrap_or_default(),
        revoked_at: record.revoked_at.unwrap_or_default(),
        live_svids: usage.map_or(0, |u| u64::try_from(u.svids).unwrap_or(u64::MAX)),
        agents: usage
            .map(|u| {
                u.agents
                    .iter()
                    .map(|(agent_id, svids)| AgentSvidCount {
                        agent_id: agent_id.clone(),
                        svids: u64::try_from(*svids).unwrap_or(u64::MAX),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        certificate: certificate.unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl LocalAuthority for LocalAuthorityService {
    async fn get_x509_authorities(
        &self,
        request: Request<GetX509AuthoritiesRequest>,
    ) -> Result<Response<GetX509AuthoritiesResponse>, Status> {
        self.admin.authorize(&request)?;
        let usage = self.usage().await?;
        let (journal, certs) = self.authorities.journal().await;
        let authorities = journal
            .authorities
            .iter()
            .map(|r| to_proto(r, usage.get(&r.id), certs.get(&r.id).map(|c| c.to_vec())))
            .collect();
        Ok(Response::new(GetX509AuthoritiesResponse { authorities }))
    }

    async fn prepare_x509_authority(
        &self,
        request: Request<PrepareX509AuthorityRequest>,
    ) -> Result<Response<X509Authority>, Status> {
        let caller = self.admin.authorize(&request)?;
        self.operate(&caller, "authority.prepare", Operation::Prepare, None)
            .await
    }

    async fn activate_x509_authority(
        &self,
        request: Request<X509AuthorityRequest>,
    ) -> Result<Response<X509Authority>, Status> {
        let caller = self.admin.authorize(&request)?;
        let action = "authority.activate";
        let id = self.checked_id(&caller, action, &request.get_ref().authority_id)?;
        self.operate(
            &caller,
            action,
            Operation::Activate(id),
            Some("authority_id"),
        )
        .await
    }

    async fn taint_x509_authority(
        &self,
        request: Request<X509AuthorityRequest>,
    ) -> Result<Response<X509Authority>, Status> {
        let caller = self.admin.authorize(&request)?;
        let action = "authority.taint";
        let id = self.checked_id(&caller, action, &request.get_ref().authority_id)?;
        self.operate(&caller, action, Operation::Taint(id), Some("authority_id"))
            .await
    }

    async fn revoke_x509_authority(
        &self,
        request: Request<RevokeX509AuthorityRequest>,
    ) -> Result<Response<X509Authority>, Status> {
        let caller = self.admin.authorize(&request)?;
        let action = "authority.revoke";
        let req = request.get_ref();
        let id = self.checked_id(&caller, action, &req.authority_id)?;
        let operation = Operation::Revoke {
            id,
            force: req.force,
        };
        self.operate(&caller, action, operation, Some("authority_id"))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_ids_are_normalized_and_checked() {
        assert_eq!(
            parse_authority_id("authority_id", "AB:cd:01").unwrap(),
            "abcd01"
        );
        for (value, message) in [
            ("", "authority_id: is required"),
            (
                "xyz",
                r#"authority_id: "xyz" is not a subject key identifier in hex"#,
            ),
            (
                "abc",
                r#"authority_id: "abc" is not a subject key identifier in hex"#,
            ),
        ] {
            let status = parse_authority_id("authority_id", value).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn refusals_name_the_field_and_map_to_codes() {
        let status = operation_status(
            OperationError::Refused(Refusal::Unknown("ab".into())),
            Some("authority_id"),
        );
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(
            status.message(),
            r#"authority_id: no X.509 authority with SKI "ab""#
        );
        let status = operation_status(
            OperationError::Refused(Refusal::LiveSvids {
                id: "ab".into(),
                svids: 3,
                agents: 2,
            }),
            Some("authority_id"),
        );
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            r#"authority_id: X.509 authority "ab" still has 3 live SVIDs on 2 agents; revoke with force to revoke anyway"#
        );
    }
}
