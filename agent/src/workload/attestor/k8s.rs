//! The k8s workload attestor: what the kubelet says about the pod and
//! container a process runs in.
//!
//! The pod UID and container ID come from the process's cgroup (see
//! [`cgroup`]) and are looked up in the kubelet's pod list
//! (`GET https://<node>:10250/pods`, with the agent's service-account token
//! as bearer token). Selectors produced (type `k8s`):
//! - `ns:<namespace>`, `sa:<service account>`, `pod-name:<name>`,
//!   `pod-uid:<uid>`, `node-name:<node>`;
//! - `pod-label:<key>:<value>`: each label of the pod;
//! - `pod-owner:<kind>:<name>`: each owner of the pod (e.g.
//!   `pod-owner:ReplicaSet:web-7c9f8d6b5`);
//! - `container-name:<name>`;
//! - `container-image:<image>`: the image of the container as its status
//!   reports it, and the image ID (the resolved digest) when different.
//!
//! One pod list is shared by every caller, indexed by container ID, so a
//! caller whose container is listed costs a hash lookup. The list is
//! fetched again every `refresh_interval` in the background, and when a
//! caller's pod or container is not in it: at once if the last fetch ended
//! [`UNKNOWN_FETCH_GAP`] ago or more, else once that gap has passed.
//! Callers that find their container missing wait for the same fetch, so
//! however often an unlisted container calls (a crash-looping one, a
//! client retrying at once), the kubelet is asked at most once per gap. A
//! caller still missing after that fetch (a container that has just
//! started and whose status the kubelet has not updated yet) gets
//! [`K8sError::NotListed`], which the Workload API answers with
//! `UNAVAILABLE` so that the client retries; the whole wait is bounded by
//! [`UNKNOWN_WAIT`]. A process in no pod gets no `k8s` selector and costs
//! no fetch.
//!
//! Pod labels may change while a pod runs: selectors reflect them within
//! `refresh_interval`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Deserialize;
use sigil::Selectors;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

pub use super::settings::K8sConfig;
use super::settings::KUBELET_PORT;
use super::{Facts, add, cgroup, http};
use crate::retry::{RepeatedErrors, Report};

/// The selector type this attestor produces.
const SELECTOR_TYPE: &str = "k8s";

/// How long one fetch of the pod list may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a caller whose container is not in the pod list waits for a
/// fresh one before it is answered `UNAVAILABLE`.
pub(crate) const UNKNOWN_WAIT: Duration = Duration::from_secs(5);

/// The shortest time from the end of one fetch of the pod list to a fetch
/// asked for by a caller whose container is not listed.
///
/// The kubelet notices a container that started at its next relist of the
/// runtime's containers, which it does every second; fetching more often
/// than that mostly finds the same list. Half of it adds at most half a
/// second to the wait of a container that has just started (well within
/// [`UNKNOWN_WAIT`], and below the one-second first retry of go-spiffe
/// clients), while a container that is never listed costs the kubelet at
/// most two requests a second instead of one per Workload API request.
pub const UNKNOWN_FETCH_GAP: Duration = Duration::from_millis(500);

/// The largest pod list read (a node with hundreds of pods answers a few
/// MiB).
const MAX_BODY: usize = 64 << 20;

/// Why a caller's pod could not be described.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// The service-account token could not be read.
    #[error("cannot read the token {path}: {source}", path = .path.display())]
    Token {
        /// The token file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The kubelet CA file could not be used.
    #[error("kubelet CA {path}: {message}", path = .path.display())]
    Ca {
        /// The CA file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The kubelet could not be reached.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The kubelet.
        url: KubeletUrl,
        /// The error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("GET {url}/pods: {source}")]
    Http {
        /// The kubelet.
        url: KubeletUrl,
        /// The error.
        source: http::HttpError,
    },
    /// The kubelet did not answer in time.
    #[error("GET {url}/pods: no answer within {REQUEST_TIMEOUT:?}")]
    Timeout {
        /// The kubelet.
        url: KubeletUrl,
    },
    /// The kubelet answered with an error status.
    #[error("GET {url}/pods: HTTP {status}: {message}")]
    Status {
        /// The kubelet.
        url: KubeletUrl,
        /// The status.
        status: u16,
        /// The start of the body.
        message: String,
    },
    /// The answer is not a pod list.
    #[error("GET {url}/pods: not a pod list: {source}")]
    Json {
        /// The kubelet.
        url: KubeletUrl,
        /// The error.
        source: serde_json::Error,
    },
    /// Another caller's fetch of the pod list, which this caller waited
    /// for, failed.
    #[error("fetching the pod list failed: {0}")]
    Shared(Arc<str>),
    /// The container is not in the kubelet's pod list (yet).
    #[error("container {container_id} of pod {pod_uid} is not in the kubelet's pod list")]
    NotListed {
        /// The pod, from the cgroup.
        pod_uid: String,
        /// The container, from the cgroup.
        container_id: String,
    },
}

/// The kubelet's HTTPS endpoint: `https://<host>[:<port>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletUrl {
    /// A DNS name or an IP address (IPv6 without brackets).
    host: String,
    port: u16,
}

impl KubeletUrl {
    /// Parses `https://<host>[:<port>]` (an IPv6 address in brackets, an
    /// optional trailing `/`).
    pub fn parse(url: &str) -> Result<Self, &'static str> {
        let rest = url
            .strip_prefix("https://")
            .ok_or("must start with https://")?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@', ' ']) {
            return Err("must be https://<host>[:<port>] without a path");
        }
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (ip, after) = inner.split_once(']').ok_or("has an unclosed `[`")?;
            if ip.parse::<std::net::Ipv6Addr>().is_err() {
                return Err("has an invalid IPv6 address");
            }
            (ip, after.strip_prefix(':'))
        } else {
            match rest.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err("has no host");
        }
        let port = match port {
            None => KUBELET_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or("has an invalid port")?,
        };
        ServerName::try_from(host.to_owned()).map_err(|_| "has an invalid host")?;
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    /// `host:port`, an IPv6 host in brackets.
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for KubeletUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}", self.authority())
    }
}

// === the kubelet's pod list (the parts used) ===

#[derive(Debug, Deserialize)]
struct PodList {
    #[serde(default)]
    items: Option<Vec<Pod>>,
}

#[derive(Debug, Deserialize)]
struct Pod {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<PodSpec>,
    #[serde(default)]
    status: Option<PodStatus>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    owner_references: Option<Vec<OwnerReference>>,
}

#[derive(Debug, Deserialize)]
struct OwnerReference {
    kind: String,
    name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    service_account_name: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default)]
    container_statuses: Option<Vec<ContainerStatus>>,
    #[serde(default)]
    init_container_statuses: Option<Vec<ContainerStatus>>,
    #[serde(default)]
    ephemeral_container_statuses: Option<Vec<ContainerStatus>>,
}

#[derive(Debug, Deserialize)]
struct ContainerStatus {
    name: String,
    #[serde(rename = "containerID", default)]
    container_id: Option<String>,
    #[serde(default)]
    image: Option<String>,
    #[serde(rename = "imageID", default)]
    image_id: Option<String>,
}

// === the index ===

/// A listed container: its pod and its selector values.
#[derive(Debug)]
struct Listed {
    pod_uid: String,
    values: Arc<[String]>,
}

/// The pod list, by container ID.
#[derive(Debug, Default)]
struct PodIndex {
    containers: HashMap<String, Listed>,
}

impl PodIndex {
    fn build(list: PodList) -> Self {
        let mut containers = HashMap::new();
        for pod in list.items.unwrap_or_default() {
            let meta = &pod.metadata;
            let spec = pod.spec.unwrap_or_default();
            let mut values = vec![
                format!("ns:{}", meta.namespace),
                format!("pod-name:{}", meta.name),
                format!("pod-uid:{}", meta.uid),
            ];
            if let Some(sa) = spec.service_account_name.filter(|s| !s.is_empty()) {
                values.push(format!("sa:{sa}"));
            }
            if let Some(node) = spec.node_name.filter(|s| !s.is_empty()) {
                values.push(format!("node-name:{node}"));
            }
            for (key, value) in meta.labels.iter().flatten() {
                values.push(format!("pod-label:{key}:{value}"));
            }
            for owner in meta.owner_references.iter().flatten() {
                values.push(format!("pod-owner:{}:{}", owner.kind, owner.name));
            }
            let status = pod.status.unwrap_or_default();
            let statuses = [
                status.container_statuses,
                status.init_container_statuses,
                status.ephemeral_container_statuses,
            ];
            for container in statuses.into_iter().flatten().flatten() {
                // `<runtime>://<id>`; empty while the container is created.
                let Some(id) = container
                    .container_id
                    .as_deref()
                    .and_then(|id| id.split_once("://"))
                    .map(|(_, id)| id)
                    .filter(|id| !id.is_empty())
                else {
                    continue;
                };
                let mut own = values.clone();
                own.push(format!("container-name:{}", container.name));
                let image = container.image.filter(|i| !i.is_empty());
                let image_id = container.image_id.filter(|i| !i.is_empty());
                if let Some(image_id) = &image_id
                    && image.as_ref() != Some(image_id)
                {
                    own.push(format!("container-image:{image_id}"));
                }
                if let Some(image) = image {
                    own.push(format!("container-image:{image}"));
                }
                containers.insert(
                    id.to_owned(),
                    Listed {
                        pod_uid: meta.uid.clone(),
                        values: own.into(),
                    },
                );
            }
        }
        Self { containers }
    }

    /// The selector values of container `id` in pod `pod_uid`.
    fn lookup(&self, id: &str, pod_uid: &str) -> Option<&Arc<[String]>> {
        self.containers
            .get(id)
            .filter(|listed| listed.pod_uid == pod_uid)
            .map(|listed| &listed.values)
    }
}

// === the kubelet client ===

/// Fetches the pod list from the kubelet.
#[derive(Debug)]
struct KubeletClient {
    url: KubeletUrl,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    token_path: PathBuf,
}

impl KubeletClient {
    fn new(config: &K8sConfig) -> Result<Self, K8sError> {
        let builder = ClientConfig::builder_with_provider(sigil::tls::provider())
            .with_safe_default_protocol_versions()?;
        let mut tls = match &config.kubelet_ca_path {
            Some(path) => {
                let ca_error = |message: String| K8sError::Ca {
                    path: path.clone(),
                    message,
                };
                let mut roots = RootCertStore::empty();
                let certs =
                    CertificateDer::pem_file_iter(path).map_err(|e| ca_error(e.to_string()))?;
                for cert in certs {
                    let cert = cert.map_err(|e| ca_error(e.to_string()))?;
                    roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(ca_error("holds no certificate".to_owned()));
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServerCert::new()))
                .with_no_client_auth(),
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = ServerName::try_from(config.kubelet_url.host.clone()).map_err(|_| {
            K8sError::Tls(rustls::Error::General(format!(
                "invalid server name {}",
                config.kubelet_url.host
            )))
        })?;
        Ok(Self {
            url: config.kubelet_url.clone(),
            server_name,
            tls: Arc::new(tls),
            token_path: config.token_path.clone(),
        })
    }

    /// Fetches and indexes the pod list.
    async fn fetch(&self) -> Result<PodIndex, K8sError> {
        // Read at each fetch: projected tokens are rotated by the kubelet.
        let token = std::fs::read_to_string(&self.token_path)
            .map(Zeroizing::new)
            .map_err(|source| K8sError::Token {
                path: self.token_path.clone(),
                source,
            })?;
        let authorization = Zeroizing::new(format!("Bearer {}", token.trim()));
        let url = &self.url;
        let connect_error = |source| K8sError::Connect {
            url: url.clone(),
            source,
        };
        let exchange = async {
            let tcp = TcpStream::connect((url.host.as_str(), url.port))
                .await
                .map_err(connect_error)?;
            let tls = TlsConnector::from(Arc::clone(&self.tls))
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(connect_error)?;
            http::get(
                tls,
                &url.authority(),
                "/pods",
                Some(&authorization),
                MAX_BODY,
            )
            .await
            .map_err(|source| K8sError::Http {
                url: url.clone(),
                source,
            })
        };
        let response = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| K8sError::Timeout { url: url.clone() })??;
        if response.status != hyper::StatusCode::OK {
            let body = String::from_utf8_lossy(&response.body);
            return Err(K8sError::Status {
                url: url.clone(),
                status: response.status.as_u16(),
                message: body.trim().chars().take(200).collect(),
            });
        }
        let list: PodList =
            serde_json::from_slice(&response.body).map_err(|source| K8sError::Json {
                url: url.clone(),
                source,
            })?;
        Ok(PodIndex::build(list))
    }
}

/// Accepts any kubelet certificate (`skip_kubelet_verification`), while
/// still checking that the kubelet holds its key.
#[derive(Debug)]
struct AnyServerCert {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl AnyServerCert {
    fn new() -> Self {
        Self {
            algorithms: sigil::tls::provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// === the attestor ===

/// What the attestor and its background refresh share.
#[derive(Debug)]
struct Shared {
    client: KubeletClient,
    index: ArcSwap<PodIndex>,
    /// Fetches completed so far (successful or not). A caller that saw
    /// `n` and finds its container missing needs a fetch completed after
    /// it looked; one in flight then is shared.
    completed: watch::Sender<u64>,
    /// Held while fetching, and while a caller waits for
    /// [`UNKNOWN_FETCH_GAP`] to pass before it fetches.
    fetching: tokio::sync::Mutex<LastFetch>,
}

/// The last attempt to fetch the pod list.
#[derive(Debug)]
struct LastFetch {
    /// Its outcome.
    outcome: Result<(), Arc<str>>,
    /// When it ended; `None` before the first.
    ended: Option<Instant>,
}

impl Shared {
    /// Fetches the pod list unless a fetch completed since the caller saw
    /// `seen` completed (`None`: fetch at once in any case); the outcome of
    /// that fetch. A caller that saw `seen` fetches only once
    /// [`UNKNOWN_FETCH_GAP`] has passed since the last fetch ended; callers
    /// arriving meanwhile wait for that fetch.
    async fn refresh(&self, seen: Option<u64>) -> Result<(), K8sError> {
        let mut last = self.fetching.lock().await;
        if let Some(seen) = seen {
            if *self.completed.borrow() != seen {
                return last.outcome.clone().map_err(K8sError::Shared);
            }
            if let Some(ended) = last.ended {
                tokio::time::sleep_until(ended + UNKNOWN_FETCH_GAP).await;
            }
        }
        let result = self.client.fetch().await;
        let outcome = match result {
            Ok(index) => {
                tracing::debug!(
                    containers = index.containers.len(),
                    "kubelet pod list fetched"
                );
                self.index.store(Arc::new(index));
                Ok(())
            }
            Err(e) => Err(e),
        };
        *last = LastFetch {
            outcome: outcome
                .as_ref()
                .map(|_| ())
                .map_err(|e| Arc::from(e.to_string())),
            ended: Some(Instant::now()),
        };
        self.completed.send_modify(|n| *n += 1);
        outcome
    }
}

/// Attests pods and containers from the kubelet's pod list.
#[derive(Debug)]
pub struct K8sAttestor {
    shared: Arc<Shared>,
    refresher: AbortHandle,
}

impl K8sAttestor {
    /// An attestor for the kubelet `config` names; starts the background
    /// refresh (the first fetch at once) on the current tokio runtime.
    pub fn new(config: &K8sConfig) -> Result<Self, K8sError> {
        let shared = Arc::new(Shared {
            client: KubeletClient::new(config)?,
            index: ArcSwap::from_pointee(PodIndex::default()),
            completed: watch::channel(0).0,
            fetching: tokio::sync::Mutex::new(LastFetch {
                outcome: Ok(()),
                ended: None,
            }),
        });
        let interval = config.refresh_interval;
        let background = Arc::clone(&shared);
        let refresher = tokio::spawn(async move {
            let mut repeated = RepeatedErrors::default();
            loop {
                match background.refresh(None).await {
                    Ok(()) => repeated.reset(),
                    Err(e) => match repeated.observe(&e.to_string()) {
                        Report::Warn => {
                            tracing::warn!(error = %e, retry_in = ?interval, "cannot fetch the kubelet's pod list");
                        }
                        Report::Quiet(n) => {
                            tracing::debug!(error = %e, retry_in = ?interval, repeated = n, "cannot fetch the kubelet's pod list");
                        }
                    },
                }
                tokio::time::sleep(interval).await;
            }
        })
        .abort_handle();
        Ok(Self { shared, refresher })
    }

    /// Adds the selectors of the process `facts` describe.
    pub async fn collect(&self, facts: &Facts, selectors: &mut Selectors) -> Result<(), K8sError> {
        let Some(container) = cgroup::container(&facts.cgroup) else {
            return Ok(());
        };
        let Some(pod_uid) = container.pod_uid else {
            return Ok(());
        };
        let seen = *self.shared.completed.borrow();
        let values = match self.lookup(&container.id, &pod_uid) {
            Some(values) => values,
            None => {
                tokio::time::timeout(UNKNOWN_WAIT, self.shared.refresh(Some(seen)))
                    .await
                    .unwrap_or(Ok(()))?;
                self.lookup(&container.id, &pod_uid)
                    .ok_or(K8sError::NotListed {
                        pod_uid,
                        container_id: container.id,
                    })?
            }
        };
        for value in values.iter() {
            add(selectors, facts.pid, SELECTOR_TYPE, value);
        }
        Ok(())
    }

    fn lookup(&self, id: &str, pod_uid: &str) -> Option<Arc<[String]>> {
        self.shared.index.load().lookup(id, pod_uid).cloned()
    }
}

impl Drop for K8sAttestor {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// The kubelet cannot run on the machines these tests run on: they answer
/// the production client from a local HTTPS server (rustls, with a
/// certificate made in the test) serving a pod list recorded from the
/// kubelet's `/pods` (`fixtures/kubelet_pods.json`).
#[cfg(test)]
pub(crate) mod tests;
