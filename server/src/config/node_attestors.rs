//! The `[node_attestors]` section of the configuration: the node
//! attestors besides `join_token` and the files they read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::JwkSet;
use rustls_pki_types::CertificateDer;
use sigil::TrustDomain;

use super::{string_key, unknown_keys};
use crate::attest::{k8s_psat, x509pop};

/// The `[node_attestors]` section: the node attestors besides
/// `join_token`, which is always on.
#[derive(Debug, Clone, Default)]
pub(crate) struct NodeAttestorsConfig {
    /// `[node_attestors.x509pop]`.
    pub(crate) x509pop: Option<X509PopConfig>,
    /// `[node_attestors.k8s_psat]`.
    pub(crate) k8s_psat: Option<K8sPsatConfig>,
}

/// `[node_attestors.x509pop]`.
#[derive(Debug, Clone)]
pub(crate) struct X509PopConfig {
    /// The PEM file of the CAs that issue node certificates.
    pub(crate) ca_bundle_path: PathBuf,
    /// Its certificates, read and checked.
    pub(crate) ca_certs: Vec<CertificateDer<'static>>,
    /// The agent ID path, with `{fingerprint}` and `{subject_cn}`.
    pub(crate) agent_path_template: String,
}

/// `[node_attestors.k8s_psat]`.
#[derive(Debug, Clone)]
pub(crate) struct K8sPsatConfig {
    /// `[node_attestors.k8s_psat.clusters.<name>]`, by name.
    pub(crate) clusters: BTreeMap<String, K8sPsatClusterConfig>,
}

/// One cluster of `k8s_psat`.
#[derive(Debug, Clone)]
pub(crate) struct K8sPsatClusterConfig {
    /// The audience tokens must name.
    pub(crate) audience: String,
    /// Where the token signing keys come from.
    pub(crate) keys: K8sPsatKeys,
    /// The agents' service accounts, `namespace:name`.
    pub(crate) allowed_service_accounts: BTreeSet<String>,
}

/// Where a cluster's token signing keys come from.
#[derive(Debug, Clone)]
pub(crate) enum K8sPsatKeys {
    /// A JWKS file, read and checked, and the issuer tokens must name.
    Jwks {
        /// The file.
        path: PathBuf,
        /// Its keys.
        jwks: JwkSet,
        /// The required `iss`.
        issuer: String,
    },
    /// An OIDC issuer: its keys come from discovery, whose document must
    /// name it as `issuer`, and tokens must name it as `iss`.
    IssuerUrl(String),
}

impl K8sPsatClusterConfig {
    /// The `iss` tokens must have.
    pub(crate) fn issuer(&self) -> &str {
        match &self.keys {
            K8sPsatKeys::Jwks { issuer, .. } => issuer,
            K8sPsatKeys::IssuerUrl(url) => url,
        }
    }
}

/// Parses and checks the `[node_attestors]` table, reading the files it
/// names.
pub(crate) fn node_attestors(
    td: &TrustDomain,
    table: toml::Table,
    problems: &mut Vec<String>,
) -> NodeAttestorsConfig {
    let mut config = NodeAttestorsConfig::default();
    for (name, value) in table {
        let key = format!("node_attestors.{name}");
        let toml::Value::Table(section) = value else {
            problems.push(format!("{key}: expected a table"));
            continue;
        };
        match name.as_str() {
            x509pop::NAME => config.x509pop = x509pop_config(td, &key, section, problems),
            k8s_psat::NAME => config.k8s_psat = k8s_psat_config(&key, section, problems),
            "join_token" => problems.push(format!(
                "{key}: join_token is always enabled and has no settings"
            )),
            _ => problems.push(format!(
                "{key}: unknown node attestor (known: x509pop, k8s_psat)"
            )),
        }
    }
    config
}

fn x509pop_config(
    td: &TrustDomain,
    prefix: &str,
    mut section: toml::Table,
    problems: &mut Vec<String>,
) -> Option<X509PopConfig> {
    let path = string_key(&mut section, prefix, "ca_bundle_path", problems);
    let template = string_key(&mut section, prefix, "agent_path_template", problems)
        .unwrap_or_else(|| x509pop::DEFAULT_PATH_TEMPLATE.to_owned());
    unknown_keys(&section, prefix, problems);
    let mut ok = true;
    if let Err(e) = x509pop::check_template(td, &template) {
        problems.push(format!("{prefix}.agent_path_template: {template:?} {e}"));
        ok = false;
    }
    let Some(path) = path else {
        problems.push(format!("{prefix}.ca_bundle_path: is required"));
        return None;
    };
    let path = PathBuf::from(path);
    let certs = match read_ca_bundle(&path) {
        Ok(certs) => certs,
        Err(e) => {
            problems.push(format!("{prefix}.ca_bundle_path: {}: {e}", path.display()));
            return None;
        }
    };
    ok.then_some(X509PopConfig {
        ca_bundle_path: path,
        ca_certs: certs,
        agent_path_template: template,
    })
}

/// Reads a PEM file of CA certificates usable as trust anchors.
fn read_ca_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let blocks = pem::parse_many(&pem).map_err(|e| format!("not PEM: {e}"))?;
    let mut certs = Vec::new();
    for (i, block) in blocks.into_iter().enumerate() {
        if block.tag() != "CERTIFICATE" {
            continue;
        }
        let der = CertificateDer::from(block.into_contents());
        webpki::anchor_from_trusted_cert(&der)
            .map_err(|e| format!("certificate {i} is not usable as a CA: {e}"))?;
        certs.push(der);
    }
    if certs.is_empty() {
        return Err("has no certificate".into());
    }
    Ok(certs)
}

fn k8s_psat_config(
    prefix: &str,
    mut section: toml::Table,
    problems: &mut Vec<String>,
) -> Option<K8sPsatConfig> {
    let clusters = section.remove("clusters");
    unknown_keys(&section, prefix, problems);
    let Some(toml::Value::Table(clusters)) = clusters else {
        problems.push(format!(
            "{prefix}.clusters: at least one [{prefix}.clusters.<name>] table is required"
        ));
        return None;
    };
    let mut out = BTreeMap::new();
    let count = clusters.len();
    for (name, value) in clusters {
        let key = format!("{prefix}.clusters.{name}");
        let valid_name = !name.is_empty()
            && name != "."
            && name != ".."
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !valid_name {
            problems.push(format!(
                "{key}: a cluster name has only letters, digits, `.`, `-` and `_` (it is part of agent IDs)"
            ));
            continue;
        }
        let toml::Value::Table(cluster) = value else {
            problems.push(format!("{key}: expected a table"));
            continue;
        };
        if let Some(c) = k8s_psat_cluster(&key, cluster, problems) {
            out.insert(name, c);
        }
    }
    if count == 0 {
        problems.push(format!(
            "{prefix}.clusters: at least one [{prefix}.clusters.<name>] table is required"
        ));
    }
    (out.len() == count && count > 0).then_some(K8sPsatConfig { clusters: out })
}

fn k8s_psat_cluster(
    prefix: &str,
    mut section: toml::Table,
    problems: &mut Vec<String>,
) -> Option<K8sPsatClusterConfig> {
    let before = problems.len();
    let audience = string_key(&mut section, prefix, "audience", problems)
        .unwrap_or_else(|| k8s_psat::DEFAULT_AUDIENCE.to_owned());
    if audience.is_empty() {
        problems.push(format!("{prefix}.audience: must not be empty"));
    }
    let jwks_path = string_key(&mut section, prefix, "jwks_path", problems);
    let issuer_url = string_key(&mut section, prefix, "issuer_url", problems);
    let issuer = string_key(&mut section, prefix, "issuer", problems);
    let accounts = match section.remove("allowed_service_accounts") {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items
            .into_iter()
            .filter_map(|item| match item {
                toml::Value::String(s) => Some(s),
                other => {
                    problems.push(format!(
                        "{prefix}.allowed_service_accounts: expected strings, found {}",
                        other.type_str()
                    ));
                    None
                }
            })
            .collect(),
        Some(other) => {
            problems.push(format!(
                "{prefix}.allowed_service_accounts: expected an array, found {}",
                other.type_str()
            ));
            Vec::new()
        }
    };
    unknown_keys(&section, prefix, problems);
    if accounts.is_empty() {
        problems.push(format!(
            "{prefix}.allowed_service_accounts: must list at least one \"namespace:name\""
        ));
    }
    for account in &accounts {
        let well_formed = account
            .split_once(':')
            .is_some_and(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains(':'));
        if !well_formed {
            problems.push(format!(
                "{prefix}.allowed_service_accounts: {account:?} is not \"namespace:name\""
            ));
        }
    }
    let keys = match (jwks_path, issuer_url) {
        (Some(_), Some(_)) => {
            problems.push(format!(
                "{prefix}: set only one of jwks_path and issuer_url"
            ));
            None
        }
        (None, None) => {
            problems.push(format!("{prefix}: jwks_path or issuer_url is required"));
            None
        }
        (Some(path), None) => {
            let path = PathBuf::from(path);
            let jwks = match read_jwks(&path) {
                Ok(jwks) => Some(jwks),
                Err(e) => {
                    problems.push(format!("{prefix}.jwks_path: {}: {e}", path.display()));
                    None
                }
            };
            let issuer = match issuer {
                None => {
                    problems.push(format!(
                        "{prefix}.issuer: is required with jwks_path: the `iss` claim the tokens must have"
                    ));
                    None
                }
                Some(issuer) if issuer.is_empty() => {
                    problems.push(format!("{prefix}.issuer: must not be empty"));
                    None
                }
                Some(issuer) => Some(issuer),
            };
            jwks.zip(issuer)
                .map(|(jwks, issuer)| K8sPsatKeys::Jwks { path, jwks, issuer })
        }
        (None, Some(url)) => {
            if let Some(issuer) = issuer.filter(|issuer| *issuer != url) {
                problems.push(format!(
                    "{prefix}.issuer: {issuer:?} is not issuer_url {url:?}: with issuer_url, the discovery document and the tokens must name issuer_url as issuer"
                ));
            }
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                problems.push(format!(
                    "{prefix}.issuer_url: {url:?} must be an http or https URL"
                ));
            }
            Some(K8sPsatKeys::IssuerUrl(url))
        }
    };
    match keys {
        Some(keys) if problems.len() == before => Some(K8sPsatClusterConfig {
            audience,
            keys,
            allowed_service_accounts: accounts.into_iter().collect(),
        }),
        _ => None,
    }
}

/// Reads a JWKS file of keys that can verify tokens.
fn read_jwks(path: &Path) -> Result<JwkSet, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let jwks: JwkSet = serde_json::from_slice(&text).map_err(|e| format!("not a JWKS: {e}"))?;
    k8s_psat::check_jwks(&jwks)?;
    Ok(jwks)
}

#[cfg(test)]
mod tests;
