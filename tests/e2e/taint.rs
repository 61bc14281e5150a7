//! Operator control of the X.509 authorities: a new authority is prepared
//! and activated, the old one tainted; while the agent cannot act (it is
//! paused with SIGSTOP) revoking the old one is refused because of its live
//! SVIDs; once the agent resumes it replaces every SVID the old authority
//! signed (seen on a workload's watch stream), `show` counts none left, and
//! the revocation goes through and removes the old authority from the
//! bundle the workload receives.

use std::time::Duration;

use futures::StreamExt;
use sigil::proto::sigil::admin::v1::RevokeX509AuthorityRequest;
use sigil::proto::sigil::admin::v1::local_authority_client::LocalAuthorityClient;
use x509_parser::prelude::FromDer;

use crate::support::*;

/// The authorities as `localauthority x509 show --output json` lists them.
fn show(server: &Server) -> Vec<serde_json::Value> {
    let out = server.cli_ok(&["localauthority", "x509", "show", "--output", "json"]);
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn authority<'a>(list: &'a [serde_json::Value], id: &str) -> &'a serde_json::Value {
    list.iter()
        .find(|a| a["authority_id"] == id)
        .unwrap_or_else(|| panic!("no authority {id} in {list:?}"))
}

/// The hex authority key identifier of a DER certificate.
fn issuer_key(der: &[u8]) -> String {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => aki
                .key_identifier
                .as_ref()
                .map(|k| k.0.iter().map(|b| format!("{b:02x}")).collect()),
            _ => None,
        })
        .unwrap()
}

/// Prepares the next authority and activates it; returns its ID.
fn prepare_and_activate(server: &Server) -> String {
    let prepared: serde_json::Value = serde_json::from_str(&server.cli_ok(&[
        "localauthority",
        "x509",
        "prepare",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(prepared["state"], "prepared");
    let new_id = prepared["authority_id"].as_str().unwrap().to_owned();
    server.cli_ok(&[
        "localauthority",
        "x509",
        "activate",
        "--authority-id",
        &new_id,
    ]);
    new_id
}

/// Reads a workload's stream until its bundle holds one authority, not
/// `revoked` (DER); fails after 30 s.
async fn until_bundle_lacks(
    stream: &mut (
             impl futures::Stream<Item = Result<spiffe::X509Context, spiffe::WorkloadApiError>> + Unpin
         ),
    revoked: &[u8],
) {
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let context = stream.next().await.unwrap().unwrap();
            let bundle = context.bundle_set().get(&td).unwrap();
            if bundle.authorities().iter().all(|c| c.as_ref() != revoked) {
                assert_eq!(bundle.authorities().len(), 1);
                break;
            }
        }
    })
    .await
    .expect("the revoked authority stayed in the workload's bundle");
}

/// The process ID of the agent whose data directory is `agent.data_dir`.
fn agent_pid(agent: &Agent) -> nix::unistd::Pid {
    let needle = agent.data_dir.to_string_lossy().into_owned();
    for dir in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = dir.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(dir.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("sigil-agent")) && args.contains(&needle) {
            return nix::unistd::Pid::from_raw(pid);
        }
    }
    panic!("no sigil-agent process with data dir {needle}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tainting_the_old_authority_replaces_its_svids_and_revoking_removes_it() {
    let dir = scratch();
    // Long-lived SVIDs: nothing is renewed on its own during the test.
    let server = Server::start_with(dir.path(), &["--default-x509-svid-ttl", "2h"]);
    let uid = own_uid_selector();
    let (token, agent_id) = server.token(&["--spiffe-id", "spiffe://example.org/node/a"]);
    server.create_entry("spiffe://example.org/web", &agent_id, &[uid.as_str()], &[]);
    server.create_entry("spiffe://example.org/db", &agent_id, &[uid.as_str()], &[]);
    let agent = Agent::start(&server, "agent-a", Some(&token));

    let first = show(&server);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["state"], "active");
    let old_id = first[0]["authority_id"].as_str().unwrap().to_owned();
    let old_cert = server.bundle_pem();
    // The agent SVID and two workload SVIDs, all on the one agent.
    let counted = eventually("3 live SVIDs", Duration::from_secs(10), || {
        let list = show(&server);
        (authority(&list, &old_id)["live_svids"] == 3).then_some(list)
    });
    assert_eq!(
        authority(&counted, &old_id)["agents"][0]["agent_id"],
        agent_id
    );

    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let context = stream.next().await.unwrap().unwrap();
    assert_eq!(context.svids().len(), 2);
    for svid in context.svids() {
        assert_eq!(issuer_key(svid.leaf().as_ref()), old_id);
    }

    // Bad input and the active authority are refused.
    let out = server.cli(&["localauthority", "x509", "taint", "--authority-id", "xyz"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(r#"authority_id: "xyz" is not a subject key identifier in hex"#),
        "{}",
        stderr(&out)
    );
    let out = server.cli(&["localauthority", "x509", "taint", "--authority-id", &old_id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is the active one and cannot be tainted"),
        "{}",
        stderr(&out)
    );

    let new_id = prepare_and_activate(&server);
    let list = show(&server);
    assert_eq!(authority(&list, &new_id)["state"], "active");
    assert_eq!(authority(&list, &old_id)["state"], "old");

    // With the agent paused, nothing can be replaced: the revocation of the
    // tainted authority is refused.
    let pid = agent_pid(&agent);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let tainted = server.cli_ok(&["localauthority", "x509", "taint", "--authority-id", &old_id]);
    assert!(
        tainted.contains(&format!("X.509 authority {old_id} tainted")),
        "{tainted}"
    );
    let out = server.cli(&[
        "localauthority",
        "x509",
        "revoke",
        "--authority-id",
        &old_id,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let expected =
        format!("authority_id: X.509 authority {old_id:?} still has 3 live SVIDs on 1 agents");
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
    let channel = sigil::transport::unix_channel(&server.admin_socket)
        .await
        .unwrap();
    let status = LocalAuthorityClient::new(channel)
        .revoke_x509_authority(RevokeX509AuthorityRequest {
            authority_id: old_id.clone(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().starts_with(&expected), "{status:?}");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();

    // The agent replaces both workload SVIDs (within the 30 s window) and
    // its own.
    let replaced = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let context = stream.next().await.unwrap().unwrap();
            let issuers: Vec<String> = context
                .svids()
                .iter()
                .map(|s| issuer_key(s.leaf().as_ref()))
                .collect();
            if issuers.iter().all(|i| *i == new_id) {
                break context;
            }
        }
    })
    .await
    .expect("the SVIDs of the tainted authority were not replaced within 60 s");
    assert_eq!(replaced.svids().len(), 2);
    let list = eventually(
        "no live SVIDs of the tainted authority",
        Duration::from_secs(40),
        || {
            let list = show(&server);
            (authority(&list, &old_id)["live_svids"] == 0).then_some(list)
        },
    );
    assert_eq!(authority(&list, &old_id)["state"], "tainted");
    assert_eq!(authority(&list, &new_id)["live_svids"], 3);

    // Now the revocation goes through, and the workload's bundle loses the
    // old authority.
    let revoked = server.cli_ok(&[
        "localauthority",
        "x509",
        "revoke",
        "--authority-id",
        &old_id,
    ]);
    assert!(
        revoked.contains(&format!("X.509 authority {old_id} revoked")),
        "{revoked}"
    );
    let old_der = pem::parse(old_cert.as_bytes()).unwrap().into_contents();
    until_bundle_lacks(&mut stream, &old_der).await;
    let list = show(&server);
    assert_eq!(authority(&list, &old_id)["state"], "revoked");
    assert!(!server.bundle_pem().contains(old_cert.trim()));

    // Every change, and the refused revocation, is in the audit log.
    let audit = std::fs::read_to_string(server.data_dir.join("audit.log")).unwrap();
    let events: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| {
            e["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("authority."))
        })
        .collect();
    let summary: Vec<(String, bool)> = events
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["outcome"] == "ok",
            )
        })
        .collect();
    let expected: Vec<(String, bool)> = [
        ("authority.taint", false),
        ("authority.taint", false),
        ("authority.prepare", true),
        ("authority.activate", true),
        ("authority.taint", true),
        ("authority.revoke", false),
        ("authority.revoke", false),
        ("authority.revoke", true),
    ]
    .iter()
    .map(|(a, ok)| ((*a).to_owned(), *ok))
    .collect();
    assert_eq!(summary, expected, "{audit}");
    assert_eq!(events[4]["ids"], serde_json::json!([old_id]));
}

/// `revoke --force` removes a tainted authority that still has live SVIDs:
/// `show` marks it revoked, the server's bundle and the bundle on a
/// workload's open stream lose it, and the audit log records the force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_revocation_removes_an_authority_with_live_svids() {
    let dir = scratch();
    let server = Server::start_with(dir.path(), &["--default-x509-svid-ttl", "2h"]);
    let uid = own_uid_selector();
    let (token, agent_id) = server.token(&["--spiffe-id", "spiffe://example.org/node/a"]);
    server.create_entry("spiffe://example.org/web", &agent_id, &[uid.as_str()], &[]);
    let agent = Agent::start(&server, "agent-a", Some(&token));
    let old_id = show(&server)[0]["authority_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let old_der = pem::parse(server.bundle_pem().as_bytes())
        .unwrap()
        .into_contents();
    eventually("2 live SVIDs", Duration::from_secs(10), || {
        (authority(&show(&server), &old_id)["live_svids"] == 2).then_some(())
    });
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(issuer_key(first.svids()[0].leaf().as_ref()), old_id);

    let new_id = prepare_and_activate(&server);
    // Paused, the agent replaces nothing: the SVIDs stay live.
    let pid = agent_pid(&agent);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    server.cli_ok(&["localauthority", "x509", "taint", "--authority-id", &old_id]);
    let refused = server.cli(&[
        "localauthority",
        "x509",
        "revoke",
        "--authority-id",
        &old_id,
    ]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    let forced = server.cli_ok(&[
        "localauthority",
        "x509",
        "revoke",
        "--authority-id",
        &old_id,
        "--force",
    ]);
    assert!(
        forced.contains(&format!("X.509 authority {old_id} revoked")),
        "{forced}"
    );
    let list = show(&server);
    assert_eq!(authority(&list, &old_id)["state"], "revoked");
    assert_eq!(authority(&list, &old_id)["live_svids"], 2);
    assert_eq!(authority(&list, &new_id)["state"], "active");
    let bundle = server.bundle_pem();
    assert_eq!(pem::parse_many(bundle.as_bytes()).unwrap().len(), 1);
    assert!(
        pem::parse_many(bundle.as_bytes())
            .unwrap()
            .iter()
            .all(|p| p.contents() != old_der)
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();

    until_bundle_lacks(&mut stream, &old_der).await;

    let audit = std::fs::read_to_string(server.data_dir.join("audit.log")).unwrap();
    let revokes: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["action"] == "authority.revoke")
        .collect();
    assert_eq!(revokes.len(), 2, "{audit}");
    assert_ne!(revokes[0]["outcome"], "ok");
    assert_eq!(revokes[1]["outcome"], "ok");
    assert_eq!(revokes[1]["ids"], serde_json::json!([old_id]));
    assert_eq!(revokes[1]["details"]["force"], true, "{audit}");
}
