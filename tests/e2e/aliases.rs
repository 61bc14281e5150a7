//! Node aliases and entry propagation on live streams.
//!
//! `token generate --alias` registers a node alias with the agent's token;
//! entries under the alias reach every agent holding it, and leave the
//! workloads of an agent that loses it. Entry changes reach a workload's
//! open Workload API stream within a second of the CLI's exit: a new SVID,
//! a re-signed one when its DNS names change, the same SVID with the new
//! hint when only the hint changes, and nothing once the entry is deleted.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sigil::proto::workload::{X509svidRequest, X509svidResponse};

use crate::support::*;

const ALIAS: &str = "spiffe://example.org/nodes/web";
const APP: &str = "spiffe://example.org/app";

/// `token generate --alias` as JSON; returns (token, agent ID, alias entry ID).
fn token_with_alias(server: &Server, extra: &[&str]) -> (String, String, String) {
    let mut args = vec!["token", "generate", "--output", "json", "--alias", ALIAS];
    args.extend_from_slice(extra);
    let v: serde_json::Value = serde_json::from_str(&server.cli_ok(&args)).unwrap();
    assert_eq!(v["alias_id"], ALIAS, "{v}");
    (
        v["token"].as_str().unwrap().to_owned(),
        v["agent_id"].as_str().unwrap().to_owned(),
        v["alias_entry_id"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn agents_sharing_an_alias_serve_its_entries_until_the_alias_is_deleted() {
    let dir = scratch();
    let server = Server::start(dir.path());
    // One agent with a chosen ID, one with the derived join-token ID.
    let (token_a, agent_a, alias_a) =
        token_with_alias(&server, &["--spiffe-id", "spiffe://example.org/node/a"]);
    let (token_b, agent_b, alias_b) = token_with_alias(&server, &[]);
    assert_eq!(agent_a, "spiffe://example.org/node/a");
    assert!(agent_b.starts_with("spiffe://example.org/sigil/agent/join_token/"));
    assert_ne!(alias_a, alias_b);

    let shown: serde_json::Value = serde_json::from_str(&server.cli_ok(&[
        "entry",
        "show",
        "--entry-id",
        &alias_a,
        "--output",
        "json",
    ]))
    .unwrap();
    let shown = shown
        .as_array()
        .and_then(|a| a.first().cloned())
        .unwrap_or(shown);
    assert_eq!(shown["spiffe_id"], ALIAS);
    assert_eq!(shown["parent_id"], "spiffe://example.org/sigil/server");
    assert_eq!(
        shown["selectors"],
        serde_json::json!([format!("spiffe_id:{agent_a}")])
    );

    let uid = own_uid_selector();
    server.create_entry(APP, ALIAS, &[uid.as_str()], &[]);
    let a = Agent::start(&server, "agent-a", Some(&token_a));
    let b = Agent::start(&server, "agent-b", Some(&token_b));
    for agent in [&a, &b] {
        eventually("the alias's entry served", Duration::from_secs(20), || {
            let out = agent.fetch(None, None);
            (out.status.success() && stdout(&out).contains(APP)).then_some(())
        });
    }

    // A workload on agent a watches its SVIDs.
    let mut watch = spawn(
        Command::new(agent_bin())
            .args(["api", "watch", "--socket-path"])
            .arg(&a.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut lines = std::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(
        first.starts_with(&format!("Received 1 svid: {APP} (first expires ")),
        "{first}"
    );

    // Agent a loses the alias: its workload's stream loses the SVID (no
    // identity left, so the stream ends with `no identity issued`).
    server.cli_ok(&["entry", "delete", "--entry-id", &alias_a]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = watch.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = watch.kill();
            panic!("the watch kept its SVID after the alias was deleted");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(rest.is_empty(), "unexpected updates: {rest:?}");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut watch.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1));
    assert_eq!(err, "Error: permission denied: no identity issued\n");

    let out = a.fetch(None, None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no identity issued"),
        "{}",
        stderr(&out)
    );
    // Agent b keeps its own alias and the SVID.
    let out = b.fetch(None, None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(APP));
}

#[test]
fn a_duplicate_or_invalid_alias_is_refused_and_no_token_is_made() {
    let dir = scratch();
    let server = Server::start(dir.path());
    let node = "spiffe://example.org/node/a";
    token_with_alias(&server, &["--spiffe-id", node]);

    let out = server.cli(&["token", "generate", "--spiffe-id", node, "--alias", ALIAS]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with(
            "Error: alias_id: entry with the same spiffe_id, parent_id and selectors exists: "
        ),
        "{}",
        stderr(&out)
    );

    let out = server.cli(&["token", "generate", "--alias", "spiffe://example.org/a//b"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("Error: --alias \"spiffe://example.org/a//b\": "),
        "{}",
        stderr(&out)
    );

    let out = server.cli(&[
        "token",
        "generate",
        "--alias",
        "spiffe://example.org/sigil/agent/x",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "Error: alias_id: \"spiffe://example.org/sigil/agent/x\" is under /sigil/, which is reserved for the server and agents\n"
    );
    // Only the first alias exists.
    let count = server.cli_ok(&["entry", "count", "--output", "json"]);
    let count: serde_json::Value = serde_json::from_str(&count).unwrap();
    assert_eq!(count["count"], 1, "{count}");

    // The human output names the alias entry.
    let out = server.cli_ok(&[
        "token",
        "generate",
        "--spiffe-id",
        "spiffe://example.org/node/b",
        "--alias",
        ALIAS,
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert_eq!(lines[3], format!("Alias: {ALIAS}"));
    assert!(lines[4].starts_with("Alias entry ID: "), "{out}");
}

/// An open `FetchX509SVID` stream with its deadline-bounded reads.
struct Watch {
    stream: tonic::Streaming<X509svidResponse>,
}

/// What a message holds for one SPIFFE ID: the leaf's serial and the hint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    serial: Vec<u8>,
    hint: String,
}

fn held(message: &X509svidResponse, spiffe_id: &str) -> Option<Held> {
    let svid = message.svids.iter().find(|s| s.spiffe_id == spiffe_id)?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&svid.x509_svid).unwrap();
    Some(Held {
        serial: leaf.raw_serial().to_vec(),
        hint: svid.hint.clone(),
    })
}

impl Watch {
    async fn open(agent: &Agent) -> Self {
        let mut client = raw_workload_client(agent).await;
        let mut request = tonic::Request::new(X509svidRequest {});
        request
            .metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
        let stream = client.fetch_x509svid(request).await.unwrap().into_inner();
        Self { stream }
    }

    /// Reads messages until one satisfies `done`; returns it with the time
    /// from `since` to its arrival. Fails after 10 s.
    async fn until(
        &mut self,
        since: tokio::time::Instant,
        what: &str,
        mut done: impl FnMut(&X509svidResponse) -> bool,
    ) -> (X509svidResponse, Duration) {
        let deadline = since + Duration::from_secs(10);
        loop {
            let message = tokio::time::timeout_at(deadline, self.stream.message())
                .await
                .unwrap_or_else(|_| panic!("{what}: no such message within 10 s"))
                .unwrap()
                .unwrap();
            if done(&message) {
                return (message, since.elapsed());
            }
        }
    }
}

/// Runs a CLI command to completion; returns the instant it exited.
fn cli_at(server: &Server, args: &[&str]) -> tokio::time::Instant {
    server.cli_ok(args);
    tokio::time::Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_changes_reach_an_open_stream_within_a_second() {
    let uid = own_uid_selector();
    // A base entry keeps the caller's stream open while the others come
    // and go.
    let domain = Domain::start(&[("/base", &[uid.as_str()], &[])]);
    let server = &domain.server;
    let parent = domain.agent_id.as_str();
    let mut watch = Watch::open(&domain.agent).await;
    let base = "spiffe://example.org/base";
    watch
        .until(tokio::time::Instant::now(), "first", |m| {
            held(m, base).is_some()
        })
        .await;

    let mut latencies: Vec<(String, Duration)> = Vec::new();
    for round in 0..5 {
        let id = format!("spiffe://example.org/live/{round}");
        let fields = |extra: &[&str]| {
            let mut args: Vec<String> = [
                "--spiffe-id",
                &id,
                "--parent-id",
                parent,
                "--selector",
                &uid,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.extend(extra.iter().map(|s| s.to_string()));
            args
        };

        let mut create = vec!["entry", "create", "--output", "json"];
        let create_fields = fields(&[]);
        create.extend(create_fields.iter().map(String::as_str));
        let out = server.cli_ok(&create);
        let at = tokio::time::Instant::now();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let v = v.as_array().and_then(|a| a.first().cloned()).unwrap_or(v);
        let entry_id = v["id"].as_str().unwrap().to_owned();
        let (m, latency) = watch.until(at, "created", |m| held(m, &id).is_some()).await;
        let created = held(&m, &id).unwrap();
        assert!(held(&m, base).is_some());
        latencies.push(("create".into(), latency));

        let dns = format!("live{round}.example.org");
        let mut update = vec!["entry", "update", "--entry-id", &entry_id];
        let dns_fields = fields(&["--dns-name", &dns]);
        update.extend(dns_fields.iter().map(String::as_str));
        let at = cli_at(server, &update);
        let (m, latency) = watch
            .until(at, "re-signed", |m| {
                held(m, &id).is_some_and(|h| h.serial != created.serial)
            })
            .await;
        let resigned = held(&m, &id).unwrap();
        let svid = m.svids.iter().find(|s| s.spiffe_id == id).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&svid.x509_svid).unwrap();
        let sans = leaf.subject_alternative_name().unwrap().unwrap();
        assert!(
            sans.value.general_names.iter().any(|n| matches!(
                n,
                x509_parser::extensions::GeneralName::DNSName(d) if *d == dns
            )),
            "{sans:?}"
        );
        latencies.push(("update dns_names".into(), latency));

        let hint = format!("hint-{round}");
        let mut update = vec!["entry", "update", "--entry-id", &entry_id];
        let hint_fields = fields(&["--dns-name", &dns, "--hint", &hint]);
        update.extend(hint_fields.iter().map(String::as_str));
        let at = cli_at(server, &update);
        let (m, latency) = watch
            .until(at, "new hint", |m| {
                held(m, &id).is_some_and(|h| h.hint == hint)
            })
            .await;
        assert_eq!(
            held(&m, &id).unwrap().serial,
            resigned.serial,
            "a hint change must not re-sign the SVID"
        );
        latencies.push(("update hint".into(), latency));

        let at = cli_at(server, &["entry", "delete", "--entry-id", &entry_id]);
        let (m, latency) = watch.until(at, "deleted", |m| held(m, &id).is_none()).await;
        assert!(held(&m, base).is_some());
        latencies.push(("delete".into(), latency));
    }

    let mut sorted: Vec<Duration> = latencies.iter().map(|(_, d)| *d).collect();
    sorted.sort();
    let worst = sorted[sorted.len() - 1];
    println!(
        "propagation over {} changes: p50 {:?}, max {worst:?}",
        sorted.len(),
        sorted[sorted.len() / 2]
    );
    assert!(
        worst < Duration::from_secs(1),
        "a change took {worst:?}: {latencies:?}"
    );
}
