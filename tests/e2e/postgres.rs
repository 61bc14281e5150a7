//! The PostgreSQL store: a server keeping its state in a real PostgreSQL
//! database serves agents and workloads, keeps its entries, agents and CA
//! across a restart, and a second server on the same database refuses to
//! start.
//!
//! `SIGIL_TEST_POSTGRES` is a `key=value` connection string of a database
//! where the test may create databases (`./tests/run` starts a throwaway
//! PostgreSQL server and sets it); without it the test is skipped.

use std::path::Path;
use std::process::Command;

use crate::support::*;

/// A database of the test's own, dropped with it.
struct Database {
    admin: String,
    name: String,
    runtime: tokio::runtime::Runtime,
}

impl Database {
    fn create() -> Option<Self> {
        let Ok(admin) = std::env::var("SIGIL_TEST_POSTGRES") else {
            eprintln!("skipped: SIGIL_TEST_POSTGRES (a PostgreSQL connection string) is not set");
            return None;
        };
        let database = Self {
            admin,
            name: format!("sigil_e2e_{}", unique_suffix()),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        };
        database.admin_sql(&format!("CREATE DATABASE {}", database.name));
        Some(database)
    }

    /// The connection string of this database.
    fn connection_string(&self) -> String {
        format!("{} dbname={}", self.admin, self.name)
    }

    fn admin_sql(&self, sql: &str) {
        let admin = self.admin.clone();
        self.runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            client.batch_execute(sql).await.unwrap();
        });
    }

    /// The number of rows of `table` in this database.
    fn count(&self, table: &str) -> i64 {
        let url = self.connection_string();
        self.runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            client
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .unwrap()
                .get(0)
        })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        self.admin_sql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// A name no other test run uses at the same time.
fn unique_suffix() -> String {
    format!(
        "{}_{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn write_config(path: &Path, connection_string: &str) {
    let quoted = serde_json::to_string(connection_string).unwrap();
    std::fs::write(
        path,
        format!("[store]\nbackend = \"postgres\"\nconnection_string = {quoted}\n"),
    )
    .unwrap();
}

#[test]
fn a_server_on_postgres_serves_keeps_its_state_and_has_the_database_to_itself() {
    let Some(database) = Database::create() else {
        return;
    };
    let dir = scratch();
    let config = dir.path().join("server-postgres.toml");
    write_config(&config, &database.connection_string());
    let config_arg = config.to_str().unwrap();

    let mut server = Server::start_with(dir.path(), &["--config", config_arg]);
    let (token, agent_id) = server.token(&[]);
    let uid = own_uid_selector();
    server.create_entry("spiffe://example.org/web", &agent_id, &[uid.as_str()], &[]);
    let agent = Agent::start(&server, "agent", Some(&token));
    let out = agent.fetch(None, None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("spiffe://example.org/web"));

    assert!(
        !server.data_dir.join("store").exists(),
        "no sled store in the data directory"
    );
    assert_eq!(database.count("sigil_entries"), 1);
    assert_eq!(database.count("sigil_agents"), 1);
    assert_eq!(
        database.count("sigil_join_tokens"),
        0,
        "the join token was used up"
    );

    let bundle_before = server.bundle_pem();
    let entries_before = server.cli_ok(&["entry", "show", "--output", "json"]);
    let agents_before = server.cli_ok(&["agent", "list", "--output", "json"]);
    assert!(agents_before.contains(&agent_id), "{agents_before}");

    server.restart();

    assert_eq!(
        server.bundle_pem(),
        bundle_before,
        "the CA survives a restart"
    );
    assert_eq!(
        server.cli_ok(&["entry", "show", "--output", "json"]),
        entries_before,
        "the entries survive a restart"
    );
    assert_eq!(
        server.cli_ok(&["agent", "list", "--output", "json"]),
        agents_before,
        "the attested agent survives a restart"
    );

    let other = dir.path().join("second");
    std::fs::create_dir(&other).unwrap();
    let out = output_of(
        Command::new(server_bin())
            .args(["run", "--trust-domain", TD, "--bind-address", "127.0.0.1:0"])
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(other.join("server"))
            .arg("--admin-socket-path")
            .arg(other.join("admin.sock")),
    );
    assert!(!out.status.success(), "a second server started");
    assert!(
        stderr(&out).contains("another sigil-server is using this database"),
        "{}",
        stderr(&out)
    );
    assert!(
        !other.join("server").join("ready").exists(),
        "the second server never became ready"
    );

    let out = agent.fetch(None, None);
    assert!(
        out.status.success(),
        "the first server still serves: {}",
        stderr(&out)
    );
    drop(agent);
    server.stop();
}
