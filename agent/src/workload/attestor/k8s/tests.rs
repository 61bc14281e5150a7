use super::*;

pub(crate) mod kubelet;

use self::kubelet::{Kubelet, PODS, REPORT};

pub(crate) const WEB: &str = "3f4b2c1d9e8a7f6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b";
const ENVOY: &str = "b1a2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
pub(crate) const WEB_POD: &str = "7d2a6c3e-91b4-4f0a-8e5d-2b1c9a8f7e6d";
const BATCH_POD: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

/// containerd with the systemd driver on cgroup v2.
fn cgroup_of(pod_uid: &str, container_id: &str) -> String {
    format!(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{container_id}.scope\n",
        pod_uid.replace('-', "_")
    )
}

/// Waits until `attestor` has completed `n` fetches.
async fn fetched(attestor: &K8sAttestor, n: u64) {
    let mut rx = attestor.shared.completed.subscribe();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| *c >= n))
        .await
        .unwrap()
        .unwrap();
}

async fn selectors_of(attestor: &K8sAttestor, cgroup: &str) -> Result<Vec<String>, K8sError> {
    let mut selectors = Selectors::new();
    let facts = Facts {
        pid: 1,
        cgroup: cgroup.to_owned(),
    };
    attestor.collect(&facts, &mut selectors).await?;
    Ok(selectors.iter().map(ToString::to_string).collect())
}

#[tokio::test]
async fn a_listed_container_gets_its_pod_and_container_selectors() {
    let kubelet = Kubelet::start().await;
    let attestor = K8sAttestor::new(&kubelet.config()).unwrap();
    let got = selectors_of(&attestor, &cgroup_of(WEB_POD, WEB))
        .await
        .unwrap();
    assert_eq!(
        got,
        [
            "k8s:container-image:docker.io/library/nginx:1.25",
            "k8s:container-image:docker.io/library/nginx@sha256:10d1f5b58f74683ad34eb29287e07dab1e90f10af243f151bb50aa5dbb4d62ee",
            "k8s:container-name:web",
            "k8s:node-name:node-1",
            "k8s:ns:shop",
            "k8s:pod-label:app:web",
            "k8s:pod-label:pod-template-hash:7c9f8d6b5",
            "k8s:pod-name:web-7c9f8d6b5-x2lqp",
            "k8s:pod-owner:ReplicaSet:web-7c9f8d6b5",
            "k8s:pod-uid:7d2a6c3e-91b4-4f0a-8e5d-2b1c9a8f7e6d",
            "k8s:sa:web",
        ]
    );
    let sidecar = selectors_of(&attestor, &cgroup_of(WEB_POD, ENVOY))
        .await
        .unwrap();
    assert!(sidecar.contains(&"k8s:container-name:envoy".to_owned()));
    assert!(!sidecar.contains(&"k8s:container-name:web".to_owned()));
}

#[tokio::test]
async fn warm_lookups_do_not_fetch() {
    let kubelet = Kubelet::start().await;
    let attestor = K8sAttestor::new(&kubelet.config()).unwrap();
    fetched(&attestor, 1).await;
    for _ in 0..50 {
        selectors_of(&attestor, &cgroup_of(WEB_POD, WEB))
            .await
            .unwrap();
    }
    assert_eq!(kubelet.requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_unknown_container_shares_one_refresh() {
    let kubelet = Kubelet::start().await;
    let attestor = Arc::new(K8sAttestor::new(&kubelet.config()).unwrap());
    fetched(&attestor, 1).await;

    // The report container starts after the list was fetched; twenty
    // of its processes call at once.
    kubelet.start_report_container();
    let cgroup = format!(
        "12:memory:/kubepods/besteffort/pod{BATCH_POD}/{REPORT}\n\
         1:name=systemd:/kubepods/besteffort/pod{BATCH_POD}/{REPORT}\n"
    );
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let attestor = Arc::clone(&attestor);
            let cgroup = cgroup.clone();
            tokio::spawn(async move { selectors_of(&attestor, &cgroup).await })
        })
        .collect();
    for call in calls {
        let got = call.await.unwrap().unwrap();
        assert!(
            got.contains(&"k8s:pod-owner:Job:batch-28391040".to_owned()),
            "{got:?}"
        );
        assert!(got.contains(&"k8s:sa:default".to_owned()), "{got:?}");
    }
    assert_eq!(kubelet.requests(), 2, "one refresh for all callers");
}

#[tokio::test(start_paused = true)]
async fn a_container_not_yet_listed_is_unavailable_not_denied() {
    let kubelet = Kubelet::start().await;
    let attestor = K8sAttestor::new(&kubelet.config()).unwrap();
    fetched(&attestor, 1).await;
    // The batch pod is listed, its container still being created.
    let started = Instant::now();
    let err = selectors_of(&attestor, &cgroup_of(BATCH_POD, REPORT))
        .await
        .unwrap_err();
    assert!(started.elapsed() <= UNKNOWN_FETCH_GAP);
    assert_eq!(
        err.to_string(),
        format!("container {REPORT} of pod {BATCH_POD} is not in the kubelet's pod list")
    );
    assert_eq!(kubelet.requests(), 2, "looked again once");

    // Once listed, the next attempt succeeds.
    kubelet.start_report_container();
    let got = selectors_of(&attestor, &cgroup_of(BATCH_POD, REPORT))
        .await
        .unwrap();
    assert!(got.contains(&"k8s:container-name:report".to_owned()));
}

/// A container the kubelet never lists (one that keeps crashing before
/// the kubelet sees it running) whose processes call 100 times a second.
#[tokio::test(start_paused = true)]
async fn an_unlisted_container_calling_often_costs_one_fetch_per_gap() {
    let kubelet = Kubelet::start().await;
    let attestor = Arc::new(K8sAttestor::new(&kubelet.config()).unwrap());
    fetched(&attestor, 1).await;
    let started = Instant::now();
    let window = Duration::from_secs(2);
    let mut calls = Vec::new();
    while started.elapsed() < window {
        let attestor = Arc::clone(&attestor);
        calls.push(tokio::spawn(async move {
            let asked = Instant::now();
            let result = selectors_of(&attestor, &cgroup_of(BATCH_POD, REPORT)).await;
            (asked.elapsed(), result)
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(calls.len(), 200);
    for call in calls {
        let (waited, result) = call.await.unwrap();
        assert!(
            matches!(result, Err(K8sError::NotListed { .. })),
            "{result:?}"
        );
        assert!(waited <= UNKNOWN_FETCH_GAP, "answered after {waited:?}");
    }
    // One fetch at each gap of the window (the last callers' one ends it),
    // instead of one per call.
    let fetches = kubelet.requests() - 1;
    let most = usize::try_from(window.as_millis() / UNKNOWN_FETCH_GAP.as_millis()).unwrap();
    assert!((1..=most).contains(&fetches), "{fetches} fetches");
}

#[tokio::test(start_paused = true)]
async fn a_container_that_starts_is_found_within_the_gap() {
    let kubelet = Kubelet::start().await;
    let attestor = K8sAttestor::new(&kubelet.config()).unwrap();
    fetched(&attestor, 1).await;
    let report = cgroup_of(BATCH_POD, REPORT);

    // Its processes call while the kubelet does not list it yet, then
    // once it does.
    for _ in 0..3 {
        let err = selectors_of(&attestor, &report).await.unwrap_err();
        assert!(matches!(err, K8sError::NotListed { .. }), "{err}");
    }
    kubelet.start_report_container();
    let asked = Instant::now();
    let got = selectors_of(&attestor, &report).await.unwrap();
    assert!(got.contains(&"k8s:container-name:report".to_owned()));
    assert!(
        asked.elapsed() <= UNKNOWN_FETCH_GAP,
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(kubelet.requests(), 5);

    // When the kubelet was not asked for longer than the gap, the first
    // call of a new container fetches at once.
    tokio::time::sleep(UNKNOWN_FETCH_GAP).await;
    let other = "d0d0cafed0d0cafed0d0cafed0d0cafed0d0cafed0d0cafed0d0cafed0d0cafe";
    let listed = kubelet.body.lock().unwrap().replace(REPORT, other);
    *kubelet.body.lock().unwrap() = listed;
    let asked = Instant::now();
    let got = selectors_of(&attestor, &cgroup_of(BATCH_POD, other))
        .await
        .unwrap();
    assert!(got.contains(&"k8s:container-name:report".to_owned()));
    assert_eq!(asked.elapsed(), Duration::ZERO);
    assert_eq!(kubelet.requests(), 6);
}

#[tokio::test]
async fn processes_outside_pods_get_nothing_and_cost_no_fetch() {
    let kubelet = Kubelet::start().await;
    let attestor = K8sAttestor::new(&kubelet.config()).unwrap();
    fetched(&attestor, 1).await;
    for cgroup in [
        "0::/system.slice/sshd.service\n".to_owned(),
        format!("0::/system.slice/docker-{WEB}.scope\n"),
    ] {
        assert!(selectors_of(&attestor, &cgroup).await.unwrap().is_empty());
    }
    assert_eq!(kubelet.requests(), 1);
}

#[tokio::test]
async fn the_list_is_refreshed_on_the_interval() {
    let kubelet = Kubelet::start().await;
    let attestor = K8sAttestor::new(&K8sConfig {
        refresh_interval: Duration::from_millis(50),
        ..kubelet.config()
    })
    .unwrap();
    fetched(&attestor, 1).await;
    kubelet.start_report_container();
    fetched(&attestor, 3).await;
    let got = selectors_of(&attestor, &cgroup_of(BATCH_POD, REPORT))
        .await
        .unwrap();
    assert!(got.contains(&"k8s:container-name:report".to_owned()));
    drop(attestor);
}

#[tokio::test]
async fn the_kubelet_certificate_is_verified_unless_told_not_to() {
    let kubelet = Kubelet::start().await;
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let other_ca = kubelet._dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, other.cert.pem()).unwrap();
    let attestor = K8sAttestor::new(&K8sConfig {
        kubelet_ca_path: Some(other_ca),
        ..kubelet.config()
    })
    .unwrap();
    let err = selectors_of(&attestor, &cgroup_of(WEB_POD, WEB))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );

    let attestor = K8sAttestor::new(&K8sConfig {
        kubelet_ca_path: None,
        ..kubelet.config()
    })
    .unwrap();
    let got = selectors_of(&attestor, &cgroup_of(WEB_POD, WEB))
        .await
        .unwrap();
    assert!(got.contains(&"k8s:ns:shop".to_owned()));
}

#[tokio::test]
async fn a_wrong_token_is_reported() {
    let kubelet = Kubelet::start().await;
    std::fs::write(&kubelet.token, "expired").unwrap();
    let attestor = K8sAttestor::new(&kubelet.config()).unwrap();
    let err = selectors_of(&attestor, &cgroup_of(WEB_POD, WEB))
        .await
        .unwrap_err();
    assert!(
        err.to_string().ends_with("/pods: HTTP 401: Unauthorized"),
        "{err}"
    );
}

#[test]
fn a_missing_ca_file_is_a_setup_error() {
    let err = KubeletClient::new(&K8sConfig {
        kubelet_url: KubeletUrl::parse("https://node-1").unwrap(),
        token_path: "/nonexistent/token".into(),
        kubelet_ca_path: Some("/nonexistent/ca.pem".into()),
        refresh_interval: Duration::from_secs(10),
    })
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("kubelet CA /nonexistent/ca.pem: "),
        "{err}"
    );
}

#[test]
fn kubelet_urls() {
    for (url, shown) in [
        ("https://node-1", "https://node-1:10250"),
        ("https://node-1:10443/", "https://node-1:10443"),
        ("https://10.0.0.7:10250", "https://10.0.0.7:10250"),
        ("https://[fd00::7]", "https://[fd00::7]:10250"),
    ] {
        assert_eq!(KubeletUrl::parse(url).unwrap().to_string(), shown);
    }
    for bad in [
        "http://node-1",
        "https://",
        "https://node-1/pods",
        "https://node-1:0",
        "https://node-1:x",
        "https://[fd00::7",
        "https://user@node-1",
    ] {
        assert!(KubeletUrl::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn the_recorded_list_is_indexed_by_container() {
    let index = PodIndex::build(serde_json::from_str(PODS).unwrap());
    // web, envoy and the finished init container; not the container
    // still being created.
    assert_eq!(index.containers.len(), 3);
    assert!(index.lookup(WEB, WEB_POD).is_some());
    assert!(index.lookup(WEB, BATCH_POD).is_none(), "pod must match");
}
