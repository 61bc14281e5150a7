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
