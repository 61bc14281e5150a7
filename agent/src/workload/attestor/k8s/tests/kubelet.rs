//! A kubelet stand-in for the k8s attestor's tests and benchmark: a local
//! HTTPS server (rustls, with a certificate made on the spot) that answers
//! `GET /pods` with a pod list recorded from the kubelet's `/pods`
//! (`fixtures/kubelet_pods.json`).
//!
//! It names the attestor's types through its parent module (`super::`), so
//! that the benchmark, which includes this file, can supply them from the
//! library.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{K8sConfig, KubeletUrl};

/// The recorded pod list.
pub(crate) const PODS: &str = include_str!("../../fixtures/kubelet_pods.json");
/// The service-account token the stand-in accepts.
pub(crate) const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.sa-token.sig";
/// The `report` container of the batch pod, once
/// [`Kubelet::start_report_container`] lists it.
pub(crate) const REPORT: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";

/// A kubelet stand-in: answers `GET /pods` with `body` to callers with
/// the right bearer token, 401 to others, and counts requests.
pub(crate) struct Kubelet {
    pub(crate) url: KubeletUrl,
    pub(crate) ca: PathBuf,
    pub(crate) token: PathBuf,
    /// The pod list served.
    pub(crate) body: Arc<Mutex<String>>,
    requests: watch::Receiver<usize>,
    pub(crate) _dir: tempfile::TempDir,
}

impl Kubelet {
    pub(crate) async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let ca = dir.path().join("kubelet-ca.pem");
        std::fs::write(&ca, certified.cert.pem()).unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).unwrap();

        let key = rustls_pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der())
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

    pub(crate) fn config(&self) -> K8sConfig {
        K8sConfig {
            kubelet_url: self.url.clone(),
            token_path: self.token.clone(),
            kubelet_ca_path: Some(self.ca.clone()),
            refresh_interval: Duration::from_secs(3600),
        }
    }

    pub(crate) fn requests(&self) -> usize {
        *self.requests.borrow()
    }

    /// Lists the `report` container of the batch pod as started.
    pub(crate) fn start_report_container(&self) {
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
