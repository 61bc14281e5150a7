//! Tests of the `[node_attestors]` section.

use std::path::Path;

use super::*;
use crate::attest::testing::{NodeCa, TokenIssuer};
use crate::config::{Config, ConfigErrors, RunArgs, from_sources};

fn file(text: &str) -> Result<Config, ConfigErrors> {
    let text = format!("trust_domain = \"example.org\"\n{text}");
    from_sources(&RunArgs::default(), Some((Path::new("server.toml"), &text)))
}

fn quoted(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

#[test]
fn node_attestors_are_off_unless_configured() {
    let config = file("").unwrap();
    assert!(config.node_attestors.x509pop.is_none());
    assert!(config.node_attestors.k8s_psat.is_none());
}

#[test]
fn x509pop_and_k8s_psat_are_read_with_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("node-ca.pem");
    std::fs::write(&ca, NodeCa::root("Node CA").pem()).unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, TokenIssuer::new("k1").jwks()).unwrap();
    let config = file(&format!(
        "[node_attestors.x509pop]\nca_bundle_path = {}\nagent_path_template = \"/node/{{subject_cn}}\"\n\
         [node_attestors.k8s_psat.clusters.prod]\njwks_path = {}\nissuer = \"https://k8s.prod.test\"\nallowed_service_accounts = [\"sigil:sigil-agent\"]\n\
         [node_attestors.k8s_psat.clusters.dev]\nissuer_url = \"https://oidc.dev.test\"\naudience = \"sigil\"\nallowed_service_accounts = [\"sigil:agent\"]\n",
        quoted(&ca),
        quoted(&jwks)
    ))
    .unwrap();
    let x509pop = config.node_attestors.x509pop.unwrap();
    assert_eq!(x509pop.ca_certs.len(), 1);
    assert_eq!(x509pop.agent_path_template, "/node/{subject_cn}");
    let clusters = config.node_attestors.k8s_psat.unwrap().clusters;
    let prod = &clusters["prod"];
    assert_eq!(prod.audience, "sigil-server");
    assert_eq!(prod.issuer(), "https://k8s.prod.test");
    assert!(matches!(&prod.keys, K8sPsatKeys::Jwks { jwks, .. } if jwks.keys.len() == 1));
    let dev = &clusters["dev"];
    assert_eq!(dev.audience, "sigil");
    assert_eq!(dev.issuer(), "https://oidc.dev.test");
    assert_eq!(
        dev.allowed_service_accounts.iter().collect::<Vec<_>>(),
        ["sigil:agent"]
    );
}

#[test]
fn every_node_attestor_problem_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let bad_jwks = dir.path().join("bad.json");
    std::fs::write(
        &bad_jwks,
        "{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}",
    )
    .unwrap();
    let err = file(&format!(
        "[node_attestors.x509pop]\nca_bundle_path = {}\nagent_path_template = \"/n/{{host}}\"\n\
         [node_attestors.tpm]\n\
         [node_attestors.k8s_psat.clusters.a]\njwks_path = {}\nallowed_service_accounts = []\n\
         [node_attestors.k8s_psat.clusters.b]\njwks_path = {}\nissuer_url = \"https://x\"\nallowed_service_accounts = [\"nocolon\"]\n\
         [node_attestors.k8s_psat.clusters.\"bad/name\"]\n",
        quoted(&missing),
        quoted(&bad_jwks),
        quoted(&bad_jwks)
    ))
    .unwrap_err();
    let expected_prefixes = [
        "node_attestors.x509pop.agent_path_template: \"/n/{host}\" unknown placeholder {host}",
        &format!(
            "node_attestors.x509pop.ca_bundle_path: {}: cannot read: ",
            missing.display()
        ),
        "node_attestors.tpm: unknown node attestor (known: x509pop, k8s_psat)",
        "node_attestors.k8s_psat.clusters.a.allowed_service_accounts: must list at least one \"namespace:name\"",
        "node_attestors.k8s_psat.clusters.a.issuer: is required with jwks_path: the `iss` claim the tokens must have",
        &format!(
            "node_attestors.k8s_psat.clusters.a.jwks_path: {}: keys[0]: symmetric keys are not accepted",
            bad_jwks.display()
        ),
        "node_attestors.k8s_psat.clusters.b.allowed_service_accounts: \"nocolon\" is not \"namespace:name\"",
        "node_attestors.k8s_psat.clusters.b: set only one of jwks_path and issuer_url",
        "node_attestors.k8s_psat.clusters.bad/name: a cluster name has only letters",
    ];
    assert_eq!(err.0.len(), expected_prefixes.len(), "{err}");
    for prefix in expected_prefixes {
        assert!(
            err.0.iter().any(|p| p.starts_with(prefix)),
            "missing {prefix:?} in {err}"
        );
    }
}

#[test]
fn a_jwks_that_is_not_json_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, "not json").unwrap();
    let err = file(&format!(
        "[node_attestors.k8s_psat.clusters.prod]\njwks_path = {}\nissuer = \"https://k8s.test\"\nallowed_service_accounts = [\"a:b\"]\n",
        quoted(&jwks)
    ))
    .unwrap_err();
    assert_eq!(err.0.len(), 1, "{err}");
    assert!(
        err.0[0].starts_with(&format!(
            "node_attestors.k8s_psat.clusters.prod.jwks_path: {}: not a JWKS: ",
            jwks.display()
        )),
        "{err}"
    );
}

#[test]
fn every_k8s_psat_cluster_has_an_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, TokenIssuer::new("k1").jwks()).unwrap();
    let cluster = |name: &str, keys: &str| {
        format!(
            "[node_attestors.k8s_psat.clusters.{name}]\n{keys}\nallowed_service_accounts = [\"a:b\"]\n"
        )
    };
    let with_jwks = |issuer: &str| format!("jwks_path = {}\n{issuer}", quoted(&jwks));

    let err = file(&format!(
        "{}{}{}",
        cluster("unset", &with_jwks("")),
        cluster("empty", &with_jwks("issuer = \"\"")),
        cluster(
            "other",
            "issuer_url = \"https://oidc.test\"\nissuer = \"https://k8s.test\""
        ),
    ))
    .unwrap_err();
    let mut got = err.0.clone();
    got.sort();
    assert_eq!(
        got,
        [
            "node_attestors.k8s_psat.clusters.empty.issuer: must not be empty",
            "node_attestors.k8s_psat.clusters.other.issuer: \"https://k8s.test\" is not issuer_url \"https://oidc.test\": with issuer_url, the discovery document and the tokens must name issuer_url as issuer",
            "node_attestors.k8s_psat.clusters.unset.issuer: is required with jwks_path: the `iss` claim the tokens must have",
        ],
        "{err}"
    );

    // issuer_url is the issuer; repeating it as issuer is allowed.
    let config = file(&format!(
        "{}{}",
        cluster(
            "same",
            "issuer_url = \"https://oidc.test\"\nissuer = \"https://oidc.test\""
        ),
        cluster("url", "issuer_url = \"https://oidc2.test\""),
    ))
    .unwrap();
    let clusters = config.node_attestors.k8s_psat.unwrap().clusters;
    assert_eq!(clusters["same"].issuer(), "https://oidc.test");
    assert_eq!(clusters["url"].issuer(), "https://oidc2.test");
}

#[test]
fn the_example_configurations_load() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config");
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("node-ca.pem");
    std::fs::write(&ca, NodeCa::root("Node CA").pem()).unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, TokenIssuer::new("k1").jwks()).unwrap();
    let load = |name: &str| {
        let text = std::fs::read_to_string(examples.join(name))
            .unwrap()
            .replace("/etc/sigil/node-ca.pem", &ca.display().to_string())
            .replace("/etc/sigil/lab-sa-jwks.json", &jwks.display().to_string());
        from_sources(&RunArgs::default(), Some((Path::new(name), &text))).unwrap()
    };
    let x509pop = load("server-x509pop.toml").node_attestors.x509pop.unwrap();
    assert_eq!(
        x509pop.agent_path_template,
        "/sigil/agent/x509pop/{subject_cn}"
    );
    let psat = load("server-k8s-psat.toml")
        .node_attestors
        .k8s_psat
        .unwrap();
    assert_eq!(psat.clusters.keys().collect::<Vec<_>>(), ["lab", "prod"]);
    assert_eq!(
        psat.clusters["lab"].issuer(),
        "https://kubernetes.default.svc.cluster.local"
    );
    assert_eq!(
        psat.clusters["prod"].issuer(),
        "https://oidc.prod.example.org"
    );
}
