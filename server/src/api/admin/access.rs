//! Who may call the admin services, decided once per call before any
//! handler runs.
//!
//! [`Guarded`] wraps a gRPC service. On the Unix socket it admits root, the
//! server's own user and, with `admin_socket_group`, every member of that
//! group (the kernel checked membership when it let them open the socket).
//! On the agent API's TLS port it admits only admin workloads: the client
//! certificate (an X.509-SVID of the trust domain, verified against the
//! bundle by the TLS layer) must carry the SPIFFE ID of a registered,
//! unexpired entry with `admin = true`; agents never qualify. An admitted
//! call carries its [`Caller`] in the request extensions; a refused one is
//! answered PERMISSION_DENIED and audited.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::CertificateDer;
use sigil::{Entry, SpiffeId, TrustDomain};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};

use crate::api::{Services, internal};
use crate::audit::{AuditLog, Caller, Event, Outcome, Principal};
use crate::clock;
use crate::registry::ListQuery;

/// How callers reach the wrapped service.
#[derive(Debug, Clone)]
pub(crate) enum Transport {
    /// The local Unix socket.
    Local {
        /// The server's effective user ID, allowed besides root.
        server_uid: u32,
        /// Whether the socket is opened to a group (mode 0660).
        group_access: bool,
    },
    /// The agent API's TLS port, for admin workloads.
    Mtls,
}

/// The decision maker shared by the clones of a [`Guarded`] service.
#[derive(Debug)]
pub(crate) struct Gate {
    transport: Transport,
    services: Arc<Services>,
    audit: AuditLog,
}

/// A gRPC service that only admitted callers reach.
#[derive(Debug, Clone)]
pub(crate) struct Guarded<S> {
    inner: S,
    gate: Arc<Gate>,
}

// === impl Gate ===

impl Gate {
    /// A gate for callers arriving over `transport`.
    pub(crate) fn new(transport: Transport, services: Arc<Services>, audit: AuditLog) -> Self {
        Self {
            transport,
            services,
            audit,
        }
    }

    /// Wraps `inner` so that only admitted callers reach it.
    pub(crate) fn guard<S>(self: &Arc<Self>, inner: S) -> Guarded<S> {
        Guarded {
            inner,
            gate: Arc::clone(self),
        }
    }

    /// The caller of a call to `method` whose transport facts are in
    /// `extensions`, or the refusal (which is audited).
    async fn admit(&self, extensions: &http::Extensions, method: &str) -> Result<Caller, Status> {
        let decision = match &self.transport {
            Transport::Local {
                server_uid,
                group_access,
            } => {
                let uid = extensions
                    .get::<UdsConnectInfo>()
                    .and_then(|info| info.peer_cred)
                    .map(|cred| cred.uid());
                admit_local(uid, *server_uid, *group_access)
                    .map_err(|status| (uid.map_or(Principal::Unknown, Principal::Uid), status))
            }
            Transport::Mtls => {
                let tls = extensions.get::<TlsConnectInfo<TcpConnectInfo>>();
                let certs = tls.and_then(TlsConnectInfo::peer_certs);
                let address = tls
                    .and_then(|info| info.get_ref().remote_addr())
                    .map_or(Principal::Unknown, |a| Principal::Address(a.to_string()));
                self.admit_svid(certs.as_deref().map(Vec::as_slice))
                    .await
                    .map_err(|(id, status)| {
                        (
                            id.map_or(address, |id| Principal::SpiffeId(id.to_string())),
                            status,
                        )
                    })
            }
        };
        decision.map_err(|(principal, status)| {
            tracing::warn!(
                caller = %principal,
                method,
                error = status.message(),
                "admin API: call refused"
            );
            self.audit.record(
                &Event::new(principal, "access.denied")
                    .outcome(Outcome::from(&status))
                    .detail("method", method),
            );
            status
        })
    }

    /// Admits an admin workload by its client certificate chain. On
    /// refusal, returns the certificate's SPIFFE ID when it has one.
    async fn admit_svid(
        &self,
        certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<Caller, (Option<SpiffeId>, Status)> {
        let Some(leaf) = certs.and_then(<[_]>::first) else {
            return Err((
                None,
                Status::unauthenticated(
                    "a client certificate (admin workload X509-SVID) is required",
                ),
            ));
        };
        let id = sigil::x509::spiffe_id_of(leaf).map_err(|e| {
            (
                None,
                Status::unauthenticated(format!("client certificate: {e}")),
            )
        })?;
        let is_agent = self
            .services
            .store
            .get_agent(&id)
            .await
            .map_err(|e| (Some(id.clone()), internal("reading the agent record", e)))?
            .is_some();
        let entries = self.services.registry.list(&ListQuery {
            spiffe_id: Some(&id),
            limit: usize::MAX - 1,
            ..ListQuery::default()
        });
        let td = self.services.ca.current().bundle.trust_domain().clone();
        let entries: Vec<&Entry> = entries.0.iter().map(Arc::as_ref).collect();
        admit_admin(&id, &td, is_agent, &entries, clock::now_unix())
            .map_err(|status| (Some(id), status))
    }
}

/// Decides a local caller by the uid the kernel reported.
pub(crate) fn admit_local(
    uid: Option<u32>,
    server_uid: u32,
    group_access: bool,
) -> Result<Caller, Status> {
    match uid {
        Some(uid) if uid == 0 || uid == server_uid || group_access => Ok(Caller::Local { uid }),
        Some(uid) => Err(Status::permission_denied(format!(
            "admin API: uid {uid} is not allowed"
        ))),
        None => Err(Status::permission_denied(
            "admin API: the caller's credentials are unknown",
        )),
    }
}

/// Decides a caller over mTLS by the SPIFFE ID of its verified SVID:
/// admitted when an unexpired entry with that SPIFFE ID has `admin` set.
/// Agents (`is_agent`), the server's own ID and node aliases (entries
/// parented to the server, which are never issued) never qualify.
pub(crate) fn admit_admin(
    id: &SpiffeId,
    td: &TrustDomain,
    is_agent: bool,
    entries: &[&Entry],
    now: i64,
) -> Result<Caller, Status> {
    let server = td.server_id();
    let admitted = id.is_member_of(td)
        && !is_agent
        && *id != server
        && entries.iter().any(|entry| {
            entry.spiffe_id == *id
                && entry.admin
                && !entry.is_expired(now)
                && entry.parent_id != server
        });
    if admitted {
        Ok(Caller::Admin {
            spiffe_id: id.clone(),
        })
    } else {
        Err(Status::permission_denied(format!(
            "{id} is not an admin workload"
        )))
    }
}

// === impl Guarded ===

impl<S> tower::Service<http::Request<Body>> for Guarded<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = Arc::clone(&self.gate);
        Box::pin(async move {
            let method = request.uri().path().to_owned();
            match gate.admit(request.extensions(), &method).await {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use sigil::proto::sigil::types::v1 as pb;

    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn entry(spiffe_id: &str, parent_id: &str, admin: bool, expires_at: i64) -> Entry {
        Entry::from_proto(
            &pb::Entry {
                id: "e".into(),
                spiffe_id: spiffe_id.into(),
                parent_id: parent_id.into(),
                selectors: vec![pb::Selector {
                    r#type: "unix".into(),
                    value: "uid:1001".into(),
                }],
                admin,
                expires_at,
                ..Default::default()
            },
            &td(),
        )
        .unwrap()
    }

    const AGENT: &str = "spiffe://example.org/sigil/agent/join_token/a1";
    const OPS: &str = "spiffe://example.org/ops";

    fn decide(id: &str, is_agent: bool, entries: &[Entry], now: i64) -> Result<Caller, Status> {
        let entries: Vec<&Entry> = entries.iter().collect();
        admit_admin(&id.parse().unwrap(), &td(), is_agent, &entries, now)
    }

    fn assert_refused(result: Result<Caller, Status>, id: &str) {
        let status = result.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(status.message(), format!("{id} is not an admin workload"));
    }

    #[test]
    fn an_admin_entry_admits_its_spiffe_id() {
        let entries = [entry(OPS, AGENT, false, 0), entry(OPS, AGENT, true, 0)];
        let caller = decide(OPS, false, &entries, 1000).unwrap();
        assert_eq!(
            caller,
            Caller::Admin {
                spiffe_id: OPS.parse().unwrap()
            }
        );
    }

    #[test]
    fn a_workload_without_an_admin_entry_is_refused() {
        assert_refused(
            decide(OPS, false, &[entry(OPS, AGENT, false, 0)], 1000),
            OPS,
        );
        assert_refused(decide(OPS, false, &[], 1000), OPS);
        let other = "spiffe://example.org/other";
        assert_refused(
            decide(other, false, &[entry(OPS, AGENT, true, 0)], 1000),
            other,
        );
    }

    #[test]
    fn an_expired_admin_entry_admits_no_longer() {
        let entries = [entry(OPS, AGENT, true, 2000)];
        assert!(decide(OPS, false, &entries, 1999).is_ok());
        assert_refused(decide(OPS, false, &entries, 2000), OPS);
    }

    #[test]
    fn agents_the_server_and_aliases_are_never_admins() {
        // An agent whose ID (given at token creation) an admin entry names.
        let node = "spiffe://example.org/nodes/n1";
        assert_refused(decide(node, true, &[entry(node, OPS, true, 0)], 1000), node);
        // Entries cannot name IDs under /sigil/; one stored earlier still
        // does not make the server an admin.
        let server = "spiffe://example.org/sigil/server";
        let mut stored = entry(OPS, AGENT, true, 0);
        stored.spiffe_id = server.parse().unwrap();
        assert_refused(decide(server, false, &[stored], 1000), server);
        let alias = "spiffe://example.org/nodes/web";
        assert_refused(
            decide(alias, false, &[entry(alias, server, true, 0)], 1000),
            alias,
        );
    }

    #[test]
    fn local_callers_are_decided_by_uid() {
        assert_eq!(
            admit_local(Some(0), 1000, false).unwrap(),
            Caller::Local { uid: 0 }
        );
        assert_eq!(
            admit_local(Some(1000), 1000, false).unwrap(),
            Caller::Local { uid: 1000 }
        );
        let status = admit_local(Some(1001), 1000, false).unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(status.message(), "admin API: uid 1001 is not allowed");
        assert_eq!(
            admit_local(Some(1001), 1000, true).unwrap(),
            Caller::Local { uid: 1001 }
        );
        let status = admit_local(None, 1000, true).unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
    }
}
