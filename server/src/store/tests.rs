//! The conformance suite of the [`Store`] backends: every check runs
//! against a real sled database and a real PostgreSQL server.
//!
//! The PostgreSQL checks connect to `SIGIL_TEST_POSTGRES`, a connection
//! string of a database where they may create databases (`./tests/run`
//! starts a throwaway cluster and sets it); each check gets a database of
//! its own, so they run in parallel. Without the variable they are skipped.

use std::sync::Arc;

use sigil::proto::sigil::types::v1 as pb;
use sigil::{Entry, TrustDomain};

use super::postgres::LOCKED_MESSAGE;
use super::*;
use crate::ca::journal::{AuthorityRecord, AuthorityState, Journal};
use crate::ca::live::IssuedSvidRecord;

/// Where a check's store lives; [`Backend::open`] opens it again after the
/// previous store was dropped.
enum Backend {
    Sled(tempfile::TempDir),
    Postgres {
        admin: Box<tokio_postgres::Config>,
        database: String,
    },
}

impl Backend {
    fn sled() -> Self {
        Self::Sled(tempfile::tempdir().unwrap())
    }

    /// A new, empty database, or `None` (the check is skipped) when
    /// `SIGIL_TEST_POSTGRES` is unset.
    async fn postgres() -> Option<Self> {
        let Ok(text) = std::env::var("SIGIL_TEST_POSTGRES") else {
            eprintln!("skipped: SIGIL_TEST_POSTGRES (a PostgreSQL connection string) is not set");
            return None;
        };
        let admin: Box<tokio_postgres::Config> = Box::new(text.parse().unwrap());
        let database = format!("sigil_test_{}", uuid::Uuid::new_v4().simple());
        admin_client(&admin)
            .await
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
        Some(Self::Postgres { admin, database })
    }

    fn postgres_config(&self) -> tokio_postgres::Config {
        match self {
            Self::Sled(_) => unreachable!("a sled backend has no PostgreSQL configuration"),
            Self::Postgres { admin, database } => {
                let mut config = tokio_postgres::Config::clone(admin);
                config.dbname(database);
                config
            }
        }
    }

    async fn open(&self) -> Arc<dyn Store> {
        match self {
            Self::Sled(dir) => Arc::new(SledStore::open(&dir.path().join("store")).unwrap()),
            Self::Postgres { .. } => {
                let (store, _lost) = PostgresStore::connect(&self.postgres_config())
                    .await
                    .unwrap();
                Arc::new(store)
            }
        }
    }

    /// Removes the check's database.
    async fn remove(self) {
        if let Self::Postgres { admin, database } = self {
            admin_client(&admin)
                .await
                .batch_execute(&format!("DROP DATABASE {database} WITH (FORCE)"))
                .await
                .unwrap();
        }
    }
}

async fn admin_client(config: &tokio_postgres::Config) -> tokio_postgres::Client {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// Each check as a test on sled (`sled::NAME`) and on PostgreSQL
/// (`postgres::NAME`).
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod sled {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(&super::Backend::sled()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let Some(backend) = super::Backend::postgres().await else {
                        return;
                    };
                    super::$check(&backend).await;
                    backend.remove().await;
                }
            )*
        }
    };
}

conformance!(
    everything_survives_a_reopen,
    revisions_increase_across_reopens,
    a_deleted_entry_is_returned_once,
    entries_are_replaced_and_listed_by_id,
    a_join_token_is_taken_exactly_once_under_a_race,
    used_tokens_survive_a_reopen_and_are_deleted_by_digest,
    agents_are_replaced_listed_and_deleted_once,
    the_ca_journal_round_trips_and_is_replaced,
    federated_bundles_are_listed_by_name_and_deleted_once,
    issued_svids_are_put_listed_and_deleted_by_key,
);

fn entry(id: &str, spiffe_path: &str) -> Entry {
    let td = TrustDomain::new("example.org").unwrap();
    let mut e = Entry::from_proto(
        &pb::Entry {
            spiffe_id: format!("spiffe://example.org{spiffe_path}"),
            parent_id: "spiffe://example.org/sigil/agent/a".into(),
            selectors: vec![pb::Selector {
                r#type: "unix".into(),
                value: "uid:1000".into(),
            }],
            x509_svid_ttl: 600,
            ..Default::default()
        },
        &td,
    )
    .unwrap();
    e.id = id.into();
    e
}

fn agent(name: &str) -> AgentRecord {
    AgentRecord {
        spiffe_id: format!("spiffe://example.org/sigil/agent/{name}")
            .parse()
            .unwrap(),
        attestation_type: "join_token".into(),
        serial: "4a".into(),
        previous_serial: None,
        expires_at: 2_000_000_000,
        created_at: 1_700_000_000,
        banned: false,
        selectors: ["x509pop:subject:cn:node-1".parse().unwrap()]
            .into_iter()
            .collect(),
    }
}

fn token() -> JoinTokenRecord {
    JoinTokenRecord {
        token_id: "0011223344556677".into(),
        agent_id: "spiffe://example.org/sigil/agent/a".parse().unwrap(),
        expires_at: 2_000_000_000,
    }
}

fn svid(agent_id: &str, entry_id: &str, not_after: i64) -> IssuedSvidRecord {
    IssuedSvidRecord {
        agent_id: agent_id.into(),
        entry_id: entry_id.into(),
        authority_id: "0a1b".into(),
        not_after,
    }
}

fn journal(sequence: u64) -> Journal {
    let authority = |id: &str, state| AuthorityRecord {
        id: id.into(),
        state,
        created_at: 1_700_000_000,
        not_after: 1_700_086_400,
        activated_at: Some(1_700_000_000),
        deactivated_at: None,
        retire_at: None,
        tainted_at: None,
        revoked_at: None,
    };
    Journal {
        sequence,
        authorities: vec![
            authority("0a1b", AuthorityState::Active),
            authority("2c3d", AuthorityState::Prepared),
        ],
    }
}

async fn everything_survives_a_reopen(backend: &Backend) {
    let (r1, r2) = {
        let store = backend.open().await;
        store.put_entry(&entry("a", "/web")).await.unwrap();
        store.put_entry(&entry("b", "/db")).await.unwrap();
        store.delete_entry("b").await.unwrap();
        store.put_agent(&agent("a")).await.unwrap();
        store.put_join_token(b"hash", &token()).await.unwrap();
        let r1 = store.next_revision().await.unwrap();
        let r2 = store.next_revision().await.unwrap();
        store.flush().await.unwrap();
        (r1, r2)
    };
    assert!(r2 > r1);

    let store = backend.open().await;
    assert_eq!(store.list_entries().await.unwrap(), [entry("a", "/web")]);
    assert_eq!(
        store.get_entry("a").await.unwrap(),
        Some(entry("a", "/web"))
    );
    assert_eq!(store.get_entry("b").await.unwrap(), None);
    assert_eq!(
        store.get_agent(&agent("a").spiffe_id).await.unwrap(),
        Some(agent("a"))
    );
    assert_eq!(store.take_join_token(b"hash").await.unwrap(), Some(token()));
    assert!(store.next_revision().await.unwrap() > r2);
}

async fn revisions_increase_across_reopens(backend: &Backend) {
    let mut last = 0;
    for _ in 0..3 {
        let store = backend.open().await;
        for _ in 0..5 {
            let next = store.next_revision().await.unwrap();
            assert!(next > last, "revision {next} after {last}");
            last = next;
        }
        store.flush().await.unwrap();
    }
}

async fn a_deleted_entry_is_returned_once(backend: &Backend) {
    let store = backend.open().await;
    store.put_entry(&entry("a", "/web")).await.unwrap();
    assert_eq!(
        store.delete_entry("a").await.unwrap(),
        Some(entry("a", "/web"))
    );
    assert_eq!(store.delete_entry("a").await.unwrap(), None);
    assert_eq!(store.get_entry("a").await.unwrap(), None);
}

async fn entries_are_replaced_and_listed_by_id(backend: &Backend) {
    let store = backend.open().await;
    store.put_entry(&entry("b", "/b")).await.unwrap();
    store.put_entry(&entry("C", "/c")).await.unwrap();
    store.put_entry(&entry("a", "/a")).await.unwrap();
    store.put_entry(&entry("b", "/b2")).await.unwrap();
    assert_eq!(
        store.list_entries().await.unwrap(),
        [entry("C", "/c"), entry("a", "/a"), entry("b", "/b2")],
        "byte order of the IDs, the replaced entry once"
    );
}

async fn a_join_token_is_taken_exactly_once_under_a_race(backend: &Backend) {
    let store = backend.open().await;
    assert_eq!(store.take_join_token(b"unknown").await.unwrap(), None);
    for round in 0..20u8 {
        let hash = [round; 32];
        store.put_join_token(&hash, &token()).await.unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = Arc::clone(&store);
                let barrier = Arc::clone(&barrier);
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.take_join_token(&hash).await.unwrap()
                })
            })
            .collect();
        let mut winners = 0;
        for task in tasks {
            if let Some(record) = task.await.unwrap() {
                assert_eq!(record, token());
                winners += 1;
            }
        }
        assert_eq!(winners, 1, "round {round}");
    }
}

async fn used_tokens_survive_a_reopen_and_are_deleted_by_digest(backend: &Backend) {
    let record = |agent: &str, expires_at| UsedTokenRecord {
        agent_id: format!("spiffe://example.org/{agent}").parse().unwrap(),
        expires_at,
    };
    {
        let store = backend.open().await;
        store
            .put_used_token(&[2; 32], &record("b", 20))
            .await
            .unwrap();
        store
            .put_used_token(&[1; 32], &record("a", 10))
            .await
            .unwrap();
        store
            .put_used_token(&[3; 32], &record("c", 30))
            .await
            .unwrap();
        store.flush().await.unwrap();
    }
    let store = backend.open().await;
    assert_eq!(
        store.list_used_tokens().await.unwrap(),
        [
            (vec![1; 32], record("a", 10)),
            (vec![2; 32], record("b", 20)),
            (vec![3; 32], record("c", 30)),
        ]
    );
    store
        .delete_used_tokens(&[vec![1; 32], vec![3; 32], vec![9; 32]])
        .await
        .unwrap();
    store.delete_used_tokens(&[]).await.unwrap();
    assert_eq!(
        store.list_used_tokens().await.unwrap(),
        [(vec![2; 32], record("b", 20))]
    );
}

async fn agents_are_replaced_listed_and_deleted_once(backend: &Backend) {
    let store = backend.open().await;
    store.put_agent(&agent("b")).await.unwrap();
    store.put_agent(&agent("a")).await.unwrap();
    let mut banned = agent("b");
    banned.banned = true;
    banned.previous_serial = Some("49".into());
    store.put_agent(&banned).await.unwrap();
    assert_eq!(
        store.list_agents().await.unwrap(),
        [agent("a"), banned.clone()]
    );
    let id = banned.spiffe_id.clone();
    assert_eq!(store.get_agent(&id).await.unwrap(), Some(banned.clone()));
    assert_eq!(store.delete_agent(&id).await.unwrap(), Some(banned));
    assert_eq!(store.delete_agent(&id).await.unwrap(), None);
    assert_eq!(store.get_agent(&id).await.unwrap(), None);
    assert_eq!(store.list_agents().await.unwrap(), [agent("a")]);
}

async fn the_ca_journal_round_trips_and_is_replaced(backend: &Backend) {
    {
        let store = backend.open().await;
        assert_eq!(store.get_ca_journal().await.unwrap(), None);
        store.put_ca_journal(&journal(1)).await.unwrap();
        store.put_ca_journal(&journal(u64::MAX)).await.unwrap();
        store.flush().await.unwrap();
    }
    let store = backend.open().await;
    assert_eq!(
        store.get_ca_journal().await.unwrap(),
        Some(journal(u64::MAX))
    );
}

async fn federated_bundles_are_listed_by_name_and_deleted_once(backend: &Backend) {
    let store = backend.open().await;
    let record = |td: &str| FederatedBundleRecord {
        trust_domain: td.into(),
        x509_authorities_pem: format!("pem of {td}"),
        sequence: 1,
    };
    store.put_federated_bundle(&record("b.org")).await.unwrap();
    store.put_federated_bundle(&record("a.org")).await.unwrap();
    store.put_federated_bundle(&record("c.org")).await.unwrap();
    let mut replaced = record("b.org");
    replaced.sequence = u64::MAX;
    store.put_federated_bundle(&replaced).await.unwrap();
    assert_eq!(
        store.list_federated_bundles().await.unwrap(),
        [record("a.org"), replaced.clone(), record("c.org")]
    );
    assert_eq!(
        store.delete_federated_bundle("b.org").await.unwrap(),
        Some(replaced)
    );
    assert_eq!(store.delete_federated_bundle("b.org").await.unwrap(), None);
    assert_eq!(
        store.list_federated_bundles().await.unwrap(),
        [record("a.org"), record("c.org")]
    );
}

async fn issued_svids_are_put_listed_and_deleted_by_key(backend: &Backend) {
    let a = "spiffe://example.org/sigil/agent/a";
    let b = "spiffe://example.org/sigil/agent/b";
    {
        let store = backend.open().await;
        store
            .put_issued_svids(&[svid(b, "e1", 1), svid(a, "e2", 2)])
            .await
            .unwrap();
        store
            .put_issued_svids(&[svid(a, "e1", 3), svid(a, "e1", 4)])
            .await
            .unwrap();
        store.put_issued_svids(&[]).await.unwrap();
        store.flush().await.unwrap();
    }
    let store = backend.open().await;
    assert_eq!(
        store.list_issued_svids().await.unwrap(),
        [svid(a, "e1", 4), svid(a, "e2", 2), svid(b, "e1", 1)],
        "by agent then entry, the last record of a key kept"
    );
    store
        .delete_issued_svids(&[svid(a, "e1", 0).key(), svid(b, "e9", 0).key()])
        .await
        .unwrap();
    store.delete_issued_svids(&[]).await.unwrap();
    assert_eq!(
        store.list_issued_svids().await.unwrap(),
        [svid(a, "e2", 2), svid(b, "e1", 1)]
    );
}

#[tokio::test]
async fn a_second_postgres_store_on_one_database_is_refused_until_the_first_closes() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let config = backend.postgres_config();
    let (first, _lost) = PostgresStore::connect(&config).await.unwrap();
    let refused = PostgresStore::connect(&config).await.unwrap_err();
    assert!(refused.to_string().contains(LOCKED_MESSAGE), "{refused}");
    drop(first);
    let (again, _lost) = PostgresStore::connect(&config).await.unwrap();
    again.put_entry(&entry("a", "/web")).await.unwrap();
    drop(again);
    backend.remove().await;
}

#[tokio::test]
async fn a_postgres_store_reports_its_lost_connection() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let Backend::Postgres { admin, database } = &backend else {
        unreachable!("Backend::postgres is a PostgreSQL backend")
    };
    let (store, lost) = PostgresStore::connect(&backend.postgres_config())
        .await
        .unwrap();
    admin_client(admin)
        .await
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[database],
        )
        .await
        .unwrap();
    let reason = lost.await.unwrap();
    assert!(reason.contains("PostgreSQL"), "{reason}");
    assert!(store.list_entries().await.is_err());
    drop(store);
    backend.remove().await;
}

#[tokio::test]
async fn a_postgres_database_of_another_schema_version_is_refused() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let config = backend.postgres_config();
    drop(PostgresStore::connect(&config).await.unwrap());
    admin_client(&config)
        .await
        .batch_execute("UPDATE sigil_schema SET version = 2")
        .await
        .unwrap();
    let refused = PostgresStore::connect(&config).await.unwrap_err();
    assert!(
        refused.to_string().contains("schema version 2"),
        "{refused}"
    );
    backend.remove().await;
}
