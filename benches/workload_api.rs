//! Workload API FetchX509SVID: time to the first response, p50 and p99, with
//! 1 and 50 concurrent clients, against real `sigil-server` and
//! `sigil-agent` processes. Each sample opens a new stream on the client's
//! connection and waits for its first message, as a one-shot fetch does.
//!
//! Run: `cargo build --release -p sigil-server -p sigil-agent &&
//! cargo bench --bench workload_api`.

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
use sigil::proto::sigil::admin::v1::{
    BatchCreateEntryRequest, CreateJoinTokenRequest, GetBundleRequest,
};
use sigil::proto::sigil::types::v1 as pb;
use sigil::proto::workload::X509svidRequest;
use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::time::Instant;

const SAMPLES_PER_RUN: usize = 4000;

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
    let uid = nix::unistd::getuid().as_raw();
    admin
        .batch_create_entry(BatchCreateEntryRequest {
            entries: vec![pb::Entry {
                spiffe_id: format!("spiffe://{TD}/bench"),
                parent_id: token.agent_id.clone(),
                selectors: vec![pb::Selector {
                    r#type: "unix".into(),
                    value: format!("uid:{uid}"),
                }],
                ..Default::default()
            }],
        })
        .await
        .unwrap();
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

    println!(
        "machine: {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    // Paced: each client fetches every PACE, as workloads do when they
    // start or reconnect; 50 clients then make 1000 fetches per second.
    for clients in [1usize, 50] {
        report(&socket, clients, Some(PACE)).await;
    }
    // Back to back: every client fetches again as soon as it has its answer.
    // With one client this is the agent's own latency on a busy (not idle)
    // machine; with 50 the two cores saturate and latency is queueing behind
    // the other clients (Little's law).
    for clients in [1usize, 50] {
        report(&socket, clients, None).await;
    }
}

/// The interval between two fetches of one paced client.
const PACE: Duration = Duration::from_millis(50);

async fn report(socket: &std::path::Path, clients: usize, pace: Option<Duration>) {
    let per_client = match pace {
        Some(_) => 200,
        None => SAMPLES_PER_RUN / clients,
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let socket = socket.to_path_buf();
        tasks.push(tokio::spawn(async move {
            let channel = sigil::transport::unix_channel(socket).await.unwrap();
            let mut client = SpiffeWorkloadApiClient::new(channel);
            // One warm-up fetch per client.
            first_response(&mut client).await;
            let mut ticks = pace.map(|pace| {
                // Spread the clients' ticks across the interval.
                let offset = pace * u32::try_from(i).unwrap() / u32::try_from(clients).unwrap();
                let mut ticks = tokio::time::interval_at(Instant::now() + offset, pace);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticks
            });
            let mut samples = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                if let Some(ticks) = ticks.as_mut() {
                    ticks.tick().await;
                }
                samples.push(first_response(&mut client).await);
            }
            samples
        }));
    }
    let mut samples: Vec<Duration> = Vec::new();
    for t in tasks {
        samples.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    samples.sort();
    let mode = match pace {
        Some(pace) => format!("paced, one fetch per client every {} ms", pace.as_millis()),
        None => format!(
            "back to back, {:.0} fetches/s",
            samples.len() as f64 / elapsed.as_secs_f64()
        ),
    };
    println!(
        "FetchX509SVID first response, {clients:>2} clients ({mode}): p50 {:.3} ms, p99 {:.3} ms ({} samples)",
        percentile(&samples, 0.50).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.len()
    );
}

async fn first_response(
    client: &mut SpiffeWorkloadApiClient<tonic::transport::Channel>,
) -> Duration {
    let mut request = tonic::Request::new(X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let started = Instant::now();
    let mut stream = client.fetch_x509svid(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let elapsed = started.elapsed();
    assert!(!first.svids.is_empty());
    elapsed
}
