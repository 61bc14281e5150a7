//! `sigil-server agent list|show|count|ban|unban|evict` against a running
//! agent: a ban closes its entry stream and stops new SVIDs until it is
//! lifted; an eviction ends the agent, which needs a new join token.

use std::time::Duration;

use crate::support::*;

/// How long a change may take to reach a running agent: its entry stream
/// reconnects with a backoff of at most 10 s after a refusal.
const RESUME_TIMEOUT: Duration = Duration::from_secs(40);

fn agents_json(server: &Server, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["agent", "list", "--output", "json"];
    args.extend_from_slice(extra);
    serde_json::from_str::<serde_json::Value>(&server.cli_ok(&args))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn fetched(agent: &Agent) -> String {
    let out = agent.fetch(None, None);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

#[test]
fn a_banned_agent_gets_no_new_svids_until_it_is_unbanned() {
    let uid = own_uid_selector();
    let domain = Domain::start(&[("/before", &[uid.as_str()], &[])]);
    let (server, agent, agent_id) = (&domain.server, &domain.agent, &domain.agent_id);
    assert!(fetched(agent).contains("spiffe://example.org/before"));

    let listed = agents_json(server, &[]);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["spiffe_id"], agent_id.as_str());
    assert_eq!(listed[0]["attestation_type"], "join_token");
    assert_eq!(listed[0]["banned"], false);
    let expires_at = listed[0]["expires_at"].as_str().unwrap();
    assert!(
        expires_at.len() == 20 && expires_at.ends_with('Z'),
        "{expires_at}"
    );
    assert_eq!(
        agents_json(
            server,
            &["--attestation-type", "join_token", "--banned", "false"]
        )
        .len(),
        1
    );
    assert!(agents_json(server, &["--banned", "true"]).is_empty());
    assert!(agents_json(server, &["--selector", "k8s:ns:prod"]).is_empty());
    assert!(agents_json(server, &["--expires-before", "2000-01-01T00:00:00Z"]).is_empty());
    let own_selector = format!("spiffe_id:{agent_id}");
    let by_selector = agents_json(server, &["--selector", &own_selector]);
    assert_eq!(by_selector.len(), 1, "{by_selector:?}");
    assert_eq!(by_selector[0]["spiffe_id"], agent_id.as_str());
    let by_expiry = agents_json(server, &["--expires-before", "2100-01-01T00:00:00Z"]);
    assert_eq!(by_expiry.len(), 1, "{by_expiry:?}");
    let bad = server.cli(&["agent", "list", "--selector", "k8s"]);
    assert_eq!(bad.status.code(), Some(1), "{}", stderr(&bad));
    assert_eq!(
        stderr(&bad),
        "Error: --selector \"k8s\": must be `type:value`\n"
    );
    let bad = server.cli(&["agent", "list", "--expires-before", "soon"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("invalid value 'soon' for '--expires-before"),
        "{}",
        stderr(&bad)
    );
    let human = server.cli_ok(&["agent", "list"]);
    assert!(human.contains(agent_id.as_str()), "{human}");
    assert!(human.contains("join_token"), "{human}");
    assert_eq!(server.cli_ok(&["agent", "count"]), "1 agent\n");
    let shown = server.cli_ok(&["agent", "show", "--spiffe-id", agent_id]);
    assert!(
        shown.contains(&format!("SPIFFE ID        : {agent_id}")),
        "{shown}"
    );

    assert_eq!(
        server.cli_ok(&["agent", "ban", "--spiffe-id", agent_id]),
        format!("Agent {agent_id} banned\n")
    );
    // The server closes the agent's entry stream, and the agent says why.
    let banned = format!("agent {agent_id} is banned");
    eventually("the agent sees the ban", RESUME_TIMEOUT, || {
        agent.log().contains(&banned).then_some(())
    });
    assert!(
        server.log().contains("entry sync closed"),
        "{}",
        server.log()
    );
    assert!(agents_json(server, &["--banned", "true"])[0]["banned"] == true);

    server.create_entry("spiffe://example.org/after", agent_id, &[uid.as_str()], &[]);
    // Nothing signals that an entry did not arrive, so this is a bounded
    // wait: unbanned, an entry reaches the workload in well under a second,
    // so 3 s without it shows the ban holds. The SVID held before the ban
    // is still served.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        let svids = fetched(agent);
        assert!(svids.contains("spiffe://example.org/before"), "{svids}");
        assert!(!svids.contains("spiffe://example.org/after"), "{svids}");
        std::thread::sleep(Duration::from_millis(250));
    }

    assert_eq!(
        server.cli_ok(&["agent", "unban", "--spiffe-id", agent_id]),
        format!("Agent {agent_id} unbanned\n")
    );
    eventually("the new entry after the unban", RESUME_TIMEOUT, || {
        fetched(agent)
            .contains("spiffe://example.org/after")
            .then_some(())
    });
    assert_eq!(agents_json(server, &[])[0]["banned"], false);
}

#[test]
fn an_evicted_agent_exits_and_needs_a_new_token() {
    let mut domain = Domain::start(&[]);
    let agent_id = domain.agent_id.clone();
    let server = &domain.server;

    assert_eq!(
        server.cli_ok(&["agent", "evict", "--spiffe-id", &agent_id]),
        format!("Agent {agent_id} evicted\n")
    );
    // The agent's entry stream is closed; its renewal is refused and it
    // exits (a forced renewal happens within 30 s of the last one).
    let status = domain.agent.wait_for_exit(Duration::from_secs(90));
    assert!(!status.success());
    let log = domain.agent.log();
    assert!(
        log.contains(&format!("agent {agent_id} is not attested"))
            && log.contains("a new join token is needed"),
        "{log}"
    );

    let not_found = format!("Error: no agent \"{agent_id}\"\n");
    for command in ["show", "evict", "ban", "unban"] {
        let out = server.cli(&["agent", command, "--spiffe-id", &agent_id]);
        assert_eq!(out.status.code(), Some(1), "agent {command}");
        assert_eq!(stderr(&out), not_found, "agent {command}");
    }
    assert_eq!(server.cli_ok(&["agent", "count"]), "0 agents\n");
    let out = server.cli(&["agent", "show", "--spiffe-id", "spiffe://example.org/a/"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("Error: --spiffe-id "),
        "{}",
        stderr(&out)
    );
}
