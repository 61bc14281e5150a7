use std::sync::Arc;

use sigil::proto::sigil::types::v1 as pb;
use sigil::{SpiffeId, TrustDomain};

use super::{ListQuery, Registry, RegistryError, SelectorMatch};
use crate::store::{AgentRecord, SledStore};

const AGENT: &str = "spiffe://example.org/sigil/agent/join_token/a1";

struct Fixture {
    registry: Registry,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
    let registry = Registry::load(TrustDomain::new("example.org").unwrap(), store)
        .await
        .unwrap();
    Fixture {
        registry,
        _dir: dir,
    }
}

fn wire(spiffe_id: &str, parent_id: &str, uid: &str) -> pb::Entry {
    pb::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: parent_id.into(),
        selectors: vec![pb::Selector {
            r#type: "unix".into(),
            value: format!("uid:{uid}"),
        }],
        ..Default::default()
    }
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

/// An attested agent with the node selectors `node`.
fn agent_with(spiffe_id: &str, node: &[&str]) -> AgentRecord {
    AgentRecord {
        spiffe_id: id(spiffe_id),
        attestation_type: "join_token".into(),
        serial: "01".into(),
        previous_serial: None,
        expires_at: i64::MAX,
        created_at: 1,
        banned: false,
        selectors: node.iter().map(|s| s.parse().unwrap()).collect(),
    }
}

/// The join-token agent [`AGENT`], without node selectors.
fn agent() -> AgentRecord {
    agent_with(AGENT, &[])
}

async fn create(registry: &Registry, entry: pb::Entry) -> Arc<sigil::Entry> {
    registry.create(&[entry]).await.remove(0).unwrap()
}

fn spiffe_ids(entries: &[Arc<sigil::Entry>]) -> Vec<String> {
    let mut ids: Vec<String> = entries.iter().map(|e| e.spiffe_id.to_string()).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn entitlement_follows_nested_parents() {
    let f = fixture().await;
    let r = &f.registry;
    create(r, wire("spiffe://example.org/node", AGENT, "0")).await;
    create(
        r,
        wire("spiffe://example.org/web", "spiffe://example.org/node", "1"),
    )
    .await;
    create(
        r,
        wire(
            "spiffe://example.org/web/db",
            "spiffe://example.org/web",
            "2",
        ),
    )
    .await;
    // Under another agent: not entitled.
    create(
        r,
        wire(
            "spiffe://example.org/other",
            "spiffe://example.org/sigil/agent/join_token/b2",
            "3",
        ),
    )
    .await;

    assert_eq!(
        spiffe_ids(&r.entitled(&agent())),
        [
            "spiffe://example.org/node",
            "spiffe://example.org/web",
            "spiffe://example.org/web/db"
        ]
    );
}

#[tokio::test]
async fn entitlement_terminates_on_a_cycle() {
    let f = fixture().await;
    let r = &f.registry;
    create(r, wire("spiffe://example.org/a", AGENT, "0")).await;
    create(
        r,
        wire("spiffe://example.org/b", "spiffe://example.org/a", "1"),
    )
    .await;
    create(
        r,
        wire("spiffe://example.org/a", "spiffe://example.org/b", "2"),
    )
    .await;
    // An entry naming the first one's SPIFFE ID again, deeper down.
    create(
        r,
        wire("spiffe://example.org/b", "spiffe://example.org/a", "3"),
    )
    .await;

    let entitled = r.entitled(&agent());
    assert_eq!(entitled.len(), 4);
    assert_eq!(
        spiffe_ids(&entitled),
        [
            "spiffe://example.org/a",
            "spiffe://example.org/a",
            "spiffe://example.org/b",
            "spiffe://example.org/b",
        ]
    );
}

#[tokio::test]
async fn a_duplicate_registration_is_refused() {
    let f = fixture().await;
    let r = &f.registry;
    let first = create(r, wire("spiffe://example.org/web", AGENT, "1")).await;
    let results = r
        .create(&[
            wire("spiffe://example.org/web", AGENT, "1"),
            wire("spiffe://example.org/web", AGENT, "2"),
        ])
        .await;
    let err = results[0].as_ref().unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert_eq!(
        err.item_message("entries[0]", Some("id")),
        format!(
            "entries[0]: entry with the same spiffe_id, parent_id and selectors exists: {}",
            first.id
        )
    );
    assert!(results[1].is_ok());
    assert_eq!(r.len(), 2);
}

#[tokio::test]
async fn invalid_fields_are_named() {
    let f = fixture().await;
    let r = &f.registry;
    let mut bad = wire("spiffe://example.org/a//b", AGENT, "1");
    let err = r.create(&[bad.clone()]).await.remove(0).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.item_message("entries[0]", None)
            .starts_with("entries[0].spiffe_id: \"spiffe://example.org/a//b\" "),
        "{err}"
    );

    bad.spiffe_id = "spiffe://example.org/node".into();
    bad.parent_id = "spiffe://example.org/node".into();
    let err = r.create(&[bad.clone()]).await.remove(0).unwrap_err();
    assert_eq!(
        err.item_message("entries[0]", None),
        "entries[0].parent_id: must differ from spiffe_id"
    );

    bad.spiffe_id = AGENT.into();
    bad.parent_id = "spiffe://example.org/node".into();
    let err = r.create(&[bad]).await.remove(0).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        err.item_message("entries[0]", None),
        format!(
            "entries[0].spiffe_id: \"{AGENT}\" is under /sigil/, which is reserved for the server and agents"
        )
    );
}

#[tokio::test]
async fn update_keeps_created_at_and_bumps_the_revision() {
    let f = fixture().await;
    let r = &f.registry;
    let mut changes = r.subscribe();
    let created = create(r, wire("spiffe://example.org/web", AGENT, "1")).await;
    assert!(changes.has_changed().unwrap());
    changes.borrow_and_update();

    let mut new = wire("spiffe://example.org/web2", AGENT, "1");
    new.id = created.id.clone();
    new.hint = "changed".into();
    new.created_at = 1;
    let updated = r.update(&[new]).await.remove(0).unwrap();
    assert_eq!(updated.id, created.id);
    assert_eq!(updated.created_at, created.created_at);
    assert!(updated.revision > created.revision);
    assert_eq!(updated.hint, "changed");
    assert_eq!(r.get(&created.id).unwrap(), updated);
    assert!(changes.has_changed().unwrap());

    let mut unknown = wire("spiffe://example.org/web", AGENT, "1");
    unknown.id = "nope".into();
    let err = r.update(&[unknown]).await.remove(0).unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(
        err.item_message("entries[0]", Some("id")),
        "entries[0].id: no entry \"nope\""
    );
}

#[tokio::test]
async fn delete_removes_from_entitlement_and_unknown_ids_are_not_found() {
    let f = fixture().await;
    let r = &f.registry;
    let e = create(r, wire("spiffe://example.org/web", AGENT, "1")).await;
    let results = r.delete(&[e.id.clone(), e.id.clone()]).await;
    assert_eq!(results[0].as_ref().unwrap().id, e.id);
    assert!(matches!(results[1], Err(RegistryError::NotFound(_))));
    assert!(r.entitled(&agent()).is_empty());
}

#[tokio::test]
async fn entries_survive_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let td = TrustDomain::new("example.org").unwrap();
    let created = {
        let store = Arc::new(SledStore::open(&path).unwrap());
        let r = Registry::load(td.clone(), store).await.unwrap();
        create(&r, wire("spiffe://example.org/web", AGENT, "1")).await
    };
    let store = Arc::new(SledStore::open(&path).unwrap());
    let r = Registry::load(td, store).await.unwrap();
    assert_eq!(r.get(&created.id).unwrap(), created);
    assert_eq!(r.entitled(&agent()).len(), 1);
}

#[tokio::test]
async fn list_pages_in_id_order_with_filters() {
    let f = fixture().await;
    let r = &f.registry;
    for uid in 0..5 {
        create(r, wire("spiffe://example.org/web", AGENT, &uid.to_string())).await;
    }
    create(r, wire("spiffe://example.org/db", AGENT, "9")).await;

    let web = id("spiffe://example.org/web");
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let (page, more) = r.list(&ListQuery {
            spiffe_id: Some(&web),
            after: after.as_deref(),
            limit: 2,
            ..Default::default()
        });
        seen.extend(page.iter().map(|e| e.id.clone()));
        if !more {
            break;
        }
        after = page.last().map(|e| e.id.clone());
    }
    assert_eq!(seen.len(), 5);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted);
}

fn with_selectors(spiffe_id: &str, selectors: &[&str]) -> pb::Entry {
    pb::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: AGENT.into(),
        selectors: selectors
            .iter()
            .map(|s| {
                let (kind, value) = s.split_once(':').unwrap();
                pb::Selector {
                    r#type: kind.into(),
                    value: value.into(),
                }
            })
            .collect(),
        ..Default::default()
    }
}

fn selectors(list: &[&str]) -> sigil::Selectors {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[tokio::test]
async fn a_given_id_is_kept_and_creating_it_again_is_refused() {
    let f = fixture().await;
    let r = &f.registry;
    let mut item = wire("spiffe://example.org/web", AGENT, "1");
    item.id = "web-1".into();
    let created = create(r, item.clone()).await;
    assert_eq!(created.id, "web-1");
    assert_eq!(r.get("web-1").unwrap(), created);

    // The same content again, and other content under the same ID.
    let mut other = wire("spiffe://example.org/other", AGENT, "2");
    other.id = "web-1".into();
    for again in [item, other] {
        let err = r.create(&[again]).await.remove(0).unwrap_err();
        assert_eq!(err.code(), tonic::Code::AlreadyExists);
        assert_eq!(
            err.item_message("entries[0]", Some("id")),
            "entries[0].id: entry \"web-1\" already exists"
        );
    }
    assert_eq!(r.len(), 1);

    let mut bad = wire("spiffe://example.org/bad", AGENT, "3");
    bad.id = "no spaces".into();
    let err = r.create(&[bad]).await.remove(0).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        err.item_message("entries[0]", Some("id")),
        "entries[0].id: only ASCII letters, digits, `-`, `_` and `.` are allowed"
    );
}

#[tokio::test]
async fn the_new_fields_are_stored_and_survive_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let td = TrustDomain::new("example.org").unwrap();
    let mut item = wire("spiffe://example.org/web", AGENT, "1");
    item.jwt_svid_ttl = 120;
    item.federates_with = vec!["partner.org".into()];
    item.admin = true;
    item.downstream = true;
    item.expires_at = 4_000_000_000;
    let created = {
        let store = Arc::new(SledStore::open(&path).unwrap());
        let r = Registry::load(td.clone(), store).await.unwrap();
        create(&r, item).await
    };
    let store = Arc::new(SledStore::open(&path).unwrap());
    let r = Registry::load(td, store).await.unwrap();
    let loaded = r.get(&created.id).unwrap();
    assert_eq!(loaded, created);
    let wire = loaded.to_proto();
    assert_eq!(wire.jwt_svid_ttl, 120);
    assert_eq!(wire.federates_with, ["partner.org"]);
    assert!(wire.admin && wire.downstream);
    assert_eq!(wire.expires_at, 4_000_000_000);
}

#[tokio::test]
async fn selector_filters_follow_the_match_mode() {
    let f = fixture().await;
    let r = &f.registry;
    for (path, sel) in [
        ("/a", &["unix:uid:1"][..]),
        ("/ab", &["unix:uid:1", "unix:gid:2"]),
        ("/abc", &["unix:uid:1", "unix:gid:2", "unix:user:c"]),
        ("/c", &["unix:user:c"]),
    ] {
        create(
            r,
            with_selectors(&format!("spiffe://example.org{path}"), sel),
        )
        .await;
    }

    let given = selectors(&["unix:uid:1", "unix:gid:2"]);
    let matching = |mode| {
        let query = ListQuery {
            selectors: Some((&given, mode)),
            limit: 100,
            ..Default::default()
        };
        let (page, _) = r.list(&query);
        assert_eq!(r.count(&query), page.len());
        let mut paths: Vec<String> = page.iter().map(|e| e.spiffe_id.path().to_owned()).collect();
        paths.sort();
        paths
    };
    assert_eq!(matching(SelectorMatch::Exact), ["/ab"]);
    assert_eq!(matching(SelectorMatch::Subset), ["/a", "/ab"]);
    assert_eq!(matching(SelectorMatch::Superset), ["/ab", "/abc"]);
    assert_eq!(matching(SelectorMatch::Any), ["/a", "/ab", "/abc"]);
}

#[tokio::test]
async fn id_hint_and_federation_filters_combine() {
    let f = fixture().await;
    let r = &f.registry;
    let mut a = wire("spiffe://example.org/a", AGENT, "1");
    a.hint = "blue".into();
    a.federates_with = vec!["one.org".into(), "two.org".into()];
    let a = create(r, a).await;
    let mut b = wire("spiffe://example.org/b", AGENT, "2");
    b.hint = "blue".into();
    b.federates_with = vec!["one.org".into()];
    create(r, b).await;
    create(r, wire("spiffe://example.org/c", AGENT, "3")).await;

    let one = TrustDomain::new("one.org").unwrap();
    let two = TrustDomain::new("two.org").unwrap();
    let count = |query: ListQuery<'_>| r.count(&query);
    assert_eq!(count(ListQuery::default()), 3);
    assert_eq!(
        count(ListQuery {
            hint: Some("blue"),
            ..Default::default()
        }),
        2
    );
    assert_eq!(
        count(ListQuery {
            federates_with: std::slice::from_ref(&one),
            ..Default::default()
        }),
        2
    );
    let both = [one, two];
    assert_eq!(
        count(ListQuery {
            federates_with: &both,
            ..Default::default()
        }),
        1
    );
    assert_eq!(
        count(ListQuery {
            id: Some(&a.id),
            hint: Some("blue"),
            ..Default::default()
        }),
        1
    );
    assert_eq!(
        count(ListQuery {
            id: Some(&a.id),
            hint: Some("red"),
            ..Default::default()
        }),
        0
    );
}

#[tokio::test]
async fn expired_entries_and_those_below_them_are_not_entitled() {
    let f = fixture().await;
    let r = &f.registry;
    let mut node = wire("spiffe://example.org/node", AGENT, "0");
    node.expires_at = 1;
    create(r, node).await;
    create(
        r,
        wire("spiffe://example.org/web", "spiffe://example.org/node", "1"),
    )
    .await;
    let mut future = wire("spiffe://example.org/later", AGENT, "2");
    future.expires_at = 4_000_000_000;
    create(r, future).await;

    assert_eq!(
        spiffe_ids(&r.entitled(&agent())),
        ["spiffe://example.org/later"]
    );
}

#[tokio::test]
async fn pruning_deletes_expired_entries_like_a_delete() {
    let f = fixture().await;
    let r = &f.registry;
    let mut old = wire("spiffe://example.org/old", AGENT, "0");
    old.expires_at = 100;
    let old = create(r, old).await;
    let kept = create(r, wire("spiffe://example.org/kept", AGENT, "1")).await;
    let mut changes = r.subscribe();
    changes.borrow_and_update();

    assert!(r.prune_expired(99).await.is_empty());
    assert!(!changes.has_changed().unwrap());

    let pruned = r.prune_expired(100).await;
    assert_eq!(pruned.len(), 1);
    assert_eq!(pruned[0].as_ref().unwrap().id, old.id);
    assert!(changes.has_changed().unwrap());
    assert!(r.get(&old.id).is_none());
    assert!(r.get(&kept.id).is_some());
    assert_eq!(r.next_expiry(), None);
}

#[tokio::test]
async fn an_entry_stored_before_the_newer_fields_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    {
        // The record as the first release wrote it.
        let db = sled::open(&path).unwrap();
        let entries = db.open_tree("entries").unwrap();
        let old = serde_json::json!({
            "id": "old-1",
            "spiffe_id": "spiffe://example.org/web",
            "parent_id": AGENT,
            "selectors": ["unix:uid:1"],
            "x509_svid_ttl": null,
            "dns_names": [],
            "hint": "",
            "revision": 4,
            "created_at": 1_700_000_000,
        });
        entries
            .insert("old-1", serde_json::to_vec(&old).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    let store = Arc::new(SledStore::open(&path).unwrap());
    let r = Registry::load(TrustDomain::new("example.org").unwrap(), store)
        .await
        .unwrap();
    let entry = r.get("old-1").unwrap();
    assert_eq!(entry.revision, 4);
    assert_eq!(entry.jwt_svid_ttl, None);
    assert!(entry.federates_with.is_empty());
    assert!(!entry.admin && !entry.downstream);
    assert_eq!(entry.expires_at, None);
    assert_eq!(r.entitled(&agent()).len(), 1);
}

mod aliases;
