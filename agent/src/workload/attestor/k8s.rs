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
//! fetched again every `refresh_interval` in the background, and at once
//! when a caller's pod or container is not in it; callers that find their
//! container missing at the same time wait for the same fetch. A caller
//! still missing after that fetch (a container that has just started and
//! whose status the kubelet has not updated yet) gets
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
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

use super::settings::{K8sConfig, KUBELET_PORT};
use super::{Facts, add, cgroup, http};
use crate::retry::{RepeatedErrors, Report};

/// The selector type this attestor produces.
const SELECTOR_TYPE: &str = "k8s";

/// How long one fetch of the pod list may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a caller whose container is not in the pod list waits for a
/// fresh one before it is answered `UNAVAILABLE`.
pub(crate) const UNKNOWN_WAIT: Duration = Duration::from_secs(5);

/// The largest pod list read (a node with hundreds of pods answers a few
/// MiB).
const MAX_BODY: usize = 64 << 20;

/// Why a caller's pod could not be described.
#[derive(Debug, thiserror::Error)]
pub(crate) enum K8sError {
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
pub(crate) struct KubeletUrl {
    /// A DNS name or an IP address (IPv6 without brackets).
    host: String,
    port: u16,
}

impl KubeletUrl {
    /// Parses `https://<host>[:<port>]` (an IPv6 address in brackets, an
    /// optional trailing `/`).
    pub(crate) fn parse(url: &str) -> Result<Self, &'static str> {
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
    /// Held while fetching; holds the outcome of the last attempt.
    fetching: tokio::sync::Mutex<Result<(), Arc<str>>>,
}

impl Shared {
    /// Fetches the pod list unless a fetch completed since the caller saw
    /// `seen` completed (`None`: fetch in any case); the outcome of that
    /// fetch.
    async fn refresh(&self, seen: Option<u64>) -> Result<(), K8sError> {
        let mut last = self.fetching.lock().await;
        if let Some(seen) = seen
            && *self.completed.borrow() != seen
        {
            return last.clone().map_err(K8sError::Shared);
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
        *last = outcome
            .as_ref()
            .map(|_| ())
            .map_err(|e| Arc::from(e.to_string()));
        self.completed.send_modify(|n| *n += 1);
        outcome
    }
}

/// Attests pods and containers from the kubelet's pod list.
#[derive(Debug)]
pub(crate) struct K8sAttestor {
    shared: Arc<Shared>,
    refresher: AbortHandle,
}

impl K8sAttestor {
    /// An attestor for the kubelet `config` names; starts the background
    /// refresh (the first fetch at once) on the current tokio runtime.
    pub(crate) fn new(config: &K8sConfig) -> Result<Self, K8sError> {
        let shared = Arc::new(Shared {
            client: KubeletClient::new(config)?,
            index: ArcSwap::from_pointee(PodIndex::default()),
            completed: watch::channel(0).0,
            fetching: tokio::sync::Mutex::new(Ok(())),
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
    pub(crate) async fn collect(
        &self,
        facts: &Facts,
        selectors: &mut Selectors,
    ) -> Result<(), K8sError> {
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
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const PODS: &str = include_str!("fixtures/kubelet_pods.json");
    const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.sa-token.sig";
    const WEB: &str = "3f4b2c1d9e8a7f6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b";
    const ENVOY: &str = "b1a2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    const WEB_POD: &str = "7d2a6c3e-91b4-4f0a-8e5d-2b1c9a8f7e6d";
    const BATCH_POD: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    const REPORT: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";

    /// A kubelet stand-in: answers `GET /pods` with `body` to callers with
    /// the right bearer token, 401 to others, and counts requests.
    struct Kubelet {
        url: KubeletUrl,
        ca: PathBuf,
        token: PathBuf,
        body: Arc<Mutex<String>>,
        requests: watch::Receiver<usize>,
        _dir: tempfile::TempDir,
    }

    impl Kubelet {
        async fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let certified =
                rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
            let ca = dir.path().join("kubelet-ca.pem");
            std::fs::write(&ca, certified.cert.pem()).unwrap();
            let token = dir.path().join("token");
            std::fs::write(&token, format!("{TOKEN}\n")).unwrap();

            let key =
                rustls_pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der())
                    .unwrap();
            let config = rustls::ServerConfig::builder_with_provider(sigil::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![certified.cert.der().clone()], key)
                .unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let body = Arc::new(Mutex::new(PODS.to_owned()));
            let (count_tx, requests) = watch::channel(0);
            let served = Arc::clone(&body);
            tokio::spawn(async move {
                loop {
                    let (tcp, _) = listener.accept().await.unwrap();
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        continue;
                    };
                    let head = read_head(&mut tls).await;
                    count_tx.send_modify(|n| *n += 1);
                    let authorized = head.to_ascii_lowercase().contains(&format!(
                        "\r\nauthorization: bearer {}\r\n",
                        TOKEN.to_ascii_lowercase()
                    ));
                    let (status, body) = if !head.starts_with("GET /pods HTTP/1.1\r\n") {
                        ("404 Not Found", "404 page not found\n".to_owned())
                    } else if authorized {
                        ("200 OK", served.lock().unwrap().clone())
                    } else {
                        ("401 Unauthorized", "Unauthorized".to_owned())
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n\
                         Date: Fri, 20 Nov 2026 09:21:00 GMT\r\n\
                         Content-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            });
            Self {
                url: KubeletUrl::parse(&format!("https://127.0.0.1:{port}")).unwrap(),
                ca,
                token,
                body,
                requests,
                _dir: dir,
            }
        }

        fn config(&self) -> K8sConfig {
            K8sConfig {
                kubelet_url: self.url.clone(),
                token_path: self.token.clone(),
                kubelet_ca_path: Some(self.ca.clone()),
                refresh_interval: Duration::from_secs(3600),
            }
        }

        fn requests(&self) -> usize {
            *self.requests.borrow()
        }

        /// Lists the `report` container of the batch pod as started.
        fn start_report_container(&self) {
            let mut list: serde_json::Value = serde_json::from_str(PODS).unwrap();
            let status = &mut list["items"][1]["status"]["containerStatuses"][0];
            status["containerID"] = format!("containerd://{REPORT}").into();
            status["imageID"] = status["image"].clone();
            *self.body.lock().unwrap() = list.to_string();
        }
    }

    async fn read_head<S: AsyncReadExt + Unpin>(stream: &mut S) -> String {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                break;
            }
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    /// containerd with the systemd driver on cgroup v2.
    fn cgroup_of(pod_uid: &str, container_id: &str) -> String {
        format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{container_id}.scope\n",
            pod_uid.replace('-', "_")
        )
    }

    /// Waits until `attestor` has completed `n` fetches.
    async fn fetched(attestor: &K8sAttestor, n: u64) {
        let mut rx = attestor.shared.completed.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| *c >= n))
            .await
            .unwrap()
            .unwrap();
    }

    async fn selectors_of(attestor: &K8sAttestor, cgroup: &str) -> Result<Vec<String>, K8sError> {
        let mut selectors = Selectors::new();
        let facts = Facts {
            pid: 1,
            cgroup: cgroup.to_owned(),
        };
        attestor.collect(&facts, &mut selectors).await?;
        Ok(selectors.iter().map(ToString::to_string).collect())
    }

    #[tokio::test]
    async fn a_listed_container_gets_its_pod_and_container_selectors() {
        let kubelet = Kubelet::start().await;
        let attestor = K8sAttestor::new(&kubelet.config()).unwrap();
        let got = selectors_of(&attestor, &cgroup_of(WEB_POD, WEB))
            .await
            .unwrap();
        assert_eq!(
            got,
            [
                "k8s:container-image:docker.io/library/nginx:1.25",
                "k8s:container-image:docker.io/library/nginx@sha256:10d1f5b58f74683ad34eb29287e07dab1e90f10af243f151bb50aa5dbb4d62ee",
                "k8s:container-name:web",
                "k8s:node-name:node-1",
                "k8s:ns:shop",
                "k8s:pod-label:app:web",
                "k8s:pod-label:pod-template-hash:7c9f8d6b5",
                "k8s:pod-name:web-7c9f8d6b5-x2lqp",
                "k8s:pod-owner:ReplicaSet:web-7c9f8d6b5",
                "k8s:pod-uid:7d2a6c3e-91b4-4f0a-8e5d-2b1c9a8f7e6d",
                "k8s:sa:web",
            ]
        );
        let sidecar = selectors_of(&attestor, &cgroup_of(WEB_POD, ENVOY))
            .await
            .unwrap();
        assert!(sidecar.contains(&"k8s:container-name:envoy".to_owned()));
        assert!(!sidecar.contains(&"k8s:container-name:web".to_owned()));
    }

    #[tokio::test]
    async fn warm_lookups_do_not_fetch() {
        let kubelet = Kubelet::start().await;
        let attestor = K8sAttestor::new(&kubelet.config()).unwrap();
        fetched(&attestor, 1).await;
        for _ in 0..50 {
            selectors_of(&attestor, &cgroup_of(WEB_POD, WEB))
                .await
                .unwrap();
        }
        assert_eq!(kubelet.requests(), 1);
    }

    #[tokio::test]
    async fn an_unknown_container_shares_one_refresh() {
        let kubelet = Kubelet::start().await;
        let attestor = Arc::new(K8sAttestor::new(&kubelet.config()).unwrap());
        fetched(&attestor, 1).await;

        // The report container starts after the list was fetched; twenty
        // of its processes call at once.
        kubelet.start_report_container();
        let cgroup = format!(
            "12:memory:/kubepods/besteffort/pod{BATCH_POD}/{REPORT}\n\
             1:name=systemd:/kubepods/besteffort/pod{BATCH_POD}/{REPORT}\n"
        );
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let attestor = Arc::clone(&attestor);
                let cgroup = cgroup.clone();
                tokio::spawn(async move { selectors_of(&attestor, &cgroup).await })
            })
            .collect();
        for call in calls {
            let got = call.await.unwrap().unwrap();
            assert!(
                got.contains(&"k8s:pod-owner:Job:batch-28391040".to_owned()),
                "{got:?}"
            );
            assert!(got.contains(&"k8s:sa:default".to_owned()), "{got:?}");
        }
        assert_eq!(kubelet.requests(), 2, "one refresh for all callers");
    }

    #[tokio::test]
    async fn a_container_not_yet_listed_is_unavailable_not_denied() {
        let kubelet = Kubelet::start().await;
        let attestor = K8sAttestor::new(&kubelet.config()).unwrap();
        fetched(&attestor, 1).await;
        // The batch pod is listed, its container still being created.
        let started = tokio::time::Instant::now();
        let err = selectors_of(&attestor, &cgroup_of(BATCH_POD, REPORT))
            .await
            .unwrap_err();
        assert!(started.elapsed() < UNKNOWN_WAIT);
        assert_eq!(
            err.to_string(),
            format!("container {REPORT} of pod {BATCH_POD} is not in the kubelet's pod list")
        );
        assert_eq!(kubelet.requests(), 2, "looked again once");

        // Once listed, the next attempt succeeds.
        kubelet.start_report_container();
        let got = selectors_of(&attestor, &cgroup_of(BATCH_POD, REPORT))
            .await
            .unwrap();
        assert!(got.contains(&"k8s:container-name:report".to_owned()));
    }

    #[tokio::test]
    async fn processes_outside_pods_get_nothing_and_cost_no_fetch() {
        let kubelet = Kubelet::start().await;
        let attestor = K8sAttestor::new(&kubelet.config()).unwrap();
        fetched(&attestor, 1).await;
        for cgroup in [
            "0::/system.slice/sshd.service\n".to_owned(),
            format!("0::/system.slice/docker-{WEB}.scope\n"),
        ] {
            assert!(selectors_of(&attestor, &cgroup).await.unwrap().is_empty());
        }
        assert_eq!(kubelet.requests(), 1);
    }

    #[tokio::test]
    async fn the_list_is_refreshed_on_the_interval() {
        let kubelet = Kubelet::start().await;
        let attestor = K8sAttestor::new(&K8sConfig {
            refresh_interval: Duration::from_millis(50),
            ..kubelet.config()
        })
        .unwrap();
        fetched(&attestor, 1).await;
        kubelet.start_report_container();
        fetched(&attestor, 3).await;
        let got = selectors_of(&attestor, &cgroup_of(BATCH_POD, REPORT))
            .await
            .unwrap();
        assert!(got.contains(&"k8s:container-name:report".to_owned()));
        drop(attestor);
    }

    #[tokio::test]
    async fn the_kubelet_certificate_is_verified_unless_told_not_to() {
        let kubelet = Kubelet::start().await;
        let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let other_ca = kubelet._dir.path().join("other-ca.pem");
        std::fs::write(&other_ca, other.cert.pem()).unwrap();
        let attestor = K8sAttestor::new(&K8sConfig {
            kubelet_ca_path: Some(other_ca),
            ..kubelet.config()
        })
        .unwrap();
        let err = selectors_of(&attestor, &cgroup_of(WEB_POD, WEB))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("invalid peer certificate"),
            "{err}"
        );

        let attestor = K8sAttestor::new(&K8sConfig {
            kubelet_ca_path: None,
            ..kubelet.config()
        })
        .unwrap();
        let got = selectors_of(&attestor, &cgroup_of(WEB_POD, WEB))
            .await
            .unwrap();
        assert!(got.contains(&"k8s:ns:shop".to_owned()));
    }

    #[tokio::test]
    async fn a_wrong_token_is_reported() {
        let kubelet = Kubelet::start().await;
        std::fs::write(&kubelet.token, "expired").unwrap();
        let attestor = K8sAttestor::new(&kubelet.config()).unwrap();
        let err = selectors_of(&attestor, &cgroup_of(WEB_POD, WEB))
            .await
            .unwrap_err();
        assert!(
            err.to_string().ends_with("/pods: HTTP 401: Unauthorized"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_ca_file_is_a_setup_error() {
        let err = KubeletClient::new(&K8sConfig {
            kubelet_url: KubeletUrl::parse("https://node-1").unwrap(),
            token_path: "/nonexistent/token".into(),
            kubelet_ca_path: Some("/nonexistent/ca.pem".into()),
            refresh_interval: Duration::from_secs(10),
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("kubelet CA /nonexistent/ca.pem: "),
            "{err}"
        );
    }

    #[test]
    fn kubelet_urls() {
        for (url, shown) in [
            ("https://node-1", "https://node-1:10250"),
            ("https://node-1:10443/", "https://node-1:10443"),
            ("https://10.0.0.7:10250", "https://10.0.0.7:10250"),
            ("https://[fd00::7]", "https://[fd00::7]:10250"),
        ] {
            assert_eq!(KubeletUrl::parse(url).unwrap().to_string(), shown);
        }
        for bad in [
            "http://node-1",
            "https://",
            "https://node-1/pods",
            "https://node-1:0",
            "https://node-1:x",
            "https://[fd00::7",
            "https://user@node-1",
        ] {
            assert!(KubeletUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_recorded_list_is_indexed_by_container() {
        let index = PodIndex::build(serde_json::from_str(PODS).unwrap());
        // web, envoy and the finished init container; not the container
        // still being created.
        assert_eq!(index.containers.len(), 3);
        assert!(index.lookup(WEB, WEB_POD).is_some());
        assert!(index.lookup(WEB, BATCH_POD).is_none(), "pod must match");
    }
}
