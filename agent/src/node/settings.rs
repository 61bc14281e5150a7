//! The `[node_attestor]` table of the agent's configuration: how the agent
//! proves which node it runs on.
//!
//! ```toml
//! [node_attestor.x509pop]
//! certificate_path = "/etc/sigil/node.pem"
//! private_key_path = "/etc/sigil/node-key.pem"
//! intermediates_path = "/etc/sigil/node-intermediates.pem"  # optional
//!
//! [node_attestor.k8s_psat]
//! cluster = "prod"
//! token_path = "/var/run/secrets/tokens/sigil-agent"        # the default
//! ```
//!
//! Without the table, the agent attests with a join token
//! (`join_token`/`join_token_file`).

use std::path::PathBuf;

/// Default path of the projected service account token.
pub(crate) const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/tokens/sigil-agent";

/// The agent's node attestor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum NodeAttestorConfig {
    /// A one-time join token (the `join_token`/`join_token_file` keys).
    #[default]
    JoinToken,
    /// Proof of possession of a node certificate.
    X509Pop {
        /// PEM file of the node certificate (intermediates may follow it).
        certificate_path: PathBuf,
        /// PEM file of its private key (PKCS#8, SEC1 EC or PKCS#1 RSA).
        private_key_path: PathBuf,
        /// PEM file of more intermediate CA certificates.
        intermediates_path: Option<PathBuf>,
    },
    /// A projected service account token of the agent's pod.
    K8sPsat {
        /// The cluster's name in the server's configuration.
        cluster: String,
        /// The token file, read at each attestation.
        token_path: PathBuf,
    },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    join_token: Option<toml::Table>,
    x509pop: Option<X509PopFile>,
    k8s_psat: Option<K8sPsatFile>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct X509PopFile {
    certificate_path: PathBuf,
    private_key_path: PathBuf,
    intermediates_path: Option<PathBuf>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct K8sPsatFile {
    cluster: String,
    token_path: Option<PathBuf>,
}

impl NodeAttestorConfig {
    /// The attestor's name, as the server knows it.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::JoinToken => "join_token",
            Self::X509Pop { .. } => "x509pop",
            Self::K8sPsat { .. } => "k8s_psat",
        }
    }

    /// Whether the agent can attest again by itself, with no operator: its
    /// evidence is not used up by an attestation.
    pub(crate) fn reattests(&self) -> bool {
        !matches!(self, Self::JoinToken)
    }

    /// Reads the `[node_attestor]` table.
    pub(crate) fn from_toml(value: toml::Value) -> Result<Self, String> {
        let file: File = value
            .try_into()
            .map_err(|e: toml::de::Error| format!("node_attestor: {}", e.message().trim_end()))?;
        let chosen = usize::from(file.join_token.is_some())
            + usize::from(file.x509pop.is_some())
            + usize::from(file.k8s_psat.is_some());
        if chosen != 1 {
            return Err(
                "node_attestor: set exactly one of [node_attestor.join_token], [node_attestor.x509pop], [node_attestor.k8s_psat]"
                    .to_owned(),
            );
        }
        if let Some(table) = file.join_token {
            if let Some(key) = table.keys().next() {
                return Err(format!(
                    "node_attestor.join_token: unknown key {key:?}; the token is set with join_token or join_token_file"
                ));
            }
            return Ok(Self::JoinToken);
        }
        if let Some(x) = file.x509pop {
            let empty = |p: &PathBuf| p.as_os_str().is_empty();
            if empty(&x.certificate_path) || empty(&x.private_key_path) {
                return Err(
                    "node_attestor.x509pop: certificate_path and private_key_path must not be empty"
                        .to_owned(),
                );
            }
            return Ok(Self::X509Pop {
                certificate_path: x.certificate_path,
                private_key_path: x.private_key_path,
                intermediates_path: x.intermediates_path,
            });
        }
        match file.k8s_psat {
            Some(k) if k.cluster.is_empty() => {
                Err("node_attestor.k8s_psat.cluster must not be empty".to_owned())
            }
            Some(k) => Ok(Self::K8sPsat {
                cluster: k.cluster,
                token_path: k.token_path.unwrap_or_else(|| DEFAULT_TOKEN_PATH.into()),
            }),
            None => Ok(Self::JoinToken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeAttestorConfig, String> {
        let table: toml::Table = text.parse().unwrap();
        NodeAttestorConfig::from_toml(table["node_attestor"].clone())
    }

    #[test]
    fn each_attestor_is_read() {
        assert_eq!(
            parse(
                "[node_attestor.x509pop]\ncertificate_path = \"/c.pem\"\nprivate_key_path = \"/k.pem\"\n"
            ),
            Ok(NodeAttestorConfig::X509Pop {
                certificate_path: "/c.pem".into(),
                private_key_path: "/k.pem".into(),
                intermediates_path: None,
            })
        );
        assert_eq!(
            parse("[node_attestor.k8s_psat]\ncluster = \"prod\"\n"),
            Ok(NodeAttestorConfig::K8sPsat {
                cluster: "prod".into(),
                token_path: DEFAULT_TOKEN_PATH.into(),
            })
        );
        assert_eq!(
            parse("[node_attestor.join_token]\n"),
            Ok(NodeAttestorConfig::JoinToken)
        );
    }

    #[test]
    fn mistakes_are_reported() {
        assert_eq!(
            parse("[node_attestor.k8s_psat]\ncluster = \"\"\n").unwrap_err(),
            "node_attestor.k8s_psat.cluster must not be empty"
        );
        assert!(
            parse("[node_attestor.x509pop]\ncertificate_path = \"/c.pem\"\n")
                .unwrap_err()
                .contains("missing field `private_key_path`")
        );
        assert!(
            parse("[node_attestor.tpm]\n")
                .unwrap_err()
                .contains("unknown field `tpm`")
        );
        assert_eq!(
            parse("[node_attestor.k8s_psat]\ncluster = \"a\"\n[node_attestor.x509pop]\ncertificate_path = \"/c\"\nprivate_key_path = \"/k\"\n").unwrap_err(),
            "node_attestor: set exactly one of [node_attestor.join_token], [node_attestor.x509pop], [node_attestor.k8s_psat]"
        );
    }

    #[test]
    fn the_example_configurations_load() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config");
        for (file, name) in [
            ("agent-x509pop.toml", "x509pop"),
            ("agent-k8s-psat.toml", "k8s_psat"),
        ] {
            let args = crate::config::RunArgs {
                config: Some(dir.join(file)),
                ..Default::default()
            };
            let config = crate::config::Config::load(args).unwrap();
            assert_eq!(config.node_attestor.name(), name, "{file}");
        }
    }

    #[test]
    fn a_join_token_with_another_attestor_is_a_mistake() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "trust_domain = \"example.org\"\nserver_address = \"s:1\"\njoin_token = \"t\"\n[node_attestor.k8s_psat]\ncluster = \"prod\"\n",
        )
        .unwrap();
        let args = crate::config::RunArgs {
            config: Some(path),
            ..Default::default()
        };
        let err = crate::config::Config::load(args).unwrap_err();
        assert_eq!(
            err.problems,
            [
                "join_token and join_token_file are for the join_token node attestor, and [node_attestor.k8s_psat] is set"
            ]
        );
    }
}
