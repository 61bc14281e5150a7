//! The admin API over mTLS and the audit log: a workload whose entry has
//! `admin = true` runs admin commands over the network with the SVID the
//! agent gave it; other workloads, the agent itself and clients without a
//! certificate are refused; every change lands in the audit log with its
//! caller, IDs and outcome.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sigil::proto::sigil::admin::v1::admin_client::AdminClient;
use sigil::proto::sigil::admin::v1::{ListEntriesRequest, ListFederatedBundlesRequest};
use tonic::transport::Channel;

use crate::support::*;

/// The `sigil-server` CLI against the server's network port as the admin
/// workload whose SVID is in `svid_dir`; there is no admin socket in play.
fn remote_cli(server: &Server, svid_dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(server_bin())
        .args(args)
        .args(["--server-address", &server.address])
        .arg("--svid-dir")
        .arg(svid_dir)
        .arg("--socket-path")
        .arg(server.dir.join("no-such-admin.sock"))
        .output()
        .unwrap()
}

/// Fetches the SVID of the workload running as `uid` into a directory
/// that uid owns.
fn fetch_svid(domain: &Domain, uid: u32, name: &str) -> std::path::PathBuf {
    let dir = domain.dir.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).unwrap();
    let out = eventually("the workload's SVID", Duration::from_secs(20), || {
        let out = domain.agent.fetch(Some(uid), Some(&dir));
        out.status.success().then_some(out)
    });
    assert!(dir.join("svid.0.pem").exists(), "{}", stdout(&out));
    dir
}

fn certs(pem_bytes: &[u8]) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    pem::parse_many(pem_bytes)
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents().into())
        .collect()
}

/// An admin API client over mTLS presenting `identity` (chain PEM, key
/// PEM), or no certificate, and accepting only the server's SPIFFE ID.
fn admin_client(
    server: &Server,
    bundle_pem: &[u8],
    identity: Option<(&[u8], &str)>,
) -> AdminClient<Channel> {
    use sigil::bundle::X509Bundle;
    use sigil::keys::PrivateKey;
    use sigil::tls::{SpiffeServerVerifier, SvidResolver, TrustStore};

    let td = sigil::TrustDomain::new(TD).unwrap();
    let bundle = X509Bundle::from_pem(td.clone(), bundle_pem).unwrap();
    let roots = Arc::new(TrustStore::new(&bundle).unwrap());
    let verifier = Arc::new(SpiffeServerVerifier::new(roots, td.server_id()));
    let identity = identity.map(|(chain, key)| {
        let key = PrivateKey::from_pem(key).unwrap();
        Arc::new(SvidResolver::new(certs(chain), &key).unwrap())
    });
    let config = Arc::new(sigil::tls::client_config(verifier, identity).unwrap());
    AdminClient::new(sigil::transport::tls_channel(&server.address, config))
}

fn svid_client(server: &Server, dir: &Path) -> AdminClient<Channel> {
    let chain = std::fs::read(dir.join("svid.0.pem")).unwrap();
    let key = std::fs::read_to_string(dir.join("svid.0.key")).unwrap();
    let bundle = std::fs::read(dir.join("bundle.0.pem")).unwrap();
    admin_client(server, &bundle, Some((&chain, &key)))
}

/// The audit events in the server's log file.
fn audit_events(server: &Server) -> Vec<Value> {
    let path = server.data_dir.join("audit.log");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "audit log mode");
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The part of an event a test compares exactly: caller, action, ids and
/// outcome. The time must be RFC 3339 UTC.
fn essentials(event: &Value) -> Value {
    let time = event["time"].as_str().unwrap();
    // e.g. 2026-05-01T12:00:00.250Z
    let b = time.as_bytes();
    assert!(
        b.len() == 24
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && b[19] == b'.'
            && b[23] == b'Z',
        "time {time:?}"
    );
    json!([
        event["caller"],
        event["action"],
        event["ids"],
        event["outcome"]
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_workload_administers_over_mtls_and_others_are_refused() {
    if !is_root() {
        eprintln!("skipped: running workloads under other uids needs root");
        return;
    }
    let domain = Domain::start(&[
        ("/ops", &["unix:uid:1001"], &["--admin"]),
        ("/web", &["unix:uid:1002"], &[]),
    ]);
    let (server, agent_id) = (&domain.server, &domain.agent_id);
    let ops_dir = fetch_svid(&domain, 1001, "ops-svid");
    let web_dir = fetch_svid(&domain, 1002, "web-svid");

    // The admin workload creates an entry over the network.
    let out = remote_cli(
        server,
        &ops_dir,
        &[
            "entry",
            "create",
            "--output",
            "json",
            "--spiffe-id",
            "spiffe://example.org/db",
            "--parent-id",
            agent_id,
            "--selector",
            "unix:uid:1003",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let created: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let created = created
        .as_array()
        .and_then(|a| a.first())
        .unwrap_or(&created);
    assert_eq!(created["spiffe_id"], "spiffe://example.org/db");
    let db_id = created["id"].as_str().unwrap().to_owned();
    let shown = server.cli_ok(&["entry", "show", "--entry-id", &db_id]);
    assert!(shown.contains("spiffe://example.org/db"), "{shown}");

    // The same identity given file by file reads it back over the network.
    let out = std::process::Command::new(server_bin())
        .args(["entry", "show", "--entry-id", &db_id])
        .args(["--server-address", &server.address])
        .arg("--cert")
        .arg(ops_dir.join("svid.0.pem"))
        .arg("--key")
        .arg(ops_dir.join("svid.0.key"))
        .arg("--bundle")
        .arg(ops_dir.join("bundle.0.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("spiffe://example.org/db"),
        "{}",
        stdout(&out)
    );

    // A workload without an admin entry is refused, by the CLI and on the
    // wire with PERMISSION_DENIED.
    let out = remote_cli(
        server,
        &web_dir,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/x",
            "--parent-id",
            agent_id,
            "--selector",
            "unix:uid:1004",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("spiffe://example.org/web is not an admin workload"),
        "{}",
        stderr(&out)
    );
    let status = svid_client(server, &web_dir)
        .list_entries(ListEntriesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        status.message(),
        "spiffe://example.org/web is not an admin workload"
    );

    // The agent's own SVID is refused on the admin API.
    let agent_chain = std::fs::read(domain.agent.data_dir.join("agent_svid.pem")).unwrap();
    let agent_key = std::fs::read_to_string(domain.agent.data_dir.join("agent_key.pem")).unwrap();
    let bundle = std::fs::read(domain.agent.data_dir.join("bundle.pem")).unwrap();
    let status = admin_client(server, &bundle, Some((&agent_chain, &agent_key)))
        .list_federated_bundles(ListFederatedBundlesRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        status.message(),
        format!("{agent_id} is not an admin workload")
    );

    // No client certificate: refused.
    let status = admin_client(server, &bundle, None)
        .list_entries(ListEntriesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    // Deleting the admin entry stops admitting its SVID at once.
    let ops_entry: Value = serde_json::from_str(&server.cli_ok(&[
        "entry",
        "show",
        "--output",
        "json",
        "--spiffe-id",
        "spiffe://example.org/ops",
    ]))
    .unwrap();
    let ops_entry_id = ops_entry[0]["id"].as_str().unwrap().to_owned();
    server.cli_ok(&["entry", "delete", "--entry-id", &ops_entry_id]);
    let status = svid_client(server, &ops_dir)
        .list_entries(ListEntriesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        status.message(),
        "spiffe://example.org/ops is not an admin workload"
    );

    // The audit log names the remote caller by SPIFFE ID, and the refusals.
    let events = audit_events(server);
    let remote: Vec<Value> = events
        .iter()
        .filter(|e| e["caller"].get("uid").is_none())
        .map(essentials)
        .collect();
    let denied = |caller: &Value| {
        let message = format!(
            "{} is not an admin workload",
            caller["spiffe_id"].as_str().unwrap()
        );
        json!([caller, "access.denied", [], {"error": {
            "code": "PERMISSION_DENIED",
            "message": message,
        }}])
    };
    let web = json!({"spiffe_id": "spiffe://example.org/web"});
    let ops = json!({"spiffe_id": "spiffe://example.org/ops"});
    let agent = json!({"spiffe_id": agent_id});
    assert_eq!(remote.len(), 6, "{remote:#?}");
    assert_eq!(remote[0], json!([ops, "entry.create", [db_id], "ok"]));
    assert_eq!(remote[1], denied(&web));
    assert_eq!(remote[2], denied(&web));
    assert_eq!(remote[3], denied(&agent));
    assert_eq!(remote[4][1], "access.denied");
    assert_eq!(remote[4][3]["error"]["code"], "UNAUTHENTICATED");
    assert!(
        remote[4][0]["address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(remote[5], denied(&ops));
    let methods: Vec<&str> = events
        .iter()
        .filter(|e| e["action"] == "access.denied")
        .map(|e| e["details"]["method"].as_str().unwrap())
        .collect();
    assert_eq!(
        methods,
        [
            "/sigil.admin.v1.Admin/BatchCreateEntry",
            "/sigil.admin.v1.Admin/ListEntries",
            "/sigil.admin.v1.Admin/ListFederatedBundles",
            "/sigil.admin.v1.Admin/ListEntries",
            "/sigil.admin.v1.Admin/ListEntries",
        ]
    );
}

#[test]
fn the_audit_log_records_every_change_with_its_caller_and_outcome() {
    let uid = own_uid_selector();
    let domain = Domain::start(&[("/a", &[uid.as_str()], &[])]);
    let (server, agent_id) = (&domain.server, &domain.agent_id);
    let me = json!({"uid": nix::unistd::getuid().as_raw()});
    let a_id = server.cli_ok(&["entry", "show", "--output", "json"]);
    let a_id = serde_json::from_str::<Value>(&a_id).unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let (token, token_agent) = server.token(&["--spiffe-id", "spiffe://example.org/node/b"]);
    let b = server.create_entry("spiffe://example.org/b", agent_id, &[uid.as_str()], &[]);
    let b_id = b["id"].as_str().unwrap().to_owned();
    // The same registration again fails.
    let dup = server.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/b",
        "--parent-id",
        agent_id,
        "--selector",
        &uid,
    ]);
    assert!(!dup.status.success());
    server.cli_ok(&[
        "entry",
        "update",
        "--entry-id",
        &b_id,
        "--spiffe-id",
        "spiffe://example.org/b2",
        "--parent-id",
        agent_id,
        "--selector",
        &uid,
    ]);
    server.cli_ok(&["entry", "delete", "--entry-id", &b_id]);
    let missing = server.cli(&["entry", "delete", "--entry-id", "no-such-entry"]);
    assert!(!missing.status.success());
    server.cli_ok(&["agent", "ban", "--spiffe-id", agent_id]);
    server.set_foreign_bundle("other.org");
    server.cli_ok(&["agent", "unban", "--spiffe-id", agent_id]);
    server.cli_ok(&["agent", "evict", "--spiffe-id", agent_id]);
    server.cli_ok(&["bundle", "delete", "--id", "spiffe://other.org"]);
    server.cli_ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/backup",
        "--dns-name",
        "backup.example.org",
    ]);
    let foreign = server.cli(&[
        "token",
        "generate",
        "--spiffe-id",
        "spiffe://other.org/node",
    ]);
    assert_eq!(foreign.status.code(), Some(1), "{}", stderr(&foreign));

    let events = audit_events(server);
    let text = std::fs::read_to_string(server.data_dir.join("audit.log")).unwrap();
    assert!(
        !text.contains(&token),
        "the join token secret is in the audit log"
    );
    let got: Vec<Value> = events.iter().map(essentials).collect();
    let expected = vec![
        // What Domain::start did: the agent's token, then entry /a.
        json!([me, "token.generate", [agent_id], "ok"]),
        json!([me, "entry.create", [a_id], "ok"]),
        json!([me, "token.generate", [token_agent], "ok"]),
        json!([me, "entry.create", [b_id], "ok"]),
        json!([me, "entry.create", [], {"error": {
            "code": "ALREADY_EXISTS",
            "message": format!(
                "entries[0]: entry with the same spiffe_id, parent_id and selectors exists: {b_id}"
            ),
        }}]),
        json!([me, "entry.update", [b_id], "ok"]),
        json!([me, "entry.delete", [b_id], "ok"]),
        json!([me, "entry.delete", ["no-such-entry"], {"error": {
            "code": "NOT_FOUND",
            "message": "ids[0]: no entry \"no-such-entry\"",
        }}]),
        json!([me, "agent.ban", [agent_id], "ok"]),
        json!([me, "bundle.set", ["other.org"], "ok"]),
        json!([me, "agent.unban", [agent_id], "ok"]),
        json!([me, "agent.evict", [agent_id], "ok"]),
        json!([me, "bundle.delete", ["other.org"], "ok"]),
        json!([me, "x509.mint", ["spiffe://example.org/backup"], "ok"]),
        json!([me, "token.generate", ["spiffe://other.org/node"], {"error": {
            "code": "INVALID_ARGUMENT",
            "message": "agent_id: \"spiffe://other.org/node\" is not in trust domain example.org",
        }}]),
    ];
    assert_eq!(got, expected, "{got:#?}");

    // Details that help an auditor, never secrets.
    assert_eq!(events[3]["details"]["spiffe_id"], "spiffe://example.org/b");
    assert_eq!(events[5]["details"]["spiffe_id"], "spiffe://example.org/b2");
    let token_id = events[2]["details"]["token_id"].as_str().unwrap();
    assert_eq!(token_id.len(), 16, "{token_id}");
    assert_eq!(events[9]["details"]["x509_authorities"], 1);
    assert_eq!(
        events[13]["details"]["dns_names"],
        json!(["backup.example.org"])
    );
    assert!(events[13]["details"]["expires_at"].is_string());
}
