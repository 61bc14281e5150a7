//! Restarts: a restarted server keeps its CA and entries, and its agents
//! reconnect; a restarted agent keeps its identity and serves again without
//! a new join token.

use std::time::Duration;

use crate::support::*;

#[test]
fn restarted_server_keeps_ca_and_entries_and_agents_reconnect() {
    let dir = scratch();
    let bind = format!("127.0.0.1:{}", free_port());
    let mut server = Server::start_on(dir.path(), &bind, &[]);
    let (token, agent_id) = server.token(&[]);
    let uid = own_uid_selector();
    server.create_entry(
        "spiffe://example.org/before",
        &agent_id,
        &[uid.as_str()],
        &[],
    );
    let agent = Agent::start(&server, "agent", Some(&token));

    let bundle_before = server.bundle_pem();
    let entries_before = server.cli_ok(&["entry", "show", "--output", "json"]);

    server.restart();

    assert_eq!(
        server.bundle_pem(),
        bundle_before,
        "the CA must survive a restart"
    );
    assert_eq!(
        server.cli_ok(&["entry", "show", "--output", "json"]),
        entries_before,
        "entries must survive a restart"
    );

    // The agent reconnects: an entry created after the restart reaches the
    // workload through the agent's new sync stream.
    server.create_entry(
        "spiffe://example.org/after",
        &agent_id,
        &[uid.as_str()],
        &[],
    );
    let out = eventually(
        "new entry served after server restart",
        Duration::from_secs(30),
        || {
            let out = agent.fetch(None, None);
            stdout(&out)
                .contains("spiffe://example.org/after")
                .then_some(out)
        },
    );
    assert!(stdout(&out).contains("spiffe://example.org/before"));
}

#[test]
fn restarted_agent_keeps_its_identity_without_a_new_token() {
    let uid = own_uid_selector();
    let mut domain = Domain::start(&[("/web", &[uid.as_str()], &[])]);
    let id_before = domain.agent.spiffe_id();
    assert_eq!(id_before, domain.agent_id);

    domain.agent.restart();

    assert_eq!(domain.agent.spiffe_id(), id_before);
    let out = domain.agent.fetch(None, None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("spiffe://example.org/web"));
}

/// An entry's x509_svid_ttl longer than a sixth of ca_ttl is capped: the
/// server names the entry when it is created and again at every start, and
/// the SVID a workload gets lives no longer than the cap.
#[test]
fn an_entry_lifetime_over_the_rotation_cap_is_named_at_start_and_capped() {
    let dir = scratch();
    // A cap of 1 h.
    let mut server = Server::start_with(dir.path(), &["--ca-ttl", "6h"]);
    let (token, agent_id) = server.token(&[]);
    let uid = own_uid_selector();
    let entry = server.create_entry(
        "spiffe://example.org/long-lived",
        &agent_id,
        &[uid.as_str()],
        &["--x509-svid-ttl", "7200"],
    );
    let id = entry["id"].as_str().unwrap().to_owned();
    let warnings = |log: &str| {
        log.lines()
            .filter(|l| l.contains("longer than a sixth of ca_ttl") && l.contains(&id))
            .count()
    };
    assert_eq!(warnings(&server.log()), 1, "{}", server.log());

    // The log starts anew with each start of the server.
    server.restart();
    assert_eq!(warnings(&server.log()), 1, "{}", server.log());

    let agent = Agent::start(&server, "agent", Some(&token));
    let out_dir = dir.path().join("svid");
    let out = agent.fetch(None, Some(&out_dir));
    assert!(out.status.success(), "{}", stderr(&out));
    let pem = std::fs::read(out_dir.join("svid.0.pem")).unwrap();
    let chain = pem::parse_many(pem).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].contents()).unwrap();
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    // The cap plus the few seconds notBefore is back-dated.
    assert!((3600..=3660).contains(&life), "lifetime {life}s");
}
