//! The admin API (`sigil.admin.v1.Admin`), served on the local Unix socket
//! to root, the server's own user and the socket group, and on the agent
//! API's TLS port to admin workloads ([`access`] decides who gets in).
//! Every change it makes is written to the audit log.

pub(crate) mod access;

use std::sync::Arc;
use std::time::Duration;

use sigil::proto::sigil::admin::v1::admin_server::Admin;
use sigil::proto::sigil::admin::v1::{
    self as admin_pb, BatchCreateEntryRequest, BatchDeleteEntryRequest, BatchEntryResponse,
    BatchUpdateEntryRequest, CountEntriesRequest, CountEntriesResponse, CreateJoinTokenRequest,
    CreateJoinTokenResponse, EntryResult, GetBundleRequest, GetEntryRequest, ListEntriesRequest,
    ListEntriesResponse,
};
use sigil::proto::sigil::types::v1 as pb;
use sigil::{Selector, Selectors, SpiffeId, TrustDomain};
use tonic::{Request, Response, Status};

use super::{Services, agents, internal};
use crate::audit::{self, AuditLog, Caller, Event, Outcome};
use crate::clock;
use crate::registry::{ListQuery, RegistryError, SelectorMatch};
use crate::tokens::{DEFAULT_TTL, TokenError};

/// Entries per page when the caller sets no page size.
const DEFAULT_PAGE_SIZE: usize = 100;
/// Most entries per page.
const MAX_PAGE_SIZE: usize = 1000;

/// The admin API service. Serve it only behind an [`access::Gate`].
#[derive(Debug, Clone)]
pub(crate) struct AdminService {
    services: Arc<Services>,
    audit: AuditLog,
}

impl AdminService {
    /// A service over the shared state that records changes in `audit`.
    pub(crate) fn new(services: Arc<Services>, audit: AuditLog) -> Self {
        Self { services, audit }
    }

    /// The caller the [`access::Gate`] admitted. A request that did not
    /// pass a gate is refused.
    pub(crate) fn authorize<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        caller_of(request)
    }

    /// Records in the audit log that `caller` did `action` on `ids`, with
    /// the outcome of `result`. Services served beside this one (which
    /// hold an `AdminService`) record their changes through it too.
    pub(crate) fn record<T, I>(
        &self,
        caller: &Caller,
        action: &'static str,
        ids: I,
        result: &Result<T, Status>,
    ) where
        I: IntoIterator,
        I::Item: std::fmt::Display,
    {
        audit::record(&self.audit, caller, action, ids, result);
    }

    /// Records an event built by a service served beside this one.
    pub(crate) fn record_event(&self, event: &Event) {
        self.audit.record(event);
    }

    /// Records one event per item of a batch entry call: the entry's ID
    /// (or the requested ID of a refused item), and its outcome.
    fn audit_entries(
        &self,
        caller: &Caller,
        action: &'static str,
        requested: &[Option<&str>],
        response: &BatchEntryResponse,
    ) {
        for (i, result) in response.results.iter().enumerate() {
            let requested = requested.get(i).copied().flatten();
            let mut event = Event::new(caller, action).detail("index", i);
            match (&result.entry, &result.status) {
                (Some(entry), _) => {
                    event = event
                        .ids([&entry.id])
                        .detail("spiffe_id", entry.spiffe_id.as_str())
                        .detail("parent_id", entry.parent_id.as_str())
                        .detail("revision", entry.revision);
                }
                (None, status) => {
                    let (code, message) = match status {
                        Some(s) => (tonic::Code::from_i32(s.code), s.message.clone()),
                        None => (tonic::Code::Unknown, String::new()),
                    };
                    let requested = requested.filter(|id| !id.is_empty());
                    event = event
                        .ids(requested)
                        .outcome(Outcome::Error { code, message });
                }
            }
            self.audit.record(&event);
        }
    }

    /// `CreateJoinToken` for an admitted caller; a created token is
    /// audited here (a refusal by the caller of this).
    async fn join_token(
        &self,
        caller: &Caller,
        request: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let req = request.get_ref();
        let ttl = match req.ttl {
            0 => DEFAULT_TTL,
            n if n < 0 => return Err(Status::invalid_argument("ttl: must not be negative")),
            n => Duration::from_secs(n.unsigned_abs().into()),
        };
        let token_error = |e: TokenError| match e {
            TokenError::AgentId(_) => Status::invalid_argument(e.to_string()),
            other => internal("creating a join token", other),
        };
        let tokens = &self.services.tokens;
        let registry = &self.services.registry;
        // The alias entry is made before the token is stored, so a refused
        // alias leaves no token behind.
        let pending = tokens.prepare(&req.agent_id).map_err(token_error)?;
        let alias = if req.alias_id.is_empty() {
            None
        } else {
            let entry = registry
                .create_alias(&req.alias_id, &pending.agent_id)
                .await
                .map_err(|e| Status::new(e.code(), e.alias_message("alias_id")))?;
            tracing::info!(
                entry.id = %entry.id,
                spiffe.id = %entry.spiffe_id,
                agent.id = %pending.agent_id,
                "node alias created"
            );
            Some(entry)
        };
        let token = match tokens.save(pending, ttl).await {
            Ok(token) => token,
            Err(e) => {
                if let Some(entry) = &alias {
                    registry.delete(std::slice::from_ref(&entry.id)).await;
                }
                return Err(token_error(e));
            }
        };
        tracing::info!(
            agent.id = %token.agent_id,
            expires_at = %clock::rfc3339(token.expires_at),
            "join token created"
        );
        let mut event = Event::new(caller, "token.generate")
            .ids([&token.agent_id])
            .detail("token_id", token.token_id.as_str())
            .detail("expires_at", clock::rfc3339(token.expires_at));
        if let Some(entry) = &alias {
            event = event.detail("alias_entry_id", entry.id.as_str());
        }
        self.audit.record(&event);
        Ok(Response::new(CreateJoinTokenResponse {
            token: token.token.as_str().to_owned(),
            agent_id: token.agent_id.to_string(),
            expires_at: token.expires_at,
            alias_entry_id: alias.map(|e| e.id.clone()).unwrap_or_default(),
        }))
    }
}

/// The caller a gate admitted, from the request extensions.
fn caller_of<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::permission_denied("admin API: the caller was not authorized"))
}

fn results(
    results: Vec<Result<Arc<sigil::Entry>, RegistryError>>,
    item: &str,
    id_field: Option<&str>,
    action: &str,
) -> BatchEntryResponse {
    let results = results
        .into_iter()
        .enumerate()
        .map(|(i, result)| match result {
            Ok(entry) => {
                tracing::info!(
                    entry.id = %entry.id,
                    spiffe.id = %entry.spiffe_id,
                    parent.id = %entry.parent_id,
                    revision = entry.revision,
                    "entry {action}"
                );
                EntryResult {
                    status: Some(pb::ItemStatus {
                        code: tonic::Code::Ok as i32,
                        message: String::new(),
                    }),
                    entry: Some(entry.to_proto()),
                }
            }
            Err(e) => {
                if let RegistryError::Store(cause) = &e {
                    tracing::error!(error = %cause, "entry {action}: store failure");
                }
                EntryResult {
                    status: Some(pb::ItemStatus {
                        code: e.code() as i32,
                        message: e.item_message(&format!("{item}[{i}]"), id_field),
                    }),
                    entry: None,
                }
            }
        })
        .collect();
    BatchEntryResponse { results }
}

/// The filters of a list or count request, checked.
#[derive(Debug)]
struct Filter {
    id: Option<String>,
    spiffe_id: Option<SpiffeId>,
    parent_id: Option<SpiffeId>,
    federates_with: Vec<TrustDomain>,
    hint: Option<String>,
    selectors: Option<(Selectors, SelectorMatch)>,
}

// === impl Filter ===

impl Filter {
    /// Checks the filter fields of `req`; an empty field filters nothing.
    fn parse(req: &ListEntriesRequest) -> Result<Self, Status> {
        let federates_with = req
            .by_federates_with
            .iter()
            .enumerate()
            .map(|(i, name)| {
                TrustDomain::new(name).map_err(|e| {
                    Status::invalid_argument(format!("by_federates_with[{i}]: {name:?} {e}"))
                })
            })
            .collect::<Result<_, _>>()?;

        let mode = match admin_pb::SelectorMatch::try_from(req.selector_match) {
            Ok(admin_pb::SelectorMatch::Exact) => SelectorMatch::Exact,
            Ok(admin_pb::SelectorMatch::Subset) => SelectorMatch::Subset,
            Ok(admin_pb::SelectorMatch::Superset) => SelectorMatch::Superset,
            Ok(admin_pb::SelectorMatch::Any) => SelectorMatch::Any,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "selector_match: unknown mode {}",
                    req.selector_match
                )));
            }
        };
        let selectors = req
            .by_selectors
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Selector::new(&s.r#type, &s.value)
                    .map_err(|e| Status::invalid_argument(format!("by_selectors[{i}]: {e}")))
            })
            .collect::<Result<Selectors, _>>()?;

        Ok(Self {
            id: non_empty(&req.by_id),
            spiffe_id: parse_id("by_spiffe_id", &req.by_spiffe_id)?,
            parent_id: parse_id("by_parent_id", &req.by_parent_id)?,
            federates_with,
            hint: non_empty(&req.by_hint),
            selectors: (!selectors.is_empty()).then_some((selectors, mode)),
        })
    }

    /// The registry query for these filters, without a page position.
    fn query(&self) -> ListQuery<'_> {
        ListQuery {
            id: self.id.as_deref(),
            spiffe_id: self.spiffe_id.as_ref(),
            parent_id: self.parent_id.as_ref(),
            federates_with: &self.federates_with,
            hint: self.hint.as_deref(),
            selectors: self.selectors.as_ref().map(|(s, mode)| (s, *mode)),
            after: None,
            limit: 0,
        }
    }
}

fn non_empty(value: &str) -> Option<String> {
    Some(value.to_owned()).filter(|v| !v.is_empty())
}

fn parse_id(field: &str, value: &str) -> Result<Option<SpiffeId>, Status> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("{field}: {value:?} {e}")))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn batch_create_entry(
        &self,
        request: Request<BatchCreateEntryRequest>,
    ) -> Result<Response<BatchEntryResponse>, Status> {
        let caller = self.authorize(&request)?;
        let entries = request.into_inner().entries;
        let created = self.services.registry.create(&entries).await;
        let max_ttl = self.services.ca.max_svid_ttl();
        crate::ca::rotation::warn_capped_entries(created.iter().flatten().map(|e| &**e), max_ttl);
        let response = results(created, "entries", Some("id"), "created");
        let requested: Vec<_> = entries.iter().map(|e| Some(e.id.as_str())).collect();
        self.audit_entries(&caller, "entry.create", &requested, &response);
        Ok(Response::new(response))
    }

    async fn batch_update_entry(
        &self,
        request: Request<BatchUpdateEntryRequest>,
    ) -> Result<Response<BatchEntryResponse>, Status> {
        let caller = self.authorize(&request)?;
        let entries = request.into_inner().entries;
        let updated = self.services.registry.update(&entries).await;
        let max_ttl = self.services.ca.max_svid_ttl();
        crate::ca::rotation::warn_capped_entries(updated.iter().flatten().map(|e| &**e), max_ttl);
        let response = results(updated, "entries", Some("id"), "updated");
        let requested: Vec<_> = entries.iter().map(|e| Some(e.id.as_str())).collect();
        self.audit_entries(&caller, "entry.update", &requested, &response);
        Ok(Response::new(response))
    }

    async fn batch_delete_entry(
        &self,
        request: Request<BatchDeleteEntryRequest>,
    ) -> Result<Response<BatchEntryResponse>, Status> {
        let caller = self.authorize(&request)?;
        let ids = request.into_inner().ids;
        let deleted = self.services.registry.delete(&ids).await;
        // The item is the ID itself, so errors read `ids[i]: …`.
        let response = results(deleted, "ids", None, "deleted");
        let requested: Vec<_> = ids.iter().map(|id| Some(id.as_str())).collect();
        self.audit_entries(&caller, "entry.delete", &requested, &response);
        Ok(Response::new(response))
    }

    async fn get_entry(
        &self,
        request: Request<GetEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        self.authorize(&request)?;
        let id = &request.get_ref().id;
        if id.is_empty() {
            return Err(Status::invalid_argument("id: is required"));
        }
        let entry = self
            .services
            .registry
            .get(id)
            .ok_or_else(|| Status::not_found(format!("no entry {id:?}")))?;
        Ok(Response::new(entry.to_proto()))
    }

    async fn list_entries(
        &self,
        request: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        self.authorize(&request)?;
        let req = request.get_ref();
        let filter = Filter::parse(req)?;
        let limit = match usize::try_from(req.page_size) {
            Err(_) => return Err(Status::invalid_argument("page_size: must not be negative")),
            Ok(0) => DEFAULT_PAGE_SIZE,
            Ok(n) => n.min(MAX_PAGE_SIZE),
        };
        let (page, more) = self.services.registry.list(&ListQuery {
            after: Some(req.page_token.as_str()).filter(|t| !t.is_empty()),
            limit,
            ..filter.query()
        });
        let next_page_token = match (more, page.last()) {
            (true, Some(last)) => last.id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(ListEntriesResponse {
            entries: page.iter().map(|e| e.to_proto()).collect(),
            next_page_token,
        }))
    }

    async fn count_entries(
        &self,
        request: Request<CountEntriesRequest>,
    ) -> Result<Response<CountEntriesResponse>, Status> {
        self.authorize(&request)?;
        let filter = match &request.get_ref().filter {
            Some(req) => Filter::parse(req)?,
            None => Filter::parse(&ListEntriesRequest::default())?,
        };
        let count = self.services.registry.count(&filter.query());
        Ok(Response::new(CountEntriesResponse {
            count: u64::try_from(count).unwrap_or(u64::MAX),
        }))
    }

    async fn create_join_token(
        &self,
        request: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let caller = self.authorize(&request)?;
        let agent_id = request.get_ref().agent_id.clone();
        let result = self.join_token(&caller, request).await;
        if let Err(status) = &result {
            self.audit.record(
                &Event::new(&caller, "token.generate")
                    .ids(Some(agent_id).filter(|id| !id.is_empty()))
                    .outcome(Outcome::from(status)),
            );
        }
        result
    }

    async fn list_agents(
        &self,
        request: Request<admin_pb::ListAgentsRequest>,
    ) -> Result<Response<admin_pb::ListAgentsResponse>, Status> {
        self.authorize(&request)?;
        let filter = agents::AgentFilter::parse(request.get_ref())?;
        let agents = agents::list(&self.services, &filter).await?;
        Ok(Response::new(admin_pb::ListAgentsResponse {
            agents: agents.iter().map(agents::to_proto).collect(),
        }))
    }

    async fn count_agents(
        &self,
        request: Request<admin_pb::ListAgentsRequest>,
    ) -> Result<Response<admin_pb::CountAgentsResponse>, Status> {
        self.authorize(&request)?;
        let filter = agents::AgentFilter::parse(request.get_ref())?;
        let agents = agents::list(&self.services, &filter).await?;
        Ok(Response::new(admin_pb::CountAgentsResponse {
            count: agents.len() as u64,
        }))
    }

    async fn get_agent(
        &self,
        request: Request<admin_pb::AgentIdRequest>,
    ) -> Result<Response<admin_pb::Agent>, Status> {
        self.authorize(&request)?;
        let id = agents::parse_agent_id(&request.get_ref().spiffe_id)?;
        let record = agents::get(&self.services, &id).await?;
        Ok(Response::new(agents::to_proto(&record)))
    }

    async fn evict_agent(
        &self,
        request: Request<admin_pb::AgentIdRequest>,
    ) -> Result<Response<admin_pb::Agent>, Status> {
        let caller = self.authorize(&request)?;
        let agent_id = &request.get_ref().spiffe_id;
        let result = match agents::parse_agent_id(agent_id) {
            Ok(id) => agents::evict(&self.services, &id).await,
            Err(status) => Err(status),
        };
        self.record(&caller, "agent.evict", [agent_id], &result);
        Ok(Response::new(agents::to_proto(&result?)))
    }

    async fn ban_agent(
        &self,
        request: Request<admin_pb::AgentIdRequest>,
    ) -> Result<Response<admin_pb::Agent>, Status> {
        let caller = self.authorize(&request)?;
        let agent_id = &request.get_ref().spiffe_id;
        let result = match agents::parse_agent_id(agent_id) {
            Ok(id) => agents::set_banned(&self.services, &id, true).await,
            Err(status) => Err(status),
        };
        self.record(&caller, "agent.ban", [agent_id], &result);
        Ok(Response::new(agents::to_proto(&result?)))
    }

    async fn unban_agent(
        &self,
        request: Request<admin_pb::AgentIdRequest>,
    ) -> Result<Response<admin_pb::Agent>, Status> {
        let caller = self.authorize(&request)?;
        let agent_id = &request.get_ref().spiffe_id;
        let result = match agents::parse_agent_id(agent_id) {
            Ok(id) => agents::set_banned(&self.services, &id, false).await,
            Err(status) => Err(status),
        };
        self.record(&caller, "agent.unban", [agent_id], &result);
        Ok(Response::new(agents::to_proto(&result?)))
    }

    async fn get_bundle(
        &self,
        request: Request<GetBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(self.services.ca.bundle_proto()))
    }

    async fn mint_x509_svid(
        &self,
        request: Request<admin_pb::MintX509SvidRequest>,
    ) -> Result<Response<admin_pb::MintX509SvidResponse>, Status> {
        let caller = self.authorize(&request)?;
        let req = request.get_ref();
        let result = super::mint::mint(&self.services, req);
        let mut event = Event::new(&caller, "x509.mint").outcome(Outcome::of(&result));
        event = match &result {
            Ok(minted) => {
                let leaf = minted.cert_chain.first().map(|der| der.as_slice());
                let id = leaf.and_then(|der| {
                    sigil::x509::spiffe_id_of(&rustls_pki_types::CertificateDer::from(der)).ok()
                });
                event
                    .ids(id)
                    .detail("expires_at", clock::rfc3339(minted.expires_at))
                    .detail("dns_names", req.dns_names.clone())
            }
            Err(_) => event.detail("dns_names", req.dns_names.clone()),
        };
        self.audit.record(&event);
        result.map(Response::new)
    }

    async fn set_federated_bundle(
        &self,
        request: Request<admin_pb::SetFederatedBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        let caller = self.authorize(&request)?;
        let bundle = request.into_inner().bundle;
        let requested = bundle.as_ref().map(|b| b.trust_domain.clone());
        let authorities = bundle.as_ref().map_or(0, |b| b.x509_authorities.len());
        let result = super::federation::set(&self.services, bundle).await;
        let trust_domain = match &result {
            Ok(stored) => Some(stored.trust_domain.clone()),
            Err(_) => requested.filter(|td| !td.is_empty()),
        };
        self.audit.record(
            &Event::new(&caller, "bundle.set")
                .ids(trust_domain)
                .outcome(Outcome::of(&result))
                .detail("x509_authorities", authorities),
        );
        result.map(Response::new)
    }

    async fn list_federated_bundles(
        &self,
        request: Request<admin_pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<admin_pb::ListFederatedBundlesResponse>, Status> {
        self.authorize(&request)?;
        let bundles = super::federation::list(&self.services).await?;
        Ok(Response::new(admin_pb::ListFederatedBundlesResponse {
            bundles,
        }))
    }

    async fn delete_federated_bundle(
        &self,
        request: Request<admin_pb::DeleteFederatedBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        let caller = self.authorize(&request)?;
        let trust_domain = &request.get_ref().trust_domain;
        let result = super::federation::delete(&self.services, trust_domain).await;
        self.record(
            &caller,
            "bundle.delete",
            Some(trust_domain).filter(|td| !td.is_empty()),
            &result,
        );
        result.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(kind: &str, value: &str) -> pb::Selector {
        pb::Selector {
            r#type: kind.into(),
            value: value.into(),
        }
    }

    #[test]
    fn only_a_call_a_gate_admitted_has_a_caller() {
        let status = caller_of(&Request::new(())).unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(status.message(), "admin API: the caller was not authorized");

        let mut request = Request::new(());
        let caller = Caller::Admin {
            spiffe_id: "spiffe://example.org/ops".parse().unwrap(),
        };
        request.extensions_mut().insert(caller.clone());
        assert_eq!(caller_of(&request).unwrap(), caller);
    }

    #[test]
    fn filters_are_parsed_and_empty_ones_filter_nothing() {
        let none = Filter::parse(&ListEntriesRequest::default()).unwrap();
        assert!(none.id.is_none() && none.hint.is_none() && none.selectors.is_none());
        assert!(none.spiffe_id.is_none() && none.parent_id.is_none());
        assert!(none.federates_with.is_empty());

        let filter = Filter::parse(&ListEntriesRequest {
            by_id: "e1".into(),
            by_spiffe_id: "spiffe://example.org/web".into(),
            by_federates_with: vec!["partner.org".into()],
            by_hint: "h".into(),
            by_selectors: vec![selector("unix", "uid:1"), selector("unix", "gid:2")],
            selector_match: admin_pb::SelectorMatch::Subset.into(),
            ..Default::default()
        })
        .unwrap();
        let query = filter.query();
        assert_eq!(query.id, Some("e1"));
        assert_eq!(query.hint, Some("h"));
        assert_eq!(query.federates_with.len(), 1);
        let (selectors, mode) = query.selectors.unwrap();
        assert_eq!(selectors.len(), 2);
        assert_eq!(mode, SelectorMatch::Subset);
    }

    #[test]
    fn bad_filters_name_the_field() {
        let cases = [
            (
                ListEntriesRequest {
                    by_parent_id: "spiffe://Bad".into(),
                    ..Default::default()
                },
                "by_parent_id: \"spiffe://Bad\" ",
            ),
            (
                ListEntriesRequest {
                    by_federates_with: vec!["ok.org".into(), "Bad!".into()],
                    ..Default::default()
                },
                "by_federates_with[1]: \"Bad!\" ",
            ),
            (
                ListEntriesRequest {
                    by_selectors: vec![selector("unix", "")],
                    ..Default::default()
                },
                "by_selectors[0]: ",
            ),
            (
                ListEntriesRequest {
                    by_selectors: vec![selector("unix", "uid:1")],
                    selector_match: 42,
                    ..Default::default()
                },
                "selector_match: unknown mode 42",
            ),
        ];
        for (request, prefix) in cases {
            let status = Filter::parse(&request).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().starts_with(prefix), "{}", status.message());
        }
    }
}
