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
// The socket tests in `socket` name these through this module.
use super::{BindError, bind, serve_on};
use crate::cache::{Identity, Snapshot, SnapshotSender, Svid};

mod bundles;
mod protocol;
mod socket;
mod spiffe_crate;
mod x509;

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
        federated: Arc::default(),
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
