//! Refusals: every hostile or mistaken input gets a precise error, and
//! nothing stored is lost.

use std::os::unix::process::CommandExt;
use std::time::Duration;

use sigil::proto::sigil::agent::v1::{BatchNewX509SvidRequest, X509SvidParams};
use sigil::proto::workload::X509svidRequest;
use tonic::Code;

use crate::support::*;

#[test]
fn a_join_token_works_once() {
    let dir = scratch();
    let server = Server::start(dir.path());
    let (token, agent_id) = server.token(&[]);
    assert!(agent_id.starts_with("spiffe://example.org/sigil/agent/join_token/"));
    assert!(
        !agent_id.contains(&token),
        "the secret token must not appear in the agent ID"
    );
    let first = Agent::start(&server, "first", Some(&token));

    let (status, log) = Agent::run_to_failure(&server, "second", Some(&token), None);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("join token is not valid (unknown or already used)"),
        "{log}"
    );
    assert!(
        !server.log().contains(&token),
        "the server must not log tokens"
    );
    assert!(
        !first.log().contains(&token),
        "the agent must not log tokens"
    );
}

#[test]
fn an_expired_join_token_is_refused() {
    let dir = scratch();
    let server = Server::start(dir.path());
    let (token, _) = server.token(&["--ttl", "1"]);
    // The token's lifetime is real time on the server; let it pass.
    std::thread::sleep(Duration::from_millis(2100));
    let (status, log) = Agent::run_to_failure(&server, "late", Some(&token), None);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("join token expired"), "{log}");
}

#[test]
fn an_agent_with_the_wrong_bootstrap_bundle_does_not_connect() {
    let dir = scratch();
    let server = Server::start(dir.path());
    let (token, _) = server.token(&[]);
    let td = sigil::TrustDomain::new(TD).unwrap();
    let other = sigil::x509::Authority::self_signed(&td, Duration::from_secs(3600)).unwrap();
    let pem = sigil::bundle::cert_to_pem(other.cert());

    let (status, log) = Agent::run_to_failure(&server, "misled", Some(&token), Some(&pem));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.to_lowercase().contains("certificate"), "{log}");

    // The token was not spent on the failed connection.
    let _agent = Agent::start(&server, "fixed", Some(&token));
}

#[test]
fn no_token_and_no_stored_identity_is_a_clear_error() {
    let dir = scratch();
    let server = Server::start(dir.path());
    let (status, log) = Agent::run_to_failure(&server, "bare", None, None);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("join token"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_obtain_identities_it_is_not_entitled_to() {
    let uid = own_uid_selector();
    let domain = tokio::task::block_in_place(|| Domain::start(&[("/mine", &[uid.as_str()], &[])]));
    let (other_token, other_agent) = domain.server.token(&[]);
    let theirs = domain.server.create_entry(
        "spiffe://example.org/theirs",
        &other_agent,
        &[uid.as_str()],
        &[],
    );
    let mine = domain.server.cli_ok(&[
        "entry",
        "show",
        "--spiffe-id",
        "spiffe://example.org/mine",
        "--output",
        "json",
    ]);
    let mine: serde_json::Value = serde_json::from_str(&mine).unwrap();
    let mine_id = mine[0]["id"].as_str().unwrap().to_owned();
    drop(other_token);

    let mut client = agent_api_client(&domain.agent, &domain.server).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let csr_for = |id: &str| sigil::x509::build_csr(&key, Some(&id.parse().unwrap())).unwrap();

    // Another agent's entry: refused, nothing signed, even with a valid item beside it.
    let err = client
        .batch_new_x509_svid(BatchNewX509SvidRequest {
            params: vec![
                X509SvidParams {
                    entry_id: mine_id.clone(),
                    csr: csr_for("spiffe://example.org/mine"),
                },
                X509SvidParams {
                    entry_id: theirs["id"].as_str().unwrap().to_owned(),
                    csr: csr_for("spiffe://example.org/theirs"),
                },
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("params[1].entry_id"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("not entitled"), "{}", err.message());

    // Its own entry, but a CSR naming another SPIFFE ID.
    let err = client
        .batch_new_x509_svid(BatchNewX509SvidRequest {
            params: vec![X509SvidParams {
                entry_id: mine_id.clone(),
                csr: csr_for("spiffe://example.org/theirs"),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("params[0].csr"), "{}", err.message());

    // A CSR that is not a CSR.
    let err = client
        .batch_new_x509_svid(BatchNewX509SvidRequest {
            params: vec![X509SvidParams {
                entry_id: mine_id.clone(),
                csr: b"not a csr".to_vec(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("params[0].csr"), "{}", err.message());

    // The well-formed request for its own entry is signed, for that ID only.
    let ok = client
        .batch_new_x509_svid(BatchNewX509SvidRequest {
            params: vec![X509SvidParams {
                entry_id: mine_id,
                csr: csr_for("spiffe://example.org/mine"),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.svids.len(), 1);
    let leaf = &ok.svids[0].cert_chain[0];
    assert_eq!(
        sigil::x509::check_leaf(leaf).unwrap().to_string(),
        "spiffe://example.org/mine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_requires_the_security_header() {
    let uid = own_uid_selector();
    let domain = tokio::task::block_in_place(|| Domain::start(&[("/web", &[uid.as_str()], &[])]));
    let mut client = raw_workload_client(&domain.agent).await;

    let err = client.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "security header missing from request");

    let mut wrong = tonic::Request::new(X509svidRequest {});
    wrong
        .metadata_mut()
        .insert("workload.spiffe.io", "TRUE".parse().unwrap());
    let err = client.fetch_x509svid(wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // With the header, the JWT profile answers UNIMPLEMENTED (not a hang).
    let mut jwt = tonic::Request::new(sigil::proto::workload::JwtsvidRequest {
        audience: vec!["a".into()],
        spiffe_id: String::new(),
    });
    jwt.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let err = client.fetch_jwtsvid(jwt).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}

#[test]
fn malformed_ids_and_selectors_at_the_cli_are_refused_and_nothing_is_stored() {
    let dir = scratch();
    let server = Server::start(dir.path());
    let parent = "spiffe://example.org/sigil/agent/x";

    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--spiffe-id",
                "spiffe://Example.org/web",
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1",
            ],
            "--spiffe-id",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/a//b",
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1",
            ],
            "--spiffe-id",
        ),
        (
            &[
                "--spiffe-id",
                "http://example.org/web",
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1",
            ],
            "--spiffe-id",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/web",
                "--parent-id",
                "spiffe://example.org/x?y",
                "--selector",
                "unix:uid:1",
            ],
            "--parent-id",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/web",
                "--parent-id",
                parent,
                "--selector",
                "unix",
            ],
            "--selector",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/web",
                "--parent-id",
                parent,
                "--selector",
                ":1000",
            ],
            "--selector",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://other.org/web",
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1",
            ],
            "trust domain",
        ),
    ];
    for (args, mention) in cases {
        let mut full = vec!["entry", "create"];
        full.extend_from_slice(args);
        let out = server.cli(&full);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.starts_with("Error: "), "{args:?}: {err}");
        assert!(
            err.contains(mention),
            "{args:?} should mention {mention}: {err}"
        );
    }
    assert_eq!(
        server.cli_ok(&["entry", "show", "--output", "json"]).trim(),
        "[]"
    );

    let out = server.cli(&["entry", "show", "--entry-id", "no-such-entry"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no-such-entry"), "{}", stderr(&out));

    let out = server.cli(&[
        "token",
        "generate",
        "--spiffe-id",
        "spiffe://example.org/a/",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--spiffe-id"), "{}", stderr(&out));
}

#[test]
fn admin_socket_admits_only_its_group_and_the_servers_user() {
    if !is_root() {
        eprintln!("skipped: running the CLI as other uids needs root");
        return;
    }
    let dir = scratch();
    // gid 1 is the `daemon` group on Debian; any existing group will do.
    let server = Server::start_with(dir.path(), &["--admin-socket-group", "daemon"]);
    let cli = copy_for_others(&server_bin(), dir.path());
    let run_as = |uid: u32, gid: u32| {
        let mut cmd = std::process::Command::new(&cli);
        cmd.args(["bundle", "show", "--socket-path"])
            .arg(&server.admin_socket)
            .uid(uid)
            .gid(gid);
        output_of(&mut cmd)
    };

    let member = run_as(1001, 1);
    assert!(member.status.success(), "{}", stderr(&member));
    assert!(stdout(&member).contains("BEGIN CERTIFICATE"));

    let outsider = run_as(1002, 1002);
    assert_eq!(outsider.status.code(), Some(1));
    assert!(
        stderr(&outsider).contains("cannot reach the server's admin socket"),
        "{}",
        stderr(&outsider)
    );
    assert!(
        stderr(&outsider).contains("Permission denied"),
        "{}",
        stderr(&outsider)
    );
}
