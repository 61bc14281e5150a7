//! The docker workload attestor: what the Docker engine says about the
//! container a process runs in.
//!
//! The container ID comes from the process's cgroup (see [`cgroup`]); the
//! engine is asked `GET /containers/<id>/json` on its Unix socket. Selectors
//! produced (type `docker`), from the container's `Config`:
//! - `label:<key>:<value>`: each label;
//! - `env:<NAME>=<value>`: each environment variable the container was
//!   created with;
//! - `image_id:<image>`: the image as the container was created from it
//!   (`Config.Image`, e.g. `nginx:1.25` or `repo@sha256:…`), as other SPIFFE
//!   implementations name it.
//!
//! A container's configuration never changes, so the engine is asked once
//! per container and its answer kept (also "no such container": a
//! container another runtime runs, which gets no `docker` selector). A
//! process in no container gets none either, and the engine is not asked.
//! An engine that cannot be reached, or answers with an error, fails the
//! attestation (the caller may retry).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use sigil::Selectors;
use tokio::net::UnixStream;

use super::settings::DockerConfig;
use super::{Facts, add, cgroup, http};

/// The selector type this attestor produces.
const SELECTOR_TYPE: &str = "docker";

/// How long the engine gets to answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest response body read from the engine.
const MAX_BODY: usize = 4 << 20;

/// Most containers whose answer is kept; past it the cache starts over.
const MAX_CACHED: usize = 4096;

/// Why the engine did not describe a container.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DockerError {
    /// The socket could not be connected to.
    #[error("cannot connect to {path}: {source}", path = .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("inspecting container {id}: {source}")]
    Http {
        /// The container.
        id: String,
        /// The error.
        source: http::HttpError,
    },
    /// The engine did not answer in time.
    #[error("inspecting container {id}: no answer within {REQUEST_TIMEOUT:?}")]
    Timeout {
        /// The container.
        id: String,
    },
    /// The engine answered with an error status.
    #[error("inspecting container {id}: HTTP {status}: {message}")]
    Status {
        /// The container.
        id: String,
        /// The status.
        status: u16,
        /// The engine's message.
        message: String,
    },
    /// The answer is not a container description.
    #[error("inspecting container {id}: unexpected answer: {source}")]
    Json {
        /// The container.
        id: String,
        /// The error.
        source: serde_json::Error,
    },
}

/// The parts of `GET /containers/<id>/json` used.
#[derive(Debug, Deserialize)]
struct Inspect {
    #[serde(rename = "Config", default)]
    config: Option<ContainerConfig>,
}

/// `Config` of a container description; the engine writes `null` for an
/// empty list or map.
#[derive(Debug, Deserialize)]
struct ContainerConfig {
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "Image", default)]
    image: Option<String>,
}

/// The error body of the engine.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    message: String,
}

/// The selector values of a container; empty for one the engine does not
/// know.
type Values = Arc<[String]>;

/// Asks the Docker engine about containers.
#[derive(Debug)]
pub(crate) struct DockerAttestor {
    socket_path: PathBuf,
    known: Mutex<HashMap<String, Values>>,
}

impl DockerAttestor {
    /// An attestor asking the engine at `config.socket_path`.
    pub(crate) fn new(config: &DockerConfig) -> Self {
        Self {
            socket_path: config.socket_path.clone(),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// Adds the selectors of the process `facts` describe.
    pub(crate) async fn collect(
        &self,
        facts: &Facts,
        selectors: &mut Selectors,
    ) -> Result<(), DockerError> {
        let Some(container) = cgroup::container(&facts.cgroup) else {
            return Ok(());
        };
        let values = match self.cached(&container.id) {
            Some(values) => values,
            None => {
                let values = self.inspect(&container.id).await?;
                self.keep(container.id, Arc::clone(&values));
                values
            }
        };
        for value in values.iter() {
            add(selectors, facts.pid, SELECTOR_TYPE, value);
        }
        Ok(())
    }

    fn cached(&self, id: &str) -> Option<Values> {
        let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        known.get(id).cloned()
    }

    fn keep(&self, id: String, values: Values) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if known.len() >= MAX_CACHED {
            known.clear();
        }
        known.insert(id, values);
    }

    /// Asks the engine for the selector values of container `id`.
    async fn inspect(&self, id: &str) -> Result<Values, DockerError> {
        let request = async {
            let stream = UnixStream::connect(&self.socket_path)
                .await
                .map_err(|source| DockerError::Connect {
                    path: self.socket_path.clone(),
                    source,
                })?;
            // `id` is 64 hex digits (see `cgroup`): nothing to escape.
            http::get(
                stream,
                "docker",
                &format!("/containers/{id}/json"),
                None,
                MAX_BODY,
            )
            .await
            .map_err(|source| DockerError::Http {
                id: id.to_owned(),
                source,
            })
        };
        let response = tokio::time::timeout(REQUEST_TIMEOUT, request)
            .await
            .map_err(|_| DockerError::Timeout { id: id.to_owned() })??;
        if response.status == hyper::StatusCode::NOT_FOUND {
            tracing::debug!(container.id = id, "not a Docker container");
            return Ok(Arc::from([]));
        }
        if !response.status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&response.body)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&response.body).into_owned());
            return Err(DockerError::Status {
                id: id.to_owned(),
                status: response.status.as_u16(),
                message,
            });
        }
        let inspect: Inspect =
            serde_json::from_slice(&response.body).map_err(|source| DockerError::Json {
                id: id.to_owned(),
                source,
            })?;
        Ok(values_of(inspect).into())
    }
}

/// The selector values of a container description.
fn values_of(inspect: Inspect) -> Vec<String> {
    let Some(config) = inspect.config else {
        return Vec::new();
    };
    let mut values = Vec::new();
    for (key, value) in config.labels.unwrap_or_default() {
        values.push(format!("label:{key}:{value}"));
    }
    for variable in config.env.unwrap_or_default() {
        values.push(format!("env:{variable}"));
    }
    if let Some(image) = config.image.filter(|i| !i.is_empty()) {
        values.push(format!("image_id:{image}"));
    }
    values
}

/// The Docker engine cannot run on the machines these tests run on: they
/// answer the production client from a local HTTP server on a Unix socket,
/// with a response recorded from the engine's API
/// (`fixtures/docker_container_inspect.json`).
#[cfg(test)]
pub(super) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    use super::*;

    /// The container of the recorded response.
    pub(crate) const CID: &str = "3f4b2c1d9e8a7f6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b";
    const INSPECT: &str = include_str!("fixtures/docker_container_inspect.json");

    /// A Docker engine stand-in: answers `GET /containers/<CID>/json` with
    /// the fixture, any other container with the engine's 404, and counts
    /// requests.
    pub(crate) struct Engine {
        /// The engine's socket.
        pub(crate) socket: PathBuf,
        requests: Arc<AtomicUsize>,
        paths: Arc<Mutex<Vec<String>>>,
        _dir: tempfile::TempDir,
    }

    impl Engine {
        /// An engine answering as recorded.
        pub(crate) fn start() -> Self {
            Self::answering(None)
        }

        /// An engine answering every request with `status` and `body`.
        fn answering(fixed: Option<(u16, &'static str)>) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("docker.sock");
            let listener = UnixListener::bind(&socket).unwrap();
            let requests = Arc::new(AtomicUsize::new(0));
            let paths = Arc::new(Mutex::new(Vec::new()));
            let (count, seen) = (Arc::clone(&requests), Arc::clone(&paths));
            tokio::spawn(async move {
                loop {
                    let (mut stream, _) = listener.accept().await.unwrap();
                    count.fetch_add(1, Ordering::SeqCst);
                    let request = read_head(&mut stream).await;
                    let line = request.lines().next().unwrap_or_default().to_owned();
                    assert!(
                        request
                            .to_ascii_lowercase()
                            .contains("\r\nhost: docker\r\n"),
                        "{request}"
                    );
                    seen.lock().unwrap().push(line.clone());
                    let (status, body) = match fixed {
                        Some((status, body)) => (status, body.to_owned()),
                        None if line == format!("GET /containers/{CID}/json HTTP/1.1") => {
                            (200, INSPECT.to_owned())
                        }
                        None => {
                            let id = line.split('/').nth(2).unwrap_or_default();
                            (
                                404,
                                format!("{{\"message\":\"No such container: {id}\"}}\n"),
                            )
                        }
                    };
                    let reason = if status == 200 { "OK" } else { "Error" };
                    let head = format!(
                        "HTTP/1.1 {status} {reason}\r\n\
                         Api-Version: 1.43\r\n\
                         Content-Type: application/json\r\n\
                         Docker-Experimental: false\r\n\
                         Ostype: linux\r\n\
                         Server: Docker/24.0.7 (linux)\r\n\
                         Date: Fri, 20 Nov 2026 09:20:11 GMT\r\n\
                         Content-Length: {}\r\n\r\n",
                        body.len()
                    );
                    stream.write_all(head.as_bytes()).await.unwrap();
                    stream.write_all(body.as_bytes()).await.unwrap();
                    stream.shutdown().await.unwrap();
                }
            });
            Self {
                socket,
                requests,
                paths,
                _dir: dir,
            }
        }

        fn attestor(&self) -> DockerAttestor {
            DockerAttestor::new(&DockerConfig {
                socket_path: self.socket.clone(),
            })
        }
    }

    async fn read_head(stream: &mut tokio::net::UnixStream) -> String {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            head.push(byte[0]);
        }
        String::from_utf8(head).unwrap()
    }

    fn facts(cgroup: &str) -> Facts {
        Facts {
            pid: 1,
            cgroup: cgroup.to_owned(),
        }
    }

    async fn selectors_of(
        attestor: &DockerAttestor,
        cgroup: &str,
    ) -> Result<Vec<String>, DockerError> {
        let mut selectors = Selectors::new();
        attestor.collect(&facts(cgroup), &mut selectors).await?;
        Ok(selectors.iter().map(ToString::to_string).collect())
    }

    #[tokio::test]
    async fn a_docker_container_gets_its_labels_env_and_image() {
        let engine = Engine::start();
        let got = selectors_of(
            &engine.attestor(),
            &format!("0::/system.slice/docker-{CID}.scope\n"),
        )
        .await
        .unwrap();
        assert_eq!(
            got,
            [
                "docker:env:APP_ENV=production",
                "docker:env:NGINX_VERSION=1.25.3",
                "docker:env:NJS_VERSION=0.8.2",
                "docker:env:PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "docker:env:PKG_RELEASE=1~bookworm",
                "docker:image_id:nginx:1.25",
                "docker:label:com.example.team:payments",
                "docker:label:maintainer:NGINX Docker Maintainers <docker-maint@nginx.com>",
            ]
        );
        assert_eq!(
            *engine.paths.lock().unwrap(),
            [format!("GET /containers/{CID}/json HTTP/1.1")]
        );
    }

    #[tokio::test]
    async fn the_engine_is_asked_once_per_container() {
        let engine = Engine::start();
        let attestor = engine.attestor();
        let cgroup = format!("12:pids:/docker/{CID}\n1:name=systemd:/docker/{CID}\n");
        let first = selectors_of(&attestor, &cgroup).await.unwrap();
        let second = selectors_of(&attestor, &cgroup).await.unwrap();
        assert_eq!(first, second);
        assert_eq!(engine.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_process_in_no_container_is_not_asked_about() {
        let engine = Engine::start();
        let got = selectors_of(&engine.attestor(), "0::/system.slice/sshd.service\n")
            .await
            .unwrap();
        assert!(got.is_empty());
        assert_eq!(engine.requests.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_container_the_engine_does_not_know_gets_nothing_once() {
        let engine = Engine::start();
        let attestor = engine.attestor();
        let other = "a".repeat(64);
        let cgroup =
            format!("0::/kubepods.slice/kubepods-besteffort.slice/cri-containerd-{other}.scope\n");
        assert!(selectors_of(&attestor, &cgroup).await.unwrap().is_empty());
        assert!(selectors_of(&attestor, &cgroup).await.unwrap().is_empty());
        assert_eq!(engine.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn engine_errors_fail_the_attestation_and_are_not_kept() {
        let engine = Engine::answering(Some((
            500,
            "{\"message\":\"Cannot connect to the containerd socket\"}\n",
        )));
        let attestor = engine.attestor();
        let cgroup = format!("0::/system.slice/docker-{CID}.scope\n");
        for _ in 0..2 {
            let err = selectors_of(&attestor, &cgroup).await.unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "inspecting container {CID}: HTTP 500: Cannot connect to the containerd socket"
                )
            );
        }
        assert_eq!(engine.requests.load(Ordering::SeqCst), 2);

        let engine = Engine::answering(Some((200, "<html>")));
        let err = selectors_of(&engine.attestor(), &cgroup).await.unwrap_err();
        assert!(matches!(err, DockerError::Json { .. }), "{err}");
    }

    #[tokio::test]
    async fn an_engine_that_is_not_running_fails_the_attestation() {
        let dir = tempfile::tempdir().unwrap();
        let attestor = DockerAttestor::new(&DockerConfig {
            socket_path: dir.path().join("docker.sock"),
        });
        let err = selectors_of(&attestor, &format!("0::/docker/{CID}\n"))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("cannot connect to {}", dir.path().display())),
            "{err}"
        );
    }

    #[test]
    fn null_labels_and_env_are_empty() {
        let inspect: Inspect = serde_json::from_str(
            r#"{"Id":"x","Config":{"Labels":null,"Env":null,"Image":"busybox"}}"#,
        )
        .unwrap();
        assert_eq!(values_of(inspect), ["image_id:busybox"]);
    }
}
