//! The `[workload_attestors]` table of the agent's configuration file:
//! which optional attestors run, and how.
//!
//! ```toml
//! [workload_attestors.systemd]
//! # unit_paths = ["/etc/systemd/system", "/run/systemd/system",
//! #               "/usr/lib/systemd/system", "/lib/systemd/system"]
//!
//! [workload_attestors.docker]
//! socket_path = "/var/run/docker.sock"
//!
//! [workload_attestors.k8s]
//! node_name = "node-1"              # kubelet_url defaults to https://node-1:10250
//! # kubelet_url = "https://127.0.0.1:10250"
//! # token_path = "/var/run/secrets/kubernetes.io/serviceaccount/token"
//! # kubelet_ca_path = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
//! # skip_kubelet_verification = false
//! # refresh_interval = "10s"
//! ```
//!
//! An attestor runs when its table is present, even empty.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::k8s::KubeletUrl;

/// The directories searched for unit files, in systemd's order of
/// precedence for the system manager.
pub(crate) const DEFAULT_UNIT_PATHS: &[&str] = &[
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// The Docker engine's default socket.
pub(crate) const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// The service-account token of the agent's pod.
pub(crate) const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// The cluster CA of the agent's pod.
pub(crate) const DEFAULT_KUBELET_CA_PATH: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// The kubelet's port.
pub(crate) const KUBELET_PORT: u16 = 10250;

/// How often the pod list is fetched when no unknown pod asks for it.
pub(crate) const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// The optional workload attestors; `None` is off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AttestorsConfig {
    /// `[workload_attestors.systemd]`.
    pub(crate) systemd: Option<SystemdConfig>,
    /// `[workload_attestors.docker]`.
    pub(crate) docker: Option<DockerConfig>,
    /// `[workload_attestors.k8s]`.
    pub(crate) k8s: Option<K8sConfig>,
}

/// `[workload_attestors]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttestorsFile {
    systemd: Option<SystemdConfig>,
    docker: Option<DockerConfig>,
    k8s: Option<K8sFile>,
}

/// `[workload_attestors.k8s]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sConfig {
    /// The kubelet's HTTPS endpoint.
    pub kubelet_url: KubeletUrl,
    /// The bearer token file, read at each fetch (projected tokens
    /// rotate).
    pub token_path: PathBuf,
    /// The CA certificates (PEM) the kubelet's certificate must chain to;
    /// `None` skips verification.
    pub kubelet_ca_path: Option<PathBuf>,
    /// The shortest time between two fetches of the pod list made without
    /// an unknown pod asking for one.
    pub refresh_interval: Duration,
}

/// `[workload_attestors.k8s]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct K8sFile {
    kubelet_url: Option<String>,
    node_name: Option<String>,
    token_path: Option<PathBuf>,
    kubelet_ca_path: Option<PathBuf>,
    #[serde(default)]
    skip_kubelet_verification: bool,
    refresh_interval: Option<String>,
}

/// `[workload_attestors.systemd]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SystemdConfig {
    /// Where unit files are looked for, first match wins.
    #[serde(default = "default_unit_paths")]
    pub(crate) unit_paths: Vec<PathBuf>,
}

/// `[workload_attestors.docker]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DockerConfig {
    /// The Docker engine's API socket.
    #[serde(default = "default_docker_socket")]
    pub(crate) socket_path: PathBuf,
}

fn default_unit_paths() -> Vec<PathBuf> {
    DEFAULT_UNIT_PATHS.iter().map(PathBuf::from).collect()
}

fn default_docker_socket() -> PathBuf {
    DEFAULT_DOCKER_SOCKET.into()
}

impl Default for SystemdConfig {
    fn default() -> Self {
        Self {
            unit_paths: default_unit_paths(),
        }
    }
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            socket_path: default_docker_socket(),
        }
    }
}

impl AttestorsConfig {
    /// Reads the `workload_attestors` value of a configuration file; the
    /// error names the offending key.
    pub(crate) fn from_toml(value: toml::Value) -> Result<Self, String> {
        let file: AttestorsFile = value.try_into().map_err(|e: toml::de::Error| {
            format!("workload_attestors: {}", e.message().trim_end())
        })?;
        if let Some(docker) = &file.docker
            && docker.socket_path.as_os_str().is_empty()
        {
            return Err("workload_attestors.docker.socket_path must not be empty".to_owned());
        }
        if let Some(systemd) = &file.systemd
            && systemd.unit_paths.iter().any(|p| !p.is_absolute())
        {
            return Err("workload_attestors.systemd.unit_paths must be absolute paths".to_owned());
        }
        Ok(Self {
            systemd: file.systemd,
            docker: file.docker,
            k8s: file.k8s.map(K8sConfig::check).transpose()?,
        })
    }
}

impl K8sConfig {
    fn check(file: K8sFile) -> Result<Self, String> {
        let prefix = "workload_attestors.k8s";
        let url = match (file.kubelet_url, file.node_name) {
            (Some(url), _) => url,
            (None, Some(node)) if node.contains(':') => format!("https://[{node}]:{KUBELET_PORT}"),
            (None, Some(node)) => format!("https://{node}:{KUBELET_PORT}"),
            (None, None) => format!("https://127.0.0.1:{KUBELET_PORT}"),
        };
        let kubelet_url =
            KubeletUrl::parse(&url).map_err(|e| format!("{prefix}.kubelet_url: {url:?} {e}"))?;
        let refresh_interval = match file.refresh_interval {
            None => DEFAULT_REFRESH_INTERVAL,
            Some(text) => match humantime::parse_duration(&text) {
                Ok(d) if d >= Duration::from_secs(1) => d,
                Ok(_) => {
                    return Err(format!(
                        "{prefix}.refresh_interval: {text:?} is shorter than 1s"
                    ));
                }
                Err(e) => return Err(format!("{prefix}.refresh_interval: {text:?} {e}")),
            },
        };
        let kubelet_ca_path = match (file.skip_kubelet_verification, file.kubelet_ca_path) {
            (true, Some(_)) => {
                return Err(format!(
                    "{prefix}: set only one of kubelet_ca_path and skip_kubelet_verification"
                ));
            }
            (true, None) => None,
            (false, path) => Some(path.unwrap_or_else(|| DEFAULT_KUBELET_CA_PATH.into())),
        };
        Ok(Self {
            kubelet_url,
            token_path: file.token_path.unwrap_or_else(|| DEFAULT_TOKEN_PATH.into()),
            kubelet_ca_path,
            refresh_interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AttestorsConfig, String> {
        let mut table: toml::Table = text.parse().unwrap();
        AttestorsConfig::from_toml(table.remove("workload_attestors").unwrap())
    }

    #[test]
    fn empty_tables_turn_attestors_on_with_defaults() {
        let config = parse(
            "[workload_attestors.systemd]\n\
             [workload_attestors.docker]\n",
        )
        .unwrap();
        assert_eq!(config.systemd, Some(SystemdConfig::default()));
        assert_eq!(
            config.docker.unwrap().socket_path,
            PathBuf::from("/var/run/docker.sock")
        );
        assert_eq!(
            config.systemd.unwrap().unit_paths[0],
            PathBuf::from("/etc/systemd/system")
        );
    }

    #[test]
    fn absent_tables_leave_attestors_off() {
        let config = parse("[workload_attestors]\n").unwrap();
        assert_eq!(config, AttestorsConfig::default());
        assert!(config.systemd.is_none() && config.docker.is_none());
    }

    #[test]
    fn values_are_read() {
        let config = parse(
            "[workload_attestors.docker]\nsocket_path = \"/run/docker.sock\"\n\
             [workload_attestors.systemd]\nunit_paths = [\"/etc/units\"]\n",
        )
        .unwrap();
        assert_eq!(
            config.docker.unwrap().socket_path,
            PathBuf::from("/run/docker.sock")
        );
        assert_eq!(
            config.systemd.unwrap().unit_paths,
            [PathBuf::from("/etc/units")]
        );
    }

    #[test]
    fn k8s_defaults_and_values() {
        let k8s = parse("[workload_attestors.k8s]\n").unwrap().k8s.unwrap();
        assert_eq!(k8s.kubelet_url.to_string(), "https://127.0.0.1:10250");
        assert_eq!(k8s.token_path, PathBuf::from(DEFAULT_TOKEN_PATH));
        assert_eq!(k8s.kubelet_ca_path, Some(DEFAULT_KUBELET_CA_PATH.into()));
        assert_eq!(k8s.refresh_interval, Duration::from_secs(10));

        let k8s = parse("[workload_attestors.k8s]\nnode_name = \"node-1\"\n")
            .unwrap()
            .k8s
            .unwrap();
        assert_eq!(k8s.kubelet_url.to_string(), "https://node-1:10250");

        let k8s = parse(
            "[workload_attestors.k8s]\n\
             node_name = \"node-1\"\n\
             kubelet_url = \"https://10.0.0.7:10443\"\n\
             token_path = \"/t\"\n\
             skip_kubelet_verification = true\n\
             refresh_interval = \"30s\"\n",
        )
        .unwrap()
        .k8s
        .unwrap();
        assert_eq!(k8s.kubelet_url.to_string(), "https://10.0.0.7:10443");
        assert_eq!(k8s.token_path, PathBuf::from("/t"));
        assert_eq!(k8s.kubelet_ca_path, None);
        assert_eq!(k8s.refresh_interval, Duration::from_secs(30));
    }

    #[test]
    fn k8s_mistakes_are_named() {
        for (text, expected) in [
            (
                "kubelet_url = \"http://node:10250\"",
                "workload_attestors.k8s.kubelet_url: \"http://node:10250\" must start with https://",
            ),
            (
                "refresh_interval = \"10\"",
                "workload_attestors.k8s.refresh_interval: \"10\"",
            ),
            (
                "refresh_interval = \"10ms\"",
                "workload_attestors.k8s.refresh_interval: \"10ms\" is shorter than 1s",
            ),
            (
                "skip_kubelet_verification = true\nkubelet_ca_path = \"/ca\"",
                "workload_attestors.k8s: set only one of kubelet_ca_path and skip_kubelet_verification",
            ),
            ("kubelet = \"x\"", "unknown field `kubelet`"),
        ] {
            let err = parse(&format!("[workload_attestors.k8s]\n{text}\n")).unwrap_err();
            assert!(err.contains(expected), "{err} for {text}");
        }
    }

    #[test]
    fn mistakes_are_named() {
        let err = parse("[workload_attestors.docker]\nsocket = \"/x\"\n").unwrap_err();
        assert!(err.contains("unknown field `socket`"), "{err}");
        let err = parse("[workload_attestors.podman]\n").unwrap_err();
        assert!(err.contains("unknown field `podman`"), "{err}");
        let err = parse("[workload_attestors.docker]\nsocket_path = 3\n").unwrap_err();
        assert!(err.starts_with("workload_attestors: "), "{err}");
        let err = parse("[workload_attestors.systemd]\nunit_paths = [\"etc\"]\n").unwrap_err();
        assert!(err.contains("absolute"), "{err}");
    }
}
