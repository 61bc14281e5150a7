//! Workload API tests over a real Unix socket, with SVIDs from a real CA.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use sigil::bundle::X509Bundle;
use sigil::keys::PrivateKey;
use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil::proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, WitBundlesRequest, WitsvidRequest,
    X509BundlesRequest, X509svidRequest, X509svidResponse,
};
use sigil::x509::Authority;
use sigil::{Entry, Selector, Selectors, SpiffeId, TrustDomain};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::{Code, Status, Streaming};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use super::api::{JWT_UNSUPPORTED, MISSING_HEADER, NO_IDENTITY, SHUTTING_DOWN, WIT_UNSUPPORTED};
use super::client::{self, Client};
use crate::cache::{Identity, Snapshot, SnapshotSender, Svid};

// === fixtures ===

/// A trust domain's CA that signs real SVIDs for test snapshots.
pub(crate) struct Ca {
    pub(crate) authority: Authority,
    td: TrustDomain,
}

impl Ca {
    pub(crate) fn new() -> Self {
        let td = TrustDomain::new("example.org").unwrap();
        let authority = Authority::self_signed(&td, Duration::from_secs(24 * 3600)).unwrap();
        Self { authority, td }
    }

    fn id(&self, path: &str) -> SpiffeId {
        self.td.id_with_path(path).unwrap()
    }

    pub(crate) fn entry(&self, path: &str, selectors: &Selectors, hint: &str) -> Entry {
        Entry {
            id: format!("entry{}", path.replace('/', "-")),
            spiffe_id: self.id(path),
            parent_id: self.id("/sigil/agent/join_token/test"),
            selectors: selectors.clone(),
            x509_svid_ttl: None,
            dns_names: Vec::new(),
            hint: hint.to_owned(),
            revision: 1,
            created_at: 0,
            jwt_svid_ttl: None,
            federates_with: Vec::new(),
            admin: false,
            downstream: false,
            expires_at: None,
        }
    }

    pub(crate) fn svid(&self, path: &str) -> Arc<Svid> {
        let key = PrivateKey::generate_p256().unwrap();
        let issued = self
            .authority
            .sign_leaf(
                &key.key_pair().unwrap(),
                &self.id(path),
                &[],
                Duration::from_secs(3600),
            )
            .unwrap();
        Arc::new(Svid {
            chain_der: sigil::bundle::concatenate(&issued.chain),
            chain: issued.chain,
            key,
            not_before: SystemTime::now(),
            not_after: issued.not_after,
        })
    }

    pub(crate) fn identity(&self, path: &str, selectors: &Selectors, hint: &str) -> Arc<Identity> {
        Arc::new(Identity {
            entry: self.entry(path, selectors, hint),
            svid: Some(self.svid(path)),
        })
    }

    pub(crate) fn pending_identity(&self, path: &str, selectors: &Selectors) -> Arc<Identity> {
        Arc::new(Identity {
            entry: self.entry(path, selectors, ""),
            svid: None,
        })
    }

    /// The same entry with a freshly signed SVID.
    pub(crate) fn rotated(&self, identity: &Identity) -> Arc<Identity> {
        Arc::new(Identity {
            entry: identity.entry.clone(),
            svid: Some(self.svid(identity.entry.spiffe_id.path())),
        })
    }

    pub(crate) fn snapshot(&self, identities: Vec<Arc<Identity>>, version: u64) -> Arc<Snapshot> {
        snapshot_with_bundle(self.authority.cert().clone(), &self.td, identities, version)
    }
}

fn snapshot_with_bundle(
    ca_cert: CertificateDer<'static>,
    td: &TrustDomain,
    identities: Vec<Arc<Identity>>,
    version: u64,
) -> Arc<Snapshot> {
    let bundle = X509Bundle::new(td.clone(), vec![ca_cert]);
    Arc::new(Snapshot {
        bundle_der: Arc::new(bundle.to_concatenated_der()),
        bundle: Arc::new(bundle),
        identities,
        version,
    })
}

pub(crate) fn uid_selectors(uid: u32) -> Selectors {
    [Selector::new("unix", &format!("uid:{uid}")).unwrap()]
        .into_iter()
        .collect()
}

/// `unix:uid:<the test process's uid>`.
pub(crate) fn own_selectors() -> Selectors {
    uid_selectors(nix::unistd::Uid::current().as_raw())
}

/// A uid no test runs as.
const OTHER_UID: u32 = u32::MAX - 7;

/// A Workload API server on a socket in a temporary directory.
pub(crate) struct Server {
    pub(crate) socket: PathBuf,
    pub(crate) snapshots: SnapshotSender,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

/// Starts a server that serves `snapshot` until the returned value is
/// dropped or stopped. The socket accepts connections when this returns.
pub(crate) async fn start(snapshot: Arc<Snapshot>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run").join("api.sock");
    let listener = super::bind(&socket).unwrap();
    let (snapshots, rx) = watch::channel(snapshot);
    let (stop, stopped) = oneshot::channel::<()>();
    let path = socket.clone();
    let task = tokio::spawn(async move {
        super::serve_on(listener, &path, rx, Arc::default(), async move {
            let _ = stopped.await;
        })
        .await
    });
    Server {
        socket,
        snapshots,
        stop: Some(stop),
        task: Some(task),
        _dir: dir,
    }
}

impl Server {
    async fn client(&self) -> Client {
        client::connect(&self.socket).await.unwrap()
    }

    fn publish(&self, snapshot: Arc<Snapshot>) {
        self.snapshots.send_replace(snapshot);
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }
}

async fn open_x509(client: &mut Client) -> Streaming<X509svidResponse> {
    client
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn next_x509(stream: &mut Streaming<X509svidResponse>) -> X509svidResponse {
    stream.message().await.unwrap().unwrap()
}

/// The status a stream ends with: either at the call or at the first
/// message, depending on when the server refused.
async fn x509_refusal(client: &mut Client) -> Status {
    match client.fetch_x509svid(X509svidRequest {}).await {
        Err(status) => status,
        Ok(response) => response.into_inner().message().await.unwrap_err(),
    }
}

fn assert_status(status: &Status, code: Code, message: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(status.message(), message, "{status:?}");
}

fn serial_of(der: &[u8]) -> Vec<u8> {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.raw_serial().to_vec()
}

fn leaf_public_key(der: &[u8]) -> Vec<u8> {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.public_key().subject_public_key.data.to_vec()
}

// === the security header ===

#[tokio::test]
async fn calls_without_the_security_header_are_invalid() {
    let ca = Ca::new();
    let server = start(ca.snapshot(vec![ca.identity("/web", &own_selectors(), "")], 1)).await;
    let mut bare = SpiffeWorkloadApiClient::new(
        sigil::transport::unix_channel(&server.socket)
            .await
            .unwrap(),
    );

    let status = bare.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, MISSING_HEADER);
    let status = bare
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, MISSING_HEADER);
    let status = bare
        .fetch_jwtsvid(JwtsvidRequest::default())
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, MISSING_HEADER);

    let mut request = tonic::Request::new(X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "false".parse().unwrap());
    let status = bare.fetch_x509svid(request).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, MISSING_HEADER);
}

// === FetchX509SVID ===

#[tokio::test]
async fn the_first_message_holds_the_callers_svid_key_and_bundle() {
    let ca = Ca::new();
    let identity = ca.identity("/web", &own_selectors(), "internal");
    let svid = Arc::clone(identity.svid.as_ref().unwrap());
    let server = start(ca.snapshot(vec![identity], 1)).await;
    let mut client = server.client().await;

    let response = next_x509(&mut open_x509(&mut client).await).await;
    assert_eq!(response.svids.len(), 1);
    assert!(response.crl.is_empty());
    assert!(response.federated_bundles.is_empty());
    let got = &response.svids[0];
    assert_eq!(got.spiffe_id, "spiffe://example.org/web");
    assert_eq!(got.hint, "internal");
    assert_eq!(
        sigil::x509::check_leaf(&got.x509_svid).unwrap().to_string(),
        "spiffe://example.org/web"
    );
    assert_eq!(got.x509_svid, svid.chain_der);
    assert_eq!(got.bundle, ca.authority.cert().to_vec());
    sigil::x509::check_ca(&got.bundle).unwrap();

    let key = PrivateKey::from_pkcs8_der(got.x509_svid_key.clone()).unwrap();
    assert_eq!(
        key.key_pair().unwrap().public_key_raw(),
        leaf_public_key(&got.x509_svid).as_slice(),
        "the key is the leaf's"
    );
}

#[tokio::test]
async fn only_matching_entries_are_served_in_snapshot_order() {
    let ca = Ca::new();
    let mine = own_selectors();
    let mut mine_and_more = mine.clone();
    mine_and_more.insert(Selector::new("unix", "gid:4000000000").unwrap());
    let server = start(ca.snapshot(
        vec![
            ca.identity("/other", &uid_selectors(OTHER_UID), ""),
            ca.identity("/first", &mine, ""),
            ca.identity("/needs-more", &mine_and_more, ""),
            ca.identity("/second", &mine, ""),
        ],
        1,
    ))
    .await;
    let mut client = server.client().await;

    let response = next_x509(&mut open_x509(&mut client).await).await;
    let ids: Vec<&str> = response
        .svids
        .iter()
        .map(|s| s.spiffe_id.as_str())
        .collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/first", "spiffe://example.org/second"]
    );
}

#[tokio::test]
async fn a_rotated_svid_is_pushed_on_the_open_stream() {
    let ca = Ca::new();
    let identity = ca.identity("/web", &own_selectors(), "");
    let server = start(ca.snapshot(vec![Arc::clone(&identity)], 1)).await;
    let mut client = server.client().await;
    let mut stream = open_x509(&mut client).await;
    let first = next_x509(&mut stream).await;

    // A new snapshot that changes nothing for this caller sends nothing...
    let unrelated = ca.identity("/other", &uid_selectors(OTHER_UID), "");
    server.publish(ca.snapshot(vec![Arc::clone(&identity), Arc::clone(&unrelated)], 2));
    // ...so the next message is the rotation.
    let rotated = ca.rotated(&identity);
    let new_serial = serial_of(&rotated.svid.as_ref().unwrap().chain_der);
    server.publish(ca.snapshot(vec![rotated, unrelated], 3));

    let second = next_x509(&mut stream).await;
    assert_eq!(second.svids.len(), 1);
    assert_eq!(second.svids[0].spiffe_id, "spiffe://example.org/web");
    assert_eq!(serial_of(&second.svids[0].x509_svid), new_serial);
    assert_ne!(
        serial_of(&first.svids[0].x509_svid),
        new_serial,
        "a new certificate"
    );
    assert_ne!(first.svids[0].x509_svid_key, second.svids[0].x509_svid_key);
}

#[tokio::test]
async fn a_caller_matching_no_entry_gets_no_identity() {
    let ca = Ca::new();
    let server =
        start(ca.snapshot(vec![ca.identity("/web", &uid_selectors(OTHER_UID), "")], 1)).await;
    let mut client = server.client().await;
    assert_status(
        &x509_refusal(&mut client).await,
        Code::PermissionDenied,
        NO_IDENTITY,
    );
}

#[tokio::test]
async fn an_open_stream_ends_with_permission_denied_when_the_identity_goes() {
    let ca = Ca::new();
    let server = start(ca.snapshot(vec![ca.identity("/web", &own_selectors(), "")], 1)).await;
    let mut client = server.client().await;
    let mut stream = open_x509(&mut client).await;
    next_x509(&mut stream).await;

    server.publish(ca.snapshot(vec![ca.identity("/web", &uid_selectors(OTHER_UID), "")], 2));
    let status = stream.message().await.unwrap_err();
    assert_status(&status, Code::PermissionDenied, NO_IDENTITY);
}

#[tokio::test]
async fn a_caller_waits_for_an_svid_not_signed_yet() {
    let ca = Ca::new();
    let pending = ca.pending_identity("/web", &own_selectors());
    let server = start(ca.snapshot(vec![Arc::clone(&pending)], 1)).await;
    let mut client = server.client().await;
    let mut stream = open_x509(&mut client).await;

    server.publish(ca.snapshot(vec![ca.rotated(&pending)], 2));
    let response = next_x509(&mut stream).await;
    assert_eq!(response.svids[0].spiffe_id, "spiffe://example.org/web");
}

#[tokio::test]
async fn streams_end_with_unavailable_when_the_snapshot_sender_goes() {
    let ca = Ca::new();
    let mut server = start(ca.snapshot(vec![ca.identity("/web", &own_selectors(), "")], 1)).await;
    let mut client = server.client().await;
    let mut stream = open_x509(&mut client).await;
    next_x509(&mut stream).await;

    let (replacement, _) = watch::channel(ca.snapshot(vec![], 0));
    drop(std::mem::replace(&mut server.snapshots, replacement));
    let status = stream.message().await.unwrap_err();
    assert_status(&status, Code::Unavailable, SHUTTING_DOWN);
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_removes_the_socket() {
    let ca = Ca::new();
    let server = start(ca.snapshot(vec![ca.identity("/web", &own_selectors(), "")], 1)).await;
    let socket = server.socket.clone();
    let mut client = server.client().await;
    let mut stream = open_x509(&mut client).await;
    next_x509(&mut stream).await;

    let (stopped, status) = tokio::join!(server.stop(), stream.message());
    stopped.unwrap();
    assert_status(&status.unwrap_err(), Code::Unavailable, SHUTTING_DOWN);
    assert!(!socket.exists());
}

#[tokio::test]
async fn a_cancelled_stream_releases_its_resources() {
    let ca = Ca::new();
    let server = start(ca.snapshot(vec![ca.identity("/web", &own_selectors(), "")], 1)).await;
    let idle = server.snapshots.receiver_count();
    let mut client = server.client().await;
    let mut stream = open_x509(&mut client).await;
    next_x509(&mut stream).await;
    assert_eq!(server.snapshots.receiver_count(), idle + 1);

    drop(stream);
    // The server learns of the cancellation asynchronously (RST_STREAM);
    // there is nothing to wait on but the count itself.
    tokio::time::timeout(Duration::from_secs(5), async {
        while server.snapshots.receiver_count() > idle {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the stream's receiver was dropped");
}

// === FetchX509Bundles ===

#[tokio::test]
async fn bundles_are_keyed_by_trust_domain_id_and_pushed_on_change() {
    let ca = Ca::new();
    let identity = ca.identity("/web", &own_selectors(), "");
    let server = start(ca.snapshot(vec![Arc::clone(&identity)], 1)).await;
    let mut client = server.client().await;
    let mut stream = client
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();

    let first = stream.message().await.unwrap().unwrap();
    assert!(first.crl.is_empty());
    assert_eq!(first.bundles.len(), 1);
    assert_eq!(
        first.bundles.get("spiffe://example.org"),
        Some(&ca.authority.cert().to_vec())
    );

    // An SVID rotation does not change the bundle: nothing is sent...
    server.publish(ca.snapshot(vec![ca.rotated(&identity)], 2));
    // ...a new CA certificate is.
    let td = TrustDomain::new("example.org").unwrap();
    let next_ca = Authority::self_signed(&td, Duration::from_secs(3600)).unwrap();
    let mut two = X509Bundle::new(td.clone(), vec![ca.authority.cert().clone()]);
    two = X509Bundle::new(
        td.clone(),
        [two.authorities(), &[next_ca.cert().clone()]].concat(),
    );
    server.publish(Arc::new(Snapshot {
        bundle_der: Arc::new(two.to_concatenated_der()),
        bundle: Arc::new(two.clone()),
        identities: vec![identity],
        version: 3,
    }));

    let second = stream.message().await.unwrap().unwrap();
    assert_eq!(
        second.bundles.get("spiffe://example.org"),
        Some(&two.to_concatenated_der())
    );
}

#[tokio::test]
async fn bundles_are_denied_to_callers_without_identity() {
    let ca = Ca::new();
    let server =
        start(ca.snapshot(vec![ca.identity("/web", &uid_selectors(OTHER_UID), "")], 1)).await;
    let mut client = server.client().await;
    let status = match client.fetch_x509_bundles(X509BundlesRequest {}).await {
        Err(status) => status,
        Ok(response) => response.into_inner().message().await.unwrap_err(),
    };
    assert_status(&status, Code::PermissionDenied, NO_IDENTITY);
}

// === JWT and WIT ===

#[tokio::test]
async fn jwt_and_wit_rpcs_are_unimplemented() {
    let ca = Ca::new();
    let server = start(ca.snapshot(vec![ca.identity("/web", &own_selectors(), "")], 1)).await;
    let mut client = server.client().await;

    let status = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::Unimplemented, JWT_UNSUPPORTED);
    let status = client
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .unwrap_err();
    assert_status(&status, Code::Unimplemented, JWT_UNSUPPORTED);
    let status = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "db".into(),
            svid: "a.b.c".into(),
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::Unimplemented, JWT_UNSUPPORTED);
    let status = client
        .fetch_witsvid(WitsvidRequest::default())
        .await
        .unwrap_err();
    assert_status(&status, Code::Unimplemented, WIT_UNSUPPORTED);
    let status = client
        .fetch_wit_bundles(WitBundlesRequest {})
        .await
        .unwrap_err();
    assert_status(&status, Code::Unimplemented, WIT_UNSUPPORTED);
}

// === the socket ===

#[tokio::test]
async fn the_socket_is_open_to_all_and_replaces_a_stale_one() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a").join("b").join("api.sock");
    let listener = super::bind(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o777);
    assert!(path.parent().unwrap().is_dir());

    // A live socket is not taken over.
    let err = super::bind(&path).unwrap_err();
    assert!(matches!(err, super::BindError::InUse { .. }), "{err}");
    // A stale one (nobody listening) is replaced.
    drop(listener);
    assert!(path.exists());
    super::bind(&path).unwrap();

    // Something else at the path is left alone.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"data").unwrap();
    let err = super::bind(&file).unwrap_err();
    assert!(matches!(err, super::BindError::NotASocket { .. }), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
}

#[tokio::test]
async fn serve_listens_on_the_path_and_stops_on_shutdown() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let (_tx, rx) = watch::channel(ca.snapshot(vec![ca.identity("/web", &own_selectors(), "")], 1));
    let (stop, stopped) = oneshot::channel::<()>();
    // Once bound, the socket accepts connections, even before serving starts.
    let listener = super::bind(&path).unwrap();
    let task = {
        let path = path.clone();
        tokio::spawn(async move {
            super::serve_on(listener, &path, rx, Arc::default(), async move {
                let _ = stopped.await;
            })
            .await
        })
    };
    let mut client = client::connect(&path).await.unwrap();
    let response = next_x509(&mut open_x509(&mut client).await).await;
    assert_eq!(response.svids[0].spiffe_id, "spiffe://example.org/web");

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert!(!path.exists());
}

// === clients that send the socket path as authority ===

/// Frames an HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// gRPC C-core (grpcio, so py-spiffe) sends the percent-encoded socket
/// path as `:authority` over a Unix socket, which is no valid URI
/// authority; such a call must still be served.
#[tokio::test]
async fn a_call_with_the_socket_path_as_authority_is_served() {
    use prost::Message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let ca = Ca::new();
    let server = start(ca.snapshot(vec![ca.identity("/web", &own_selectors(), "")], 1)).await;
    let mut conn = tokio::net::UnixStream::connect(&server.socket)
        .await
        .unwrap();

    // The header block as grpcio 1.85 writes it: HPACK literals with
    // incremental indexing and plain strings, after `:method: POST` and
    // `:scheme: http` from the static table.
    let mut block = vec![0x83, 0x86];
    for (name, value) in [
        (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
        (":authority", "tmp%2Fagent.sock"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("workload.spiffe.io", "true"),
    ] {
        block.push(0x40);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    let request = [
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        h2_frame(0x4, 0, 0, &[]),
        h2_frame(0x1, 0x4, 1, &block),
        // An empty X509SVIDRequest: not compressed, length 0.
        h2_frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]),
    ]
    .concat();
    conn.write_all(&request).await.unwrap();

    let message = loop {
        let mut header = [0u8; 9];
        conn.read_exact(&mut header).await.unwrap();
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).await.unwrap();
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
        match header[3] {
            0x3 => panic!("stream {stream} was reset: {payload:?}"),
            0x7 => panic!("the connection was closed: {payload:?}"),
            0x4 if header[4] & 0x1 == 0 => {
                conn.write_all(&h2_frame(0x4, 0x1, 0, &[])).await.unwrap();
            }
            0x0 if stream == 1 => break payload,
            _ => {}
        }
    };
    assert_eq!(message[0], 0, "not compressed");
    let response = X509svidResponse::decode(&message[5..]).unwrap();
    assert_eq!(response.svids[0].spiffe_id, "spiffe://example.org/web");
}

// === the Rust `spiffe` crate as a client ===

#[tokio::test]
async fn the_spiffe_crate_fetches_the_x509_context() {
    let ca = Ca::new();
    let server = start(ca.snapshot(
        vec![
            ca.identity("/web", &own_selectors(), "internal"),
            ca.identity("/db", &own_selectors(), "db"),
        ],
        1,
    ))
    .await;
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix:{}", server.socket.display()))
        .await
        .unwrap();

    let context = client.fetch_x509_context().await.unwrap();
    let default = context.default_svid().unwrap();
    assert_eq!(default.spiffe_id().to_string(), "spiffe://example.org/web");
    assert_eq!(default.hint(), Some("internal"));
    assert_eq!(context.svids().len(), 2);
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let bundle = context.bundle_set().get(&td).unwrap();
    assert_eq!(
        bundle.authorities()[0].as_ref(),
        ca.authority.cert().as_ref()
    );

    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(bundles.get(&td).is_some());
}

#[tokio::test]
async fn the_spiffe_crate_recognizes_no_identity() {
    let ca = Ca::new();
    let server =
        start(ca.snapshot(vec![ca.identity("/web", &uid_selectors(OTHER_UID), "")], 1)).await;
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix:{}", server.socket.display()))
        .await
        .unwrap();
    let err = client.fetch_x509_svid().await.unwrap_err();
    assert!(
        matches!(err, spiffe::WorkloadApiError::NoIdentityIssued),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_x509_source_follows_rotation() {
    let ca = Ca::new();
    let identity = ca.identity("/web", &own_selectors(), "");
    let server = start(ca.snapshot(vec![Arc::clone(&identity)], 1)).await;
    let source = spiffe::X509Source::builder()
        .endpoint(format!("unix:{}", server.socket.display()))
        .build()
        .await
        .unwrap();
    let first = source.svid().unwrap();
    assert_eq!(first.spiffe_id().to_string(), "spiffe://example.org/web");

    let mut updates = source.updated();
    let rotated = ca.rotated(&identity);
    let new_chain = rotated.svid.as_ref().unwrap().chain_der.clone();
    server.publish(ca.snapshot(vec![rotated], 2));
    tokio::time::timeout(Duration::from_secs(10), updates.changed())
        .await
        .unwrap()
        .unwrap();
    let second = source.svid().unwrap();
    assert_eq!(second.leaf().as_ref(), new_chain.as_slice());
}
