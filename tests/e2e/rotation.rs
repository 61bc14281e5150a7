//! Rotation with a 30 s SVID lifetime: an open stream receives a new SVID
//! before the old one expires, and never holds an expired one. Checked with
//! the Rust `spiffe` crate in this process and with go-spiffe and py-spiffe
//! watchers as separate workloads, all at once.

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;

use crate::support::*;

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_receive_rotated_svids_before_expiry() {
    let uid = own_uid_selector();
    let domain = Domain::start(&[("/rotating", &[uid.as_str()], &["--x509-svid-ttl", "30"])]);

    // Independent watchers in other languages, each waiting for 2 updates.
    let go = Command::new(crate::interop::go_client())
        .args(["watch", "--updates", "2", "--timeout", "60"])
        .env("SPIFFE_ENDPOINT_SOCKET", domain.agent.endpoint())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let py = Command::new("python3")
        .arg(crate::interop::python_client())
        .args(["watch", "--updates", "2", "--timeout", "60"])
        .env("SPIFFE_ENDPOINT_SOCKET", domain.agent.endpoint())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let client = spiffe::WorkloadApiClient::connect_to(domain.agent.endpoint())
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let mut seen: Vec<(Vec<u8>, SystemTime)> = Vec::new();
    while seen.len() < 2 {
        let context = tokio::time::timeout(Duration::from_secs(45), stream.next())
            .await
            .expect("no rotation within 45 s")
            .unwrap()
            .unwrap();
        let svid = context.default_svid().unwrap();
        assert_eq!(
            svid.spiffe_id().to_string(),
            "spiffe://example.org/rotating"
        );
        let leaf = svid.leaf().as_ref().to_vec();
        let not_after = sigil::x509::not_after(&leaf).unwrap();
        let received = SystemTime::now();
        assert!(not_after > received, "received an expired SVID");
        if let Some((previous, previous_not_after)) = seen.last() {
            assert_ne!(previous, &leaf, "an update must carry a new SVID");
            assert!(
                received < *previous_not_after,
                "the new SVID came after the old one expired"
            );
        }
        seen.push((leaf, not_after));
    }

    for (name, child) in [("go-spiffe", go), ("py-spiffe", py)] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let updates: Vec<serde_json::Value> = stdout(&out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(updates.len(), 2, "{name}: {}", stdout(&out));
        assert_ne!(updates[0]["serial"], updates[1]["serial"], "{name}");
        for u in &updates {
            assert_eq!(u["spiffe_id"], "spiffe://example.org/rotating", "{name}");
            let received_s = u["received_at"].as_i64().unwrap() / 1000;
            assert!(
                u["not_after"].as_i64().unwrap() >= received_s,
                "{name}: expired SVID received"
            );
        }
        let first_expiry = updates[0]["not_after"].as_i64().unwrap();
        assert!(
            updates[1]["received_at"].as_i64().unwrap() / 1000 <= first_expiry,
            "{name}: rotation came late"
        );
        assert!(first_expiry <= unix_now() + 31);
    }
}

/// The agent renews its own SVID at about half its lifetime (20 s here) and
/// keeps working with the new one: an entry created after the renewal still
/// reaches the workload over the agent's mTLS connection.
#[test]
fn agent_renews_its_own_svid_and_keeps_serving() {
    let dir = scratch();
    let server = Server::start_with(dir.path(), &["--agent-svid-ttl", "20s"]);
    let (token, agent_id) = server.token(&[]);
    let uid = own_uid_selector();
    server.create_entry(
        "spiffe://example.org/first",
        &agent_id,
        &[uid.as_str()],
        &[],
    );
    let agent = Agent::start(&server, "agent", Some(&token));

    let stored = || std::fs::read(agent.data_dir.join("agent_svid.pem")).unwrap();
    let original = stored();
    let original_expiry = {
        let leaf = pem::parse_many(&original).unwrap().remove(0);
        sigil::x509::not_after(leaf.contents()).unwrap()
    };
    let renewed = eventually("agent SVID renewal", Duration::from_secs(30), || {
        let now = stored();
        (now != original).then_some(now)
    });
    assert!(
        SystemTime::now() < original_expiry,
        "renewed only after expiry"
    );
    let leaf = pem::parse_many(&renewed).unwrap().remove(0);
    assert_eq!(
        sigil::x509::spiffe_id_of(leaf.contents())
            .unwrap()
            .to_string(),
        agent_id
    );

    server.create_entry(
        "spiffe://example.org/second",
        &agent_id,
        &[uid.as_str()],
        &[],
    );
    eventually(
        "entry created after the renewal served",
        Duration::from_secs(30),
        || {
            let out = agent.fetch(None, None);
            stdout(&out)
                .contains("spiffe://example.org/second")
                .then_some(())
        },
    );
    assert!(!agent.log().contains("ERROR"), "{}", agent.log());
}
