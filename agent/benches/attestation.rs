//! Workload attestation with the k8s attestor: the time the production
//! attestor (`K8sAttestor::collect`) takes to turn a process's cgroup into
//! its `k8s:` selectors, against a local HTTPS kubelet stand-in serving the
//! kubelet's real `/pods` format (the one the attestor's unit tests use).
//!
//! - warm: the caller's container is in the pod list already fetched (the
//!   common case: cgroup parsing, a hash lookup and the selectors' checks);
//!   the target is a p50 under 1 ms, which the harness checks;
//! - cold: the first call of a container that started since the last
//!   fetch, with the kubelet not asked for longer than
//!   `UNKNOWN_FETCH_GAP`: the lookup fetches the pod list at once (TLS
//!   connection, `GET /pods`, JSON, index) and finds the container in it.
//!   Each sample lists a new container, then waits out the gap, which is
//!   not measured. Calls closer together than the gap share a fetch and
//!   wait for it, so their time is the gap's, not the attestor's. Measured
//!   with the recorded two-pod list and with a list of 110 pods (the
//!   kubelet's default `maxPods`).
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
use sigil_agent::workload::attestor::k8s::{
    K8sAttestor, K8sConfig, K8sError, KubeletUrl, UNKNOWN_FETCH_GAP,
};
use tokio::time::Instant;

#[allow(dead_code, reason = "the attestor's unit tests use the rest")]
#[path = "../src/workload/attestor/k8s/tests/kubelet.rs"]
mod kubelet;

use kubelet::{Kubelet, PODS};

/// The `web` container of the recorded pod list, and its pod.
const WEB: &str = "3f4b2c1d9e8a7f6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b";
const WEB_POD: &str = "7d2a6c3e-91b4-4f0a-8e5d-2b1c9a8f7e6d";

const WARM_SAMPLES: usize = 20_000;
/// Each cold sample waits out `UNKNOWN_FETCH_GAP` first.
const COLD_SAMPLES: usize = 40;
const MAX_PODS: usize = 110;
/// The p50 a warm lookup must stay under.
const WARM_TARGET: Duration = Duration::from_millis(1);

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

    let mut verdicts = Vec::new();
    let warm = measure(WARM_SAMPLES, || collect(&attestor, &web)).await;
    report("warm lookup, 2 pods listed", &warm);
    verdicts.push(("warm lookup, 2 pods listed".to_owned(), at(&warm, 0.50)));

    let cold = cold_lookups(&kubelet, &attestor, PODS).await;
    report("cold (new container), 2 pods", &cold);

    let pods = many_pods(MAX_PODS);
    let cold = cold_lookups(&kubelet, &attestor, &pods).await;
    report(&format!("cold (new container), {MAX_PODS} pods"), &cold);

    // The web pod is still listed (the first pod of the bigger list).
    let warm = measure(WARM_SAMPLES, || collect(&attestor, &web)).await;
    let what = format!("warm lookup, {MAX_PODS} pods listed");
    report(&what, &warm);
    verdicts.push((what, at(&warm, 0.50)));

    println!();
    for (what, p50) in verdicts {
        let verdict = if p50 < WARM_TARGET { "met" } else { "NOT met" };
        println!(
            "target p50 < {} µs, {what}: {verdict} (p50 {:.1} µs)",
            micros(WARM_TARGET),
            micros(p50)
        );
    }
}

/// Cold lookups against the pod list `base`: for each sample, a new
/// container of the web pod is listed, the gap since the last fetch is
/// waited out, and the container's first call is timed.
async fn cold_lookups(kubelet: &Kubelet, attestor: &K8sAttestor, base: &str) -> Vec<Duration> {
    let mut times = Vec::with_capacity(COLD_SAMPLES);
    for i in 0..COLD_SAMPLES {
        let id = format!("{:064x}", 0xc01d_0000 + i);
        *kubelet.body.lock().unwrap() = with_container(base, &id);
        let caller = facts(WEB_POD, &id);
        tokio::time::sleep(UNKNOWN_FETCH_GAP).await;
        let start = Instant::now();
        let selectors = collect(attestor, &caller).await.unwrap();
        times.push(start.elapsed());
        assert!(
            selectors
                .iter()
                .any(|s| s.to_string() == "k8s:container-name:started"),
            "{selectors:?}"
        );
    }
    times.sort_unstable();
    times
}

/// The pod list `base` with a running container `id`, named `started`, in
/// its first pod (the web pod).
fn with_container(base: &str, id: &str) -> String {
    let mut list: serde_json::Value = serde_json::from_str(base).unwrap();
    let statuses = list["items"][0]["status"]["containerStatuses"]
        .as_array_mut()
        .unwrap();
    let mut started = statuses[0].clone();
    started["name"] = "started".into();
    started["containerID"] = format!("containerd://{id}").into();
    statuses.push(started);
    list.to_string()
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

/// The `p` quantile of `sorted` (nearest rank).
fn at(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn report(what: &str, sorted: &[Duration]) {
    println!(
        "{what:<32} n={:<6} p50 {:>9.1} µs   p99 {:>9.1} µs   max {:>9.1} µs",
        sorted.len(),
        micros(at(sorted, 0.50)),
        micros(at(sorted, 0.99)),
        micros(at(sorted, 1.0)),
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
