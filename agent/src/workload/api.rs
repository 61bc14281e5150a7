//! The `SpiffeWorkloadAPI` gRPC service: hands each caller the X.509-SVIDs
//! and bundle it is entitled to, and pushes updates on open streams.
//!
//! Rules followed (SPIFFE conformance notes, sections 4 and 7.4):
//! - every call must carry the metadata `workload.spiffe.io: true` (one
//!   value), else `INVALID_ARGUMENT` (WA-5, WA-6);
//! - the caller is attested once per call from the kernel's SO_PEERCRED
//!   facts; its identities are the snapshot's entries whose selectors are a
//!   subset of the caller's and that have an SVID, in snapshot order, so the
//!   first (the default identity) stays stable (WA-28);
//! - a stream sends its first message at once and afterwards only when what
//!   the caller gets changed, each time the full state (WA-15..WA-17); callers
//!   that get the same SVIDs from a snapshot share one response, built once;
//! - a caller with no identity gets `PERMISSION_DENIED` `no identity issued`
//!   (WA-8, RS-7), also when its identities disappear later (WA-14); one
//!   whose entries have no SVID yet waits up to [`PENDING_WAIT`] first;
//! - `FetchX509SVID` carries in `federated_bundles` the bundles of the trust
//!   domains that the entries of the caller's SVIDs federate with, keyed
//!   `spiffe://<trust domain>` (WA-22), never the agent's own (WA-23);
//!   `FetchX509Bundles` carries the agent's bundle and those; a trust domain
//!   whose bundle is deleted or no longer federated with is left out
//!   (WA-18, FE-9);
//! - no message ever has an empty `svids` or a zero-length bundle (WA-24),
//!   and no stream ends with OK (WA-19): shutdown ends it with
//!   `UNAVAILABLE`;
//! - JWT-SVIDs and WIT-SVIDs are not supported: `UNIMPLEMENTED` (WA-4).

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sigil::proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil::proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse, WitsvidRequest,
    WitsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use sigil::{Selectors, TrustDomain};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::attestor::{AttestError, Attestor, Peer};
use crate::cache::{Snapshot, SnapshotReceiver, Svid};

/// The metadata key every Workload API call must carry with the value
/// `true`.
pub(crate) const SECURITY_HEADER: &str = "workload.spiffe.io";

/// The status message of a call without the security header (SPIRE's).
pub(crate) const MISSING_HEADER: &str = "security header missing from request";

/// The status message for a caller entitled to nothing (SPIRE's wording,
/// which the Rust `spiffe` crate matches on).
pub(crate) const NO_IDENTITY: &str = "no identity issued";

/// The status message when the caller cannot be attested.
pub(crate) const ATTESTATION_FAILED: &str = "workload attestation failed";

/// The status message of streams ended because the agent stops.
pub(crate) const SHUTTING_DOWN: &str = "agent shutting down";

/// The status message of the JWT-SVID RPCs.
pub(crate) const JWT_UNSUPPORTED: &str = "JWT-SVIDs are not supported by this agent";

/// The status message of the WIT-SVID RPCs.
pub(crate) const WIT_UNSUPPORTED: &str = "WIT-SVIDs are not supported by this agent";

/// How long a caller whose entries have no SVID yet (the agent has just
/// started, or an SVID is being re-signed) waits for one before it is told
/// `no identity issued`.
pub(crate) const PENDING_WAIT: Duration = Duration::from_secs(5);

/// The most X.509-SVID responses kept for one snapshot (one per distinct
/// set of SVIDs callers get); more distinct sets than this start it afresh.
const MAX_CACHED_RESPONSES: usize = 64;

/// The server-streaming responses of this service.
type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The interceptor that rejects calls without the security header.
pub(crate) type HeaderCheck = fn(Request<()>) -> Result<Request<()>, Status>;

/// The service, ready to be added to a tonic server.
pub(crate) type Service = InterceptedService<SpiffeWorkloadApiServer<WorkloadApi>, HeaderCheck>;

/// The Workload API over the agent's current [`Snapshot`].
#[derive(Debug, Clone)]
pub(crate) struct WorkloadApi {
    snapshots: SnapshotReceiver,
    stopping: watch::Receiver<bool>,
    attestor: Arc<Attestor>,
    responses: Arc<ResponseCache>,
}

// === impl WorkloadApi ===

impl WorkloadApi {
    /// A service serving `snapshots` to the callers `attestor` attests;
    /// its open streams end with `UNAVAILABLE` once `stopping` turns true or
    /// its sender is dropped.
    pub(crate) fn new(
        snapshots: SnapshotReceiver,
        stopping: watch::Receiver<bool>,
        attestor: Arc<Attestor>,
    ) -> Self {
        Self {
            snapshots,
            stopping,
            attestor,
            responses: Arc::default(),
        }
    }

    /// The gRPC service, with the security header check in front.
    pub(crate) fn into_service(self) -> Service {
        SpiffeWorkloadApiServer::with_interceptor(self, check_security_header as HeaderCheck)
    }

    /// Attests the caller of `request` from its socket's peer credentials.
    async fn attest_caller<T>(&self, request: &Request<T>) -> Result<(Peer, Selectors), Status> {
        let Some(peer) = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred.as_ref())
            .and_then(Peer::from_ucred)
        else {
            tracing::warn!("caller has no peer credentials; workload attestation failed");
            return Err(Status::unavailable(ATTESTATION_FAILED));
        };
        match self.attestor.attest(peer).await {
            Ok(selectors) => Ok((peer, selectors)),
            Err(e) => Err(attest_error_status(peer, &e)),
        }
    }

    fn stream<F: Feed>(&self, feed: F) -> ResponseStream<F::Response> {
        Box::pin(drive(feed, self.snapshots.clone(), self.stopping.clone()))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;
    type FetchWITSVIDStream = ResponseStream<WitsvidResponse>;
    type FetchWITBundlesStream = ResponseStream<WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let (peer, selectors) = self.attest_caller(&request).await?;
        tracing::debug!(pid = peer.pid, uid = peer.uid, "X.509-SVID stream opened");
        let responses = Arc::clone(&self.responses);
        Ok(Response::new(self.stream(X509SvidFeed {
            selectors,
            responses,
        })))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let (peer, selectors) = self.attest_caller(&request).await?;
        tracing::debug!(pid = peer.pid, uid = peer.uid, "X.509 bundle stream opened");
        Ok(Response::new(self.stream(X509BundlesFeed { selectors })))
    }

    async fn fetch_jwtsvid(
        &self,
        _request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Err(Status::unimplemented(JWT_UNSUPPORTED))
    }

    async fn fetch_jwt_bundles(
        &self,
        _request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented(JWT_UNSUPPORTED))
    }

    async fn validate_jwtsvid(
        &self,
        _request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented(JWT_UNSUPPORTED))
    }

    async fn fetch_witsvid(
        &self,
        _request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented(WIT_UNSUPPORTED))
    }

    async fn fetch_wit_bundles(
        &self,
        _request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented(WIT_UNSUPPORTED))
    }
}

/// The status of a caller that could not be attested: one that exited or
/// changed program has no identity; any other failure (a `/proc` read, the
/// Docker engine or the kubelet unreachable, a container the kubelet does
/// not list yet) is `UNAVAILABLE`, which clients retry.
fn attest_error_status(peer: Peer, e: &AttestError) -> Status {
    if let AttestError::Vanished { .. } = e {
        tracing::debug!(pid = peer.pid, uid = peer.uid, error = %e, "no identity issued");
        Status::permission_denied(NO_IDENTITY)
    } else {
        tracing::warn!(pid = peer.pid, uid = peer.uid, error = %e, "workload attestation failed");
        Status::unavailable(ATTESTATION_FAILED)
    }
}

/// Lets a call through only if it carries exactly one `workload.spiffe.io`
/// value and that value is `true` (WA-6).
pub(crate) fn check_security_header(request: Request<()>) -> Result<Request<()>, Status> {
    let mut values = request.metadata().get_all(SECURITY_HEADER).iter();
    let ok = matches!((values.next(), values.next()), (Some(v), None) if v == "true");
    if ok {
        Ok(request)
    } else {
        Err(Status::invalid_argument(MISSING_HEADER))
    }
}

// === streams ===

/// What a caller gets from one snapshot, reduced to what tells two
/// responses apart.
#[derive(Debug, PartialEq)]
enum View<K> {
    /// The caller gets a response; `K` identifies its content.
    Ready(K),
    /// The caller has entries but no SVID yet (or there is no bundle yet).
    Pending,
    /// The caller has no entry.
    Denied,
}

/// One kind of stream: how a snapshot turns into the caller's response.
trait Feed: Send + 'static {
    /// Equal keys mean equal responses.
    type Key: PartialEq + Send;
    /// The message type.
    type Response: Send + 'static;

    /// What the caller gets from `snapshot`, cheaply.
    fn view(&self, snapshot: &Snapshot) -> View<Self::Key>;

    /// The full response, for a snapshot whose view is ready with `key`.
    fn build(&self, snapshot: &Snapshot, key: &Self::Key) -> Self::Response;
}

/// Why a stream stopped waiting.
enum Wake {
    Changed,
    Stopping,
    Expired,
}

/// Runs a stream: the caller's response for the current snapshot at once,
/// then a new one each time it changes, until the caller has no identity
/// left (or has had none for [`PENDING_WAIT`]) or the agent stops.
///
/// The stream owns everything it uses; when the caller goes away tonic
/// drops it, which ends the work.
fn drive<F: Feed>(
    feed: F,
    mut snapshots: SnapshotReceiver,
    mut stopping: watch::Receiver<bool>,
) -> impl Stream<Item = Result<F::Response, Status>> + Send {
    async_stream::stream! {
        let mut last_sent: Option<F::Key> = None;
        let mut pending_until: Option<Instant> = None;
        loop {
            let snapshot = Arc::clone(&snapshots.borrow_and_update());
            match feed.view(&snapshot) {
                View::Ready(key) => {
                    pending_until = None;
                    if last_sent.as_ref() != Some(&key) {
                        yield Ok(feed.build(&snapshot, &key));
                        last_sent = Some(key);
                    }
                }
                View::Pending => {
                    pending_until.get_or_insert_with(|| Instant::now() + PENDING_WAIT);
                }
                View::Denied => {
                    yield Err(Status::permission_denied(NO_IDENTITY));
                    break;
                }
            }
            drop(snapshot);

            let wake = tokio::select! {
                changed = snapshots.changed() => match changed {
                    Ok(()) => Wake::Changed,
                    Err(_) => Wake::Stopping,
                },
                _ = stopping.wait_for(|stopping| *stopping) => Wake::Stopping,
                () = sleep_until(pending_until) => Wake::Expired,
            };
            match wake {
                Wake::Changed => {}
                Wake::Stopping => {
                    yield Err(Status::unavailable(SHUTTING_DOWN));
                    break;
                }
                Wake::Expired => {
                    yield Err(Status::permission_denied(NO_IDENTITY));
                    break;
                }
            }
        }
    }
}

/// Sleeps until `deadline`, or forever if there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The SVIDs a caller gets from a snapshot, in order, with the hint each is
/// sent with (a hint already used by an earlier SVID is sent empty).
/// `matched` tells whether any entry applies to the caller, with or without
/// an SVID.
struct Served<'a> {
    svids: Vec<(&'a Arc<Svid>, &'a str)>,
    matched: bool,
    /// The trust domains the entries of `svids` federate with.
    federates_with: BTreeSet<&'a TrustDomain>,
}

fn served<'a>(snapshot: &'a Snapshot, selectors: &Selectors) -> Served<'a> {
    let mut svids: Vec<(&Arc<Svid>, &str)> = Vec::new();
    let mut matched = false;
    let mut federates_with = BTreeSet::new();
    for identity in &snapshot.identities {
        if !identity.entry.selectors.is_subset_of(selectors) {
            continue;
        }
        matched = true;
        let Some(svid) = identity.svid.as_ref() else {
            continue;
        };
        let hint = identity.entry.hint.as_str();
        let used = !hint.is_empty() && svids.iter().any(|(_, h)| *h == hint);
        svids.push((svid, if used { "" } else { hint }));
        federates_with.extend(&identity.entry.federates_with);
    }
    Served {
        svids,
        matched,
        federates_with,
    }
}

/// The federated bundles a caller gets: those of `served`'s trust domains
/// that the snapshot holds, never the agent's own trust domain and never a
/// zero-length one (WA-23, WA-24), ordered by trust domain.
type Federated = Vec<(TrustDomain, Arc<Vec<u8>>)>;

fn federated(snapshot: &Snapshot, served: &Served<'_>) -> Federated {
    let own = snapshot.bundle.trust_domain();
    served
        .federates_with
        .iter()
        .filter(|td| **td != own)
        .filter_map(|td| {
            let der = snapshot.federated.get(*td)?;
            (!der.is_empty()).then(|| (TrustDomain::clone(td), Arc::clone(der)))
        })
        .collect()
}

/// The Workload API's map of federated bundles: keys in the trust domain's
/// SPIFFE ID form (WA-22).
fn federated_map(federated: &Federated) -> HashMap<String, Vec<u8>> {
    federated
        .iter()
        .map(|(td, der)| (td.id_string(), der.to_vec()))
        .collect()
}

/// What the caller's X.509-SVID response holds: the SVIDs (compared by
/// identity: a rotated SVID is a new `Arc`) with their hints, the bundle and
/// the federated bundles. Equal keys make equal responses.
#[derive(Debug, Clone)]
struct X509SvidKey {
    svids: Vec<(Arc<Svid>, String)>,
    bundle: Arc<Vec<u8>>,
    federated: Federated,
}

impl PartialEq for X509SvidKey {
    fn eq(&self, other: &Self) -> bool {
        self.svids.len() == other.svids.len()
            && self
                .svids
                .iter()
                .zip(&other.svids)
                .all(|((a, ha), (b, hb))| Arc::ptr_eq(a, b) && ha == hb)
            && self.bundle == other.bundle
            && self.federated == other.federated
    }
}

/// The X.509-SVID responses built from the latest snapshot, by what they
/// hold: callers that get the same SVIDs share one response instead of each
/// building it (a parse of every leaf for its SPIFFE ID, and copies of the
/// chains, keys and bundle). Emptied when a response is built from a newer
/// snapshot.
#[derive(Debug, Default)]
struct ResponseCache {
    latest: Mutex<CachedResponses>,
}

#[derive(Debug, Default)]
struct CachedResponses {
    /// The snapshot version the responses were built from.
    version: u64,
    responses: Vec<(X509SvidKey, Arc<X509svidResponse>)>,
}

impl ResponseCache {
    /// The response for `key`, from the snapshot `version`: the one built
    /// before, or `build`'s.
    fn get_or_build(
        &self,
        version: u64,
        key: &X509SvidKey,
        build: impl FnOnce() -> X509svidResponse,
    ) -> X509svidResponse {
        let cached = {
            let latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
            latest
                .responses
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, response)| Arc::clone(response))
        };
        // Copied out of the cache without holding the lock.
        if let Some(response) = cached {
            return X509svidResponse::clone(&response);
        }
        let response = build();
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        if version > latest.version || latest.responses.len() >= MAX_CACHED_RESPONSES {
            latest.version = version;
            latest.responses.clear();
        }
        if version == latest.version {
            latest
                .responses
                .push((key.clone(), Arc::new(response.clone())));
        }
        response
    }
}

/// `FetchX509SVID`.
struct X509SvidFeed {
    selectors: Selectors,
    responses: Arc<ResponseCache>,
}

impl Feed for X509SvidFeed {
    type Key = X509SvidKey;
    type Response = X509svidResponse;

    fn view(&self, snapshot: &Snapshot) -> View<X509SvidKey> {
        let served = served(snapshot, &self.selectors);
        if !served.matched {
            View::Denied
        } else if served.svids.is_empty() || snapshot.bundle_der.is_empty() {
            View::Pending
        } else {
            let federated = federated(snapshot, &served);
            View::Ready(X509SvidKey {
                svids: served
                    .svids
                    .into_iter()
                    .map(|(svid, hint)| (Arc::clone(svid), hint.to_owned()))
                    .collect(),
                bundle: Arc::clone(&snapshot.bundle_der),
                federated,
            })
        }
    }

    fn build(&self, snapshot: &Snapshot, key: &X509SvidKey) -> X509svidResponse {
        self.responses
            .get_or_build(snapshot.version, key, || self.build_new(snapshot))
    }
}

impl X509SvidFeed {
    /// The response for `snapshot`, built anew.
    fn build_new(&self, snapshot: &Snapshot) -> X509svidResponse {
        let served = served(snapshot, &self.selectors);
        let federated_bundles = federated_map(&federated(snapshot, &served));
        let svids = served
            .svids
            .into_iter()
            .map(|(svid, hint)| X509svid {
                spiffe_id: spiffe_id_of(svid),
                x509_svid: svid.chain_der.clone(),
                x509_svid_key: svid.key.der().to_vec(),
                bundle: snapshot.bundle_der.to_vec(),
                hint: hint.to_owned(),
            })
            .collect();
        X509svidResponse {
            svids,
            crl: Vec::new(),
            federated_bundles,
        }
    }
}

/// The SPIFFE ID an SVID carries, from its leaf, so the `spiffe_id` field
/// always agrees with the certificate (WA-26).
fn spiffe_id_of(svid: &Svid) -> String {
    svid.chain
        .first()
        .and_then(|leaf| sigil::x509::spiffe_id_of(leaf).ok())
        .map(|id| id.to_string())
        .unwrap_or_default()
}

/// `FetchX509Bundles`: served to callers that have an identity.
struct X509BundlesFeed {
    selectors: Selectors,
}

impl Feed for X509BundlesFeed {
    /// The agent's bundle and the federated bundles.
    type Key = (Arc<Vec<u8>>, Federated);
    type Response = X509BundlesResponse;

    fn view(&self, snapshot: &Snapshot) -> View<Self::Key> {
        let served = served(snapshot, &self.selectors);
        if !served.matched {
            View::Denied
        } else if served.svids.is_empty() || snapshot.bundle_der.is_empty() {
            View::Pending
        } else {
            View::Ready((
                Arc::clone(&snapshot.bundle_der),
                federated(snapshot, &served),
            ))
        }
    }

    fn build(&self, snapshot: &Snapshot, (own, federated): &Self::Key) -> X509BundlesResponse {
        let mut bundles = federated_map(federated);
        let td = snapshot.bundle.trust_domain().id_string();
        bundles.insert(td, own.to_vec());
        X509BundlesResponse {
            crl: Vec::new(),
            bundles,
        }
    }
}

#[cfg(test)]
mod tests;
