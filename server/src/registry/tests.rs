use std::sync::Arc;

use sigil::proto::sigil::types::v1 as pb;
use sigil::{SpiffeId, TrustDomain};

use super::{ListQuery, Registry, RegistryError};
use crate::store::SledStore;

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
        spiffe_ids(&r.entitled(&id(AGENT))),
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
    // An entry naming the agent itself as SPIFFE ID under one of its own.
    create(r, wire(AGENT, "spiffe://example.org/b", "3")).await;

    let entitled = r.entitled(&id(AGENT));
    assert_eq!(entitled.len(), 4);
    assert_eq!(
        spiffe_ids(&entitled),
        [
            "spiffe://example.org/a",
            "spiffe://example.org/a",
            "spiffe://example.org/b",
            AGENT
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

    bad.spiffe_id = AGENT.into();
    let err = r.create(&[bad]).await.remove(0).unwrap_err();
    assert_eq!(
        err.item_message("entries[0]", None),
        "entries[0].parent_id: must differ from spiffe_id"
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
    assert!(r.entitled(&id(AGENT)).is_empty());
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
    assert_eq!(r.entitled(&id(AGENT)).len(), 1);
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
