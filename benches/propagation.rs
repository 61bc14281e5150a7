//! Entry propagation: the time from an admin API change (create, update of
//! the DNS names, update of the hint only, delete) returning to the
//! workload's open Workload API stream carrying it, against real
//! `sigil-server` and `sigil-agent` processes. A create or a DNS change
//! includes the agent's key generation and the server's signing; a hint
//! change only re-publishes; a delete only removes.
//!
//! Run: `cargo build --release --workspace --bins &&
//! cargo bench --bench propagation`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    reason = "benchmark harness"
)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use sigil::proto::sigil::admin::v1::admin_client::AdminClient;
use sigil::proto::sigil::admin::v1::{
    BatchCreateEntryRequest, BatchDeleteEntryRequest, BatchUpdateEntryRequest,
    CreateJoinTokenRequest, GetBundleRequest,
};
use sigil::proto::sigil::types::v1 as pb;
use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil::proto::workload::{X509svidRequest, X509svidResponse};
use tokio::time::Instant;
use tonic::transport::Channel;

/// Rounds of create, DNS update, hint update and delete: 400 changes.
const ROUNDS: usize = 100;

/// The most a change may take to reach the stream at the 99th percentile.
const TARGET_P99: Duration = Duration::from_secs(1);

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, address, mut admin) = start_server(dir.path()).await;

    let token = admin
        .create_join_token(CreateJoinTokenRequest {
            agent_id: format!("spiffe://{TD}/node/bench"),
            ttl: 600,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let agent_id = token.agent_id.clone();
    create(&mut admin, entry(&agent_id, "base", None)).await;
    let bundle = admin
        .get_bundle(GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let pem: String = bundle
        .x509_authorities
        .iter()
        .map(|c| sigil::bundle::cert_to_pem(c))
        .collect();
    std::fs::write(dir.path().join("bootstrap.pem"), pem).unwrap();

    let socket = dir.path().join("api.sock");
    let agent_data = dir.path().join("agent");
    let mut agent = Command::new(bin("sigil-agent"))
        .args([
            "run",
            "--trust-domain",
            TD,
            "--server-address",
            &address,
            "--log-level",
            "warn",
        ])
        .arg("--trust-bundle-path")
        .arg(dir.path().join("bootstrap.pem"))
        .args(["--join-token", &token.token])
        .arg("--data-dir")
        .arg(&agent_data)
        .arg("--socket-path")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_for_file(&agent_data.join("ready"), &mut agent);
    let _agent = Process(agent);

    let channel = sigil::transport::unix_channel(&socket).await.unwrap();
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let mut request = tonic::Request::new(X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut stream = client.fetch_x509svid(request).await.unwrap().into_inner();
    let base_id = format!("spiffe://{TD}/base");
    next_until(&mut stream, |m| find(m, &base_id).is_some()).await;

    println!(
        "machine: {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut create_t = Vec::new();
    let mut dns_t = Vec::new();
    let mut hint_t = Vec::new();
    let mut delete_t = Vec::new();
    for round in 0..ROUNDS {
        let path = format!("live/{round}");
        let id = format!("spiffe://{TD}/{path}");

        let started = Instant::now();
        let created = create(&mut admin, entry(&agent_id, &path, None)).await;
        create_t.push(next_until(&mut stream, |m| find(m, &id).is_some()).await - started);

        let mut changed = entry(&agent_id, &path, Some(&format!("live{round}.{TD}")));
        changed.id = created.id.clone();
        let started = Instant::now();
        update(&mut admin, changed.clone()).await;
        let mut resigned = Vec::new();
        dns_t.push(
            next_until(&mut stream, |m| {
                let svid = find(m, &id).filter(|s| has_dns(&s.x509_svid));
                if let Some(svid) = svid {
                    resigned = svid.x509_svid.clone();
                }
                svid.is_some()
            })
            .await
                - started,
        );

        changed.hint = format!("hint-{round}");
        let started = Instant::now();
        update(&mut admin, changed).await;
        let hint = format!("hint-{round}");
        let mut served = Vec::new();
        hint_t.push(
            next_until(&mut stream, |m| {
                let svid = find(m, &id).filter(|s| s.hint == hint);
                if let Some(svid) = svid {
                    served = svid.x509_svid.clone();
                }
                svid.is_some()
            })
            .await
                - started,
        );
        assert_eq!(served, resigned, "a hint change must not re-sign");

        let started = Instant::now();
        admin
            .batch_delete_entry(BatchDeleteEntryRequest {
                ids: vec![created.id.clone()],
            })
            .await
            .unwrap();
        delete_t.push(next_until(&mut stream, |m| find(m, &id).is_none()).await - started);
    }

    let mut all = Vec::new();
    for (name, samples) in [
        ("create", &mut create_t),
        ("update dns_names (re-signed)", &mut dns_t),
        ("update hint only (no re-signing)", &mut hint_t),
        ("delete", &mut delete_t),
    ] {
        all.extend_from_slice(samples);
        report(name, samples);
    }
    let p99 = report("all changes", &mut all);
    println!(
        "target: p99 under {} ms: {}",
        TARGET_P99.as_millis(),
        if p99 < TARGET_P99 { "met" } else { "not met" }
    );
}

/// Prints the percentiles of `samples`; returns the 99th.
fn report(name: &str, samples: &mut [Duration]) -> Duration {
    samples.sort();
    println!(
        "admin change -> Workload API stream, {name}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
        percentile(samples, 0.50).as_secs_f64() * 1e3,
        percentile(samples, 0.99).as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3,
        samples.len()
    );
    percentile(samples, 0.99)
}

fn entry(agent_id: &str, path: &str, dns: Option<&str>) -> pb::Entry {
    let uid = nix::unistd::getuid().as_raw();
    pb::Entry {
        spiffe_id: format!("spiffe://{TD}/{path}"),
        parent_id: agent_id.to_owned(),
        selectors: vec![pb::Selector {
            r#type: "unix".into(),
            value: format!("uid:{uid}"),
        }],
        dns_names: dns.map(|d| vec![d.to_owned()]).unwrap_or_default(),
        ..Default::default()
    }
}

async fn create(admin: &mut AdminClient<Channel>, entry: pb::Entry) -> pb::Entry {
    let mut response = admin
        .batch_create_entry(BatchCreateEntryRequest {
            entries: vec![entry],
        })
        .await
        .unwrap()
        .into_inner();
    response.results.remove(0).entry.unwrap()
}

async fn update(admin: &mut AdminClient<Channel>, entry: pb::Entry) {
    let response = admin
        .batch_update_entry(BatchUpdateEntryRequest {
            entries: vec![entry],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.results[0].entry.is_some(), "{response:?}");
}

fn find<'m>(
    message: &'m X509svidResponse,
    spiffe_id: &str,
) -> Option<&'m sigil::proto::workload::X509svid> {
    message.svids.iter().find(|s| s.spiffe_id == spiffe_id)
}

fn has_dns(chain: &[u8]) -> bool {
    let (_, leaf) = x509_parser::parse_x509_certificate(chain).unwrap();
    leaf.subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value
                .general_names
                .iter()
                .any(|n| matches!(n, x509_parser::extensions::GeneralName::DNSName(_)))
        })
}

/// Reads messages until one satisfies `done`; returns when it arrived.
/// Fails after 30 s.
async fn next_until(
    stream: &mut tonic::Streaming<X509svidResponse>,
    mut done: impl FnMut(&X509svidResponse) -> bool,
) -> Instant {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("no change within 30 s")
            .unwrap()
            .unwrap();
        if done(&message) {
            return Instant::now();
        }
    }
}
