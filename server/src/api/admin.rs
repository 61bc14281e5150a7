//! The admin API (`sigil.admin.v1.Admin`), served on a local Unix socket to
//! root and to the server's own user.

use std::sync::Arc;
use std::time::Duration;

use sigil::SpiffeId;
use sigil::proto::sigil::admin::v1::admin_server::Admin;
use sigil::proto::sigil::admin::v1::{
    BatchCreateEntryRequest, BatchDeleteEntryRequest, BatchEntryResponse, BatchUpdateEntryRequest,
    CreateJoinTokenRequest, CreateJoinTokenResponse, EntryResult, GetBundleRequest,
    GetEntryRequest, ListEntriesRequest, ListEntriesResponse,
};
use sigil::proto::sigil::types::v1 as pb;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::{Services, internal};
use crate::clock;
use crate::registry::{ListQuery, RegistryError};
use crate::tokens::{DEFAULT_TTL, TokenError};

/// Entries per page when the caller sets no page size.
const DEFAULT_PAGE_SIZE: usize = 100;
/// Most entries per page.
const MAX_PAGE_SIZE: usize = 1000;

/// The admin API service.
#[derive(Debug, Clone)]
pub(crate) struct AdminService {
    services: Arc<Services>,
    /// The server's effective user ID, allowed besides root.
    server_uid: u32,
}

impl AdminService {
    /// A service over the shared state.
    pub(crate) fn new(services: Arc<Services>) -> Self {
        Self {
            services,
            server_uid: nix::unistd::geteuid().as_raw(),
        }
    }

    /// Allows only root and the server's own user.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let uid = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(|cred| cred.uid());
        match uid {
            Some(uid) if uid == 0 || uid == self.server_uid => Ok(()),
            Some(uid) => Err(Status::permission_denied(format!(
                "admin API: uid {uid} is not allowed"
            ))),
            None => Err(Status::permission_denied(
                "admin API: the caller's credentials are unknown",
            )),
        }
    }
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

fn parse_filter(field: &str, value: &str) -> Result<Option<SpiffeId>, Status> {
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
        self.authorize(&request)?;
        let entries = request.into_inner().entries;
        let created = self.services.registry.create(&entries).await;
        Ok(Response::new(results(
            created,
            "entries",
            Some("id"),
            "created",
        )))
    }

    async fn batch_update_entry(
        &self,
        request: Request<BatchUpdateEntryRequest>,
    ) -> Result<Response<BatchEntryResponse>, Status> {
        self.authorize(&request)?;
        let entries = request.into_inner().entries;
        let updated = self.services.registry.update(&entries).await;
        Ok(Response::new(results(
            updated,
            "entries",
            Some("id"),
            "updated",
        )))
    }

    async fn batch_delete_entry(
        &self,
        request: Request<BatchDeleteEntryRequest>,
    ) -> Result<Response<BatchEntryResponse>, Status> {
        self.authorize(&request)?;
        let ids = request.into_inner().ids;
        let deleted = self.services.registry.delete(&ids).await;
        // The item is the ID itself, so errors read `ids[i]: …`.
        let response = results(deleted, "ids", None, "deleted");
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
        let spiffe_id = parse_filter("by_spiffe_id", &req.by_spiffe_id)?;
        let parent_id = parse_filter("by_parent_id", &req.by_parent_id)?;
        let limit = match usize::try_from(req.page_size) {
            Err(_) => return Err(Status::invalid_argument("page_size: must not be negative")),
            Ok(0) => DEFAULT_PAGE_SIZE,
            Ok(n) => n.min(MAX_PAGE_SIZE),
        };
        let (page, more) = self.services.registry.list(&ListQuery {
            spiffe_id: spiffe_id.as_ref(),
            parent_id: parent_id.as_ref(),
            after: Some(req.page_token.as_str()).filter(|t| !t.is_empty()),
            limit,
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

    async fn create_join_token(
        &self,
        request: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        self.authorize(&request)?;
        let req = request.get_ref();
        let ttl = match req.ttl {
            0 => DEFAULT_TTL,
            n if n < 0 => return Err(Status::invalid_argument("ttl: must not be negative")),
            n => Duration::from_secs(n.unsigned_abs().into()),
        };
        let token = self
            .services
            .tokens
            .generate(&req.agent_id, ttl)
            .await
            .map_err(|e| match e {
                TokenError::AgentId(_) => Status::invalid_argument(e.to_string()),
                other => internal("creating a join token", other),
            })?;
        tracing::info!(
            agent.id = %token.agent_id,
            expires_at = %clock::rfc3339(token.expires_at),
            "join token created"
        );
        Ok(Response::new(CreateJoinTokenResponse {
            token: token.token.as_str().to_owned(),
            agent_id: token.agent_id.to_string(),
            expires_at: token.expires_at,
        }))
    }

    async fn get_bundle(
        &self,
        request: Request<GetBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(self.services.ca.bundle_proto()))
    }
}
