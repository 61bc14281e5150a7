//! The SPIFFE client libraries workloads already use fetch and parse SVIDs
//! and bundles from the agent: go-spiffe, the Python `spiffe` package and
//! the Rust `spiffe` crate, each unmodified.

use std::path::PathBuf;
use std::process::Command;

use crate::support::*;

/// The go-spiffe client program (tests/interop/go), built by `tests/run`.
pub fn go_client() -> PathBuf {
    let path = std::env::var_os("SIGIL_INTEROP_GO")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/go/bin/sigil-interop-go")
        });
    assert!(
        path.exists(),
        "{} is missing: run ./tests/run, which builds it",
        path.display()
    );
    path
}

/// The py-spiffe client program (tests/interop/python).
pub fn python_client() -> PathBuf {
    std::env::var_os("SIGIL_INTEROP_PY")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/python/sigil_interop.py")
        })
}

/// Checks the JSON the Go and Python programs print for `fetch`.
fn assert_fetch_output(
    client: &str,
    out: &std::process::Output,
    expected_id: &str,
    expected_hint: &str,
) {
    assert!(out.status.success(), "{client}: {}", stderr(out));
    let line = stdout(out);
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{client}: {e}: {line}"));
    let svids = v["svids"].as_array().unwrap();
    assert_eq!(svids.len(), 1, "{client}: {line}");
    assert_eq!(svids[0]["spiffe_id"], expected_id, "{client}");
    assert_eq!(svids[0]["hint"], expected_hint, "{client}");
    assert_eq!(svids[0]["chain_len"], 1, "{client}");
    assert_eq!(
        v["bundles"]["example.org"], 1,
        "{client}: one CA in the bundle"
    );
}

#[test]
fn go_spiffe_fetches_and_verifies() {
    let go = go_client();
    let uid = own_uid_selector();
    let domain = Domain::start(&[("/go", &[uid.as_str()], &["--hint", "internal"])]);

    let out = Command::new(&go)
        .arg("fetch")
        .env("SPIFFE_ENDPOINT_SOCKET", domain.agent.endpoint())
        .output()
        .unwrap();
    assert_fetch_output("go-spiffe", &out, "spiffe://example.org/go", "internal");

    let bundles = Command::new(&go)
        .arg("bundles")
        .env("SPIFFE_ENDPOINT_SOCKET", domain.agent.endpoint())
        .output()
        .unwrap();
    assert!(bundles.status.success(), "{}", stderr(&bundles));
    let v: serde_json::Value = serde_json::from_str(stdout(&bundles).trim()).unwrap();
    assert_eq!(v["bundles"]["example.org"], 1);
}

#[test]
fn py_spiffe_fetches_and_verifies() {
    let uid = own_uid_selector();
    let domain = Domain::start(&[("/py", &[uid.as_str()], &["--hint", "internal"])]);

    let out = Command::new("python3")
        .arg(python_client())
        .arg("fetch")
        .env("SPIFFE_ENDPOINT_SOCKET", domain.agent.endpoint())
        .output()
        .unwrap();
    // py-spiffe does not expose hints.
    assert_fetch_output("py-spiffe", &out, "spiffe://example.org/py", "");

    let bundles = Command::new("python3")
        .arg(python_client())
        .arg("bundles")
        .env("SPIFFE_ENDPOINT_SOCKET", domain.agent.endpoint())
        .output()
        .unwrap();
    assert!(bundles.status.success(), "{}", stderr(&bundles));
    let v: serde_json::Value = serde_json::from_str(stdout(&bundles).trim()).unwrap();
    assert_eq!(v["bundles"]["example.org"], 1);
}

#[tokio::test]
async fn rust_spiffe_crate_fetches_svids_and_bundles() {
    let uid = own_uid_selector();
    let domain = Domain::start(&[("/rust", &[uid.as_str()], &["--hint", "internal"])]);

    let client = spiffe::WorkloadApiClient::connect_to(domain.agent.endpoint())
        .await
        .unwrap();
    let context = client.fetch_x509_context().await.unwrap();
    let svid = context.default_svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/rust");
    assert_eq!(svid.hint(), Some("internal"));

    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let bundle = context.bundle_set().get(&td).unwrap();
    let server_bundle = pem::parse_many(domain.server.bundle_pem().as_bytes()).unwrap();
    let got: Vec<&[u8]> = bundle.authorities().iter().map(|c| c.as_ref()).collect();
    let want: Vec<&[u8]> = server_bundle.iter().map(|p| p.contents()).collect();
    assert_eq!(got, want);

    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert_eq!(bundles.get(&td).unwrap().authorities().len(), 1);
}
