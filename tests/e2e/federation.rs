//! Federation: an operator stores another trust domain's bundle with
//! `bundle set`; workloads whose entries federate with that trust domain
//! receive it on their open Workload API streams (the Rust `spiffe` crate,
//! go-spiffe and py-spiffe all parse it), workloads whose entries do not
//! never see it, and `bundle delete` removes it from the next message.

use std::process::Command;
use std::time::Duration;

use futures::StreamExt;

use crate::interop::{go_client, python_client};
use crate::support::*;

/// The next message of a workload's stream, within 30 s.
async fn next_context(
    stream: &mut (
             impl futures::Stream<Item = Result<spiffe::X509Context, spiffe::WorkloadApiError>> + Unpin
         ),
) -> spiffe::X509Context {
    tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("no message on the workload's stream within 30 s")
        .unwrap()
        .unwrap()
}

/// The trust domains of a context's bundle set, sorted.
fn trust_domains(context: &spiffe::X509Context) -> Vec<String> {
    let mut names: Vec<String> = context
        .bundle_set()
        .iter()
        .map(|(td, _)| td.to_string())
        .collect();
    names.sort();
    names
}

/// The SPIFFE IDs of a context's SVIDs, sorted.
fn svid_ids(context: &spiffe::X509Context) -> Vec<String> {
    let mut ids: Vec<String> = context
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    ids.sort();
    ids
}

/// The `bundles` counts a Go or Python interop program prints for `command`.
fn interop_bundles(mut command: Command, client: &str, agent: &Agent) -> serde_json::Value {
    let out = command
        .env("SPIFFE_ENDPOINT_SOCKET", agent.endpoint())
        .output()
        .unwrap();
    assert!(out.status.success(), "{client}: {}", stderr(&out));
    let line = stdout(&out);
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{client}: {e}: {line}"));
    v["bundles"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_bundle_reaches_federating_workloads_until_it_is_deleted() {
    let dir = scratch();
    let server = Server::start(dir.path());
    let foreign = server.set_foreign_bundle("other.org");

    let uid = own_uid_selector();
    let (token, agent_id) = server.token(&[]);
    server.create_entry("spiffe://example.org/db", &agent_id, &[uid.as_str()], &[]);
    let agent = Agent::start(&server, "agent", Some(&token));

    // The only entry does not federate: no foreign bundle, though one is
    // stored.
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let context = next_context(&mut stream).await;
    assert_eq!(svid_ids(&context), ["spiffe://example.org/db"]);
    assert_eq!(trust_domains(&context), ["example.org"]);

    // An entry federating with other.org: the open stream gets its SVID and
    // the other.org bundle.
    server.create_entry(
        "spiffe://example.org/web",
        &agent_id,
        &[uid.as_str()],
        &["--federates-with", "other.org"],
    );
    let context = next_context(&mut stream).await;
    assert_eq!(
        svid_ids(&context),
        ["spiffe://example.org/db", "spiffe://example.org/web"]
    );
    assert_eq!(trust_domains(&context), ["example.org", "other.org"]);
    let td = spiffe::TrustDomain::new("other.org").unwrap();
    let federated = context.bundle_set().get(&td).unwrap();
    let got: Vec<&[u8]> = federated.authorities().iter().map(|c| c.as_ref()).collect();
    assert_eq!(got, [foreign.cert().as_ref()]);
    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert_eq!(bundles.get(&td).unwrap().authorities().len(), 1);

    // go-spiffe and py-spiffe parse it too.
    let expected = serde_json::json!({"example.org": 1, "other.org": 1});
    for subcommand in ["fetch", "bundles"] {
        let mut go = Command::new(go_client());
        go.arg(subcommand);
        assert_eq!(interop_bundles(go, "go-spiffe", &agent), expected);
        let mut py = Command::new("python3");
        py.arg(python_client()).arg(subcommand);
        assert_eq!(interop_bundles(py, "py-spiffe", &agent), expected);
    }

    // Deleted: the next message lacks it.
    server.cli_ok(&["bundle", "delete", "--id", "spiffe://other.org"]);
    let context = next_context(&mut stream).await;
    assert_eq!(context.svids().len(), 2);
    assert_eq!(trust_domains(&context), ["example.org"]);
    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(bundles.get(&td).is_none());
}
