//! Workload attestation with the k8s attestor: the time the production
//! attestor (`K8sAttestor::collect`) takes to turn a process's cgroup into
//! its `k8s:` selectors, against a local HTTPS kubelet stand-in serving the
//! kubelet's real `/pods` format (the one the attestor's unit tests use).
//!
//! - warm: the caller's container is in the pod list already fetched (the
//!   common case: cgroup parsing, a hash lookup and the selectors' checks);
//! - cold: the caller's container is not in the list, so the lookup fetches
//!   the pod list once (TLS connection, `GET /pods`, JSON, index) before it
//!   answers `NotListed`; measured with the recorded two-pod list and with
//!   a list of 110 pods (the kubelet's default `maxPods`).
//!
//! The cgroup given to the attestor is what `/proc/<pid>/cgroup` holds for
//! a containerd container with the systemd cgroup driver on cgroup v2.
//!
//! Run: `cargo bench -p sigil-agent --bench attestation`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    reason = "benchmark harness"
)]

use std::time::Duration;

use sigil::Selectors;
use sigil_agent::workload::attestor::Facts;
use sigil_agent::workload::attestor::k8s::{K8sAttestor, K8sConfig, K8sError, KubeletUrl};
use tokio::time::Instant;

#[allow(dead_code, reason = "the attestor's unit tests use the rest")]
#[path = "../src/workload/attestor/k8s/tests/kubelet.rs"]
mod kubelet;

use kubelet::{Kubelet, PODS};

/// The `web` container of the recorded pod list, and its pod.
const WEB: &str = "3f4b2c1d9e8a7f6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b";
const WEB_POD: &str = "7d2a6c3e-91b4-4f0a-8e5d-2b1c9a8f7e6d";
/// A container the kubelet does not list.
const UNLISTED: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

const WARM_SAMPLES: usize = 20_000;
const COLD_SAMPLES: usize = 300;
const MAX_PODS: usize = 110;

#[tokio::main]
async fn main() {
    let kubelet = Kubelet::start().await;
    let config = K8sConfig {
        // No background refresh during the measurements.
        refresh_interval: Duration::from_secs(3600),
        ..kubelet.config()
    };
    let attestor = K8sAttestor::new(&config).unwrap();
    let web = facts(WEB_POD, WEB);
    let unlisted = facts(WEB_POD, UNLISTED);

    // The first lookup waits for the first fetch; the list is warm after.
    let selectors = collect(&attestor, &web).await.unwrap();
    assert_eq!(selectors.len(), 11, "{selectors:?}");
    assert!(
        selectors
            .iter()
            .any(|s| s.to_string() == "k8s:pod-name:web-7c9f8d6b5-x2lqp")
    );
    println!(
        "k8s workload attestation ({} selectors per caller)",
        selectors.len()
    );

    let warm = measure(WARM_SAMPLES, || collect(&attestor, &web)).await;
    report("warm lookup, 2 pods listed", &warm);

    let cold = measure(COLD_SAMPLES, || unlisted_lookup(&attestor, &unlisted)).await;
    report("cold (fetch), 2 pods listed", &cold);

    *kubelet.body.lock().unwrap() = many_pods(MAX_PODS);
    let cold = measure(COLD_SAMPLES, || unlisted_lookup(&attestor, &unlisted)).await;
    report(&format!("cold (fetch), {MAX_PODS} pods listed"), &cold);

    // The web pod is still listed (the first pod of the bigger list).
    let warm = measure(WARM_SAMPLES, || collect(&attestor, &web)).await;
    report(&format!("warm lookup, {MAX_PODS} pods listed"), &warm);
}

/// What `/proc/<pid>/cgroup` holds for container `id` of pod `pod_uid`.
fn facts(pod_uid: &str, id: &str) -> Facts {
    Facts {
        pid: std::process::id(),
        cgroup: format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope\n",
            pod_uid.replace('-', "_")
        ),
    }
}

async fn collect(attestor: &K8sAttestor, facts: &Facts) -> Result<Selectors, K8sError> {
    let mut selectors = Selectors::new();
    attestor.collect(facts, &mut selectors).await?;
    Ok(selectors)
}

/// A lookup of a container that is not listed: one fetch, then `NotListed`.
async fn unlisted_lookup(attestor: &K8sAttestor, facts: &Facts) -> Result<Selectors, K8sError> {
    match collect(attestor, facts).await {
        Err(K8sError::NotListed { .. }) => Ok(Selectors::new()),
        other => panic!("expected NotListed, got {other:?}"),
    }
}

/// Runs `op` `samples` times, one after the other; the sorted durations.
async fn measure<F, Fut>(samples: usize, mut op: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Selectors, K8sError>>,
{
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        op().await.unwrap();
        times.push(start.elapsed());
    }
    times.sort_unstable();
    times
}

fn report(what: &str, sorted: &[Duration]) {
    let at = |p: f64| {
        let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    };
    println!(
        "{what:<30} n={:<6} p50 {:>9.1} µs   p99 {:>9.1} µs   max {:>9.1} µs",
        sorted.len(),
        micros(at(0.50)),
        micros(at(0.99)),
        micros(at(1.0)),
    );
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A pod list of `n` pods: the recorded pods, then copies of them with
/// their own names, UIDs and container IDs.
fn many_pods(n: usize) -> String {
    let mut list: serde_json::Value = serde_json::from_str(PODS).unwrap();
    let recorded = list["items"].as_array().unwrap().clone();
    let mut items = recorded.clone();
    for i in recorded.len()..n {
        let mut pod = recorded[i % recorded.len()].clone();
        let name = format!("{}-{i}", pod["metadata"]["name"].as_str().unwrap());
        pod["metadata"]["name"] = name.into();
        pod["metadata"]["uid"] = format!("00000000-0000-4000-8000-{i:012}").into();
        if let Some(statuses) = pod["status"]["containerStatuses"].as_array_mut() {
            for (j, status) in statuses.iter_mut().enumerate() {
                status["containerID"] = format!("containerd://{i:032}{j:032}").into();
            }
        }
        items.push(pod);
    }
    list["items"] = items.into();
    list.to_string()
}
