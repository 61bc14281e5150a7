//! Node aliases: resolution through the selector index, entitlement through
//! aliases, and the index checked against a brute-force computation.

use std::collections::BTreeSet;
use std::sync::Arc;

use sigil::proto::sigil::types::v1 as pb;
use sigil::{Entry, SpiffeId};

use super::{AGENT, agent, agent_with, create, fixture, spiffe_ids, wire};
use crate::registry::{ListQuery, Registry};
use crate::store::AgentRecord;

const SERVER: &str = "spiffe://example.org/sigil/server";

/// An alias entry: the server as parent and the given selectors.
fn alias(spiffe_id: &str, selectors: &[&str]) -> pb::Entry {
    pb::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: SERVER.into(),
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

#[tokio::test]
async fn an_agent_whose_node_selectors_cover_the_alias_gets_its_children() {
    let f = fixture().await;
    let r = &f.registry;
    create(
        r,
        alias(
            "spiffe://example.org/nodes/web",
            &["x509pop:subject:cn:web", "x509pop:ca:fingerprint:aa"],
        ),
    )
    .await;
    create(
        r,
        wire(
            "spiffe://example.org/app",
            "spiffe://example.org/nodes/web",
            "1",
        ),
    )
    .await;

    let both = agent_with(
        "spiffe://example.org/sigil/agent/x509pop/aa/1",
        &[
            "x509pop:subject:cn:web",
            "x509pop:ca:fingerprint:aa",
            "x509pop:serialnumber:01",
        ],
    );
    assert_eq!(spiffe_ids(&r.entitled(&both)), ["spiffe://example.org/app"]);
    // One of the two selectors is not enough.
    let one = agent_with(
        "spiffe://example.org/sigil/agent/x509pop/aa/2",
        &["x509pop:subject:cn:web"],
    );
    assert!(r.entitled(&one).is_empty());
    assert!(r.entitled(&agent()).is_empty());
}

#[tokio::test]
async fn the_implicit_spiffe_id_selector_names_one_agent() {
    let f = fixture().await;
    let r = &f.registry;
    create(
        r,
        alias(
            "spiffe://example.org/nodes/web",
            &[&format!("spiffe_id:{AGENT}")],
        ),
    )
    .await;
    create(
        r,
        wire(
            "spiffe://example.org/app",
            "spiffe://example.org/nodes/web",
            "1",
        ),
    )
    .await;
    assert_eq!(
        spiffe_ids(&r.entitled(&agent())),
        ["spiffe://example.org/app"]
    );
    let other = agent_with("spiffe://example.org/sigil/agent/join_token/b2", &[]);
    assert!(r.entitled(&other).is_empty());
}

#[tokio::test]
async fn entitlement_follows_parents_below_an_alias_but_never_the_alias_entry() {
    let f = fixture().await;
    let r = &f.registry;
    let selector = format!("spiffe_id:{AGENT}");
    create(r, alias("spiffe://example.org/nodes/web", &[&selector])).await;
    // A second alias entry with the same SPIFFE ID adds nothing twice.
    create(
        r,
        alias("spiffe://example.org/nodes/web", &[&selector, "unix:uid:0"]),
    )
    .await;
    create(
        r,
        wire(
            "spiffe://example.org/app",
            "spiffe://example.org/nodes/web",
            "1",
        ),
    )
    .await;
    create(
        r,
        wire(
            "spiffe://example.org/app/db",
            "spiffe://example.org/app",
            "2",
        ),
    )
    .await;
    create(r, wire("spiffe://example.org/direct", AGENT, "3")).await;
    // Under the alias of another agent.
    create(
        r,
        alias(
            "spiffe://example.org/nodes/other",
            &["spiffe_id:spiffe://example.org/sigil/agent/join_token/b2"],
        ),
    )
    .await;
    create(
        r,
        wire(
            "spiffe://example.org/elsewhere",
            "spiffe://example.org/nodes/other",
            "4",
        ),
    )
    .await;

    assert_eq!(
        spiffe_ids(&r.entitled(&agent())),
        [
            "spiffe://example.org/app",
            "spiffe://example.org/app/db",
            "spiffe://example.org/direct",
        ]
    );
}

#[tokio::test]
async fn a_banned_agent_has_no_alias_and_no_entry() {
    let f = fixture().await;
    let r = &f.registry;
    create(
        r,
        alias(
            "spiffe://example.org/nodes/web",
            &[&format!("spiffe_id:{AGENT}")],
        ),
    )
    .await;
    create(
        r,
        wire(
            "spiffe://example.org/app",
            "spiffe://example.org/nodes/web",
            "1",
        ),
    )
    .await;
    create(r, wire("spiffe://example.org/direct", AGENT, "2")).await;
    let mut banned = agent();
    banned.banned = true;
    assert!(r.entitled(&banned).is_empty());
    assert_eq!(r.entitled(&agent()).len(), 2);
}

#[tokio::test]
async fn alias_changes_move_the_children_at_once() {
    let f = fixture().await;
    let r = &f.registry;
    let entry = create(
        r,
        alias("spiffe://example.org/nodes/web", &["k8s_psat:cluster:a"]),
    )
    .await;
    create(
        r,
        wire(
            "spiffe://example.org/app",
            "spiffe://example.org/nodes/web",
            "1",
        ),
    )
    .await;
    let in_a = agent_with(
        "spiffe://example.org/sigil/agent/k8s_psat/a/1",
        &["k8s_psat:cluster:a"],
    );
    let in_b = agent_with(
        "spiffe://example.org/sigil/agent/k8s_psat/b/1",
        &["k8s_psat:cluster:b"],
    );
    assert_eq!(r.entitled(&in_a).len(), 1);
    assert!(r.entitled(&in_b).is_empty());

    // The alias now selects the other cluster: its index key moves.
    let mut moved = alias("spiffe://example.org/nodes/web", &["k8s_psat:cluster:b"]);
    moved.id = entry.id.clone();
    r.update(&[moved]).await.remove(0).unwrap();
    assert!(r.entitled(&in_a).is_empty());
    assert_eq!(r.entitled(&in_b).len(), 1);

    // Expired: no alias any more.
    let mut expired = alias("spiffe://example.org/nodes/web", &["k8s_psat:cluster:b"]);
    expired.id = entry.id.clone();
    expired.expires_at = 1;
    r.update(&[expired]).await.remove(0).unwrap();
    assert!(r.entitled(&in_b).is_empty());

    r.delete(std::slice::from_ref(&entry.id))
        .await
        .remove(0)
        .unwrap();
    assert!(r.entitled(&in_a).is_empty() && r.entitled(&in_b).is_empty());
    assert!(r.read(|index| index.aliases.is_empty()));
}

#[tokio::test]
async fn create_alias_registers_the_agent_by_its_spiffe_id() {
    let f = fixture().await;
    let r = &f.registry;
    let entry = r
        .create_alias("spiffe://example.org/nodes/web", &super::id(AGENT))
        .await
        .unwrap();
    assert_eq!(entry.spiffe_id.as_str(), "spiffe://example.org/nodes/web");
    assert_eq!(entry.parent_id.as_str(), SERVER);
    let selectors: Vec<String> = entry.selectors.iter().map(|s| s.to_string()).collect();
    assert_eq!(selectors, [format!("spiffe_id:{AGENT}")]);

    let err = r
        .create_alias("spiffe://example.org/nodes/web", &super::id(AGENT))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert_eq!(
        err.alias_message("alias_id"),
        format!(
            "alias_id: entry with the same spiffe_id, parent_id and selectors exists: {}",
            entry.id
        )
    );

    for (bad, reason) in [
        (
            "spiffe://example.org/a//b",
            "alias_id: \"spiffe://example.org/a//b\" path has an empty segment",
        ),
        (
            "spiffe://example.org/sigil/nodes",
            "alias_id: \"spiffe://example.org/sigil/nodes\" is under /sigil/, which is reserved for the server and agents",
        ),
        (
            "spiffe://other.org/nodes",
            "alias_id: \"spiffe://other.org/nodes\" is not in trust domain example.org",
        ),
    ] {
        let err = r.create_alias(bad, &super::id(AGENT)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.alias_message("alias_id").starts_with(reason), "{err}");
    }
    assert_eq!(r.len(), 1);
}

/// A small deterministic generator (xorshift64*), so a failure replays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        usize::try_from(x % u64::try_from(n).unwrap()).unwrap()
    }
}

/// Entitlement computed from every entry, with no index: aliases are the
/// alias entries whose selectors the agent's cover; then entries whose
/// parent is reached are added until nothing changes.
fn brute_force(all: &[Arc<Entry>], agent: &AgentRecord, now: i64) -> BTreeSet<String> {
    if agent.banned {
        return BTreeSet::new();
    }
    let server: SpiffeId = SERVER.parse().unwrap();
    let node = super::super::node_selectors(agent);
    let live: Vec<&Arc<Entry>> = all.iter().filter(|e| !e.is_expired(now)).collect();
    let mut reached: BTreeSet<SpiffeId> = live
        .iter()
        .filter(|e| e.parent_id == server && e.selectors.is_subset_of(&node))
        .map(|e| e.spiffe_id.clone())
        .collect();
    reached.insert(agent.spiffe_id.clone());
    let mut entitled = BTreeSet::new();
    loop {
        let before = entitled.len();
        for e in &live {
            if e.parent_id != server && reached.contains(&e.parent_id) {
                entitled.insert(e.id.clone());
                reached.insert(e.spiffe_id.clone());
            }
        }
        if entitled.len() == before {
            return entitled;
        }
    }
}

async fn all_entries(r: &Registry) -> Vec<Arc<Entry>> {
    r.list(&ListQuery {
        limit: usize::MAX - 1,
        ..Default::default()
    })
    .0
}

#[tokio::test]
async fn the_alias_index_agrees_with_brute_force_on_random_registries() {
    const UNIVERSE: [&str; 6] = [
        "k8s_psat:cluster:a",
        "k8s_psat:cluster:b",
        "k8s_psat:agent_ns:prod",
        "x509pop:subject:cn:web",
        "x509pop:subject:cn:db",
        "x509pop:ca:fingerprint:aa",
    ];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    // How many agents had an alias that entitled them to something, so that
    // the comparison is known to cover the alias path.
    let mut through_aliases = 0;
    for round in 0..8 {
        let f = fixture().await;
        let r = &f.registry;
        let agents: Vec<AgentRecord> = (0..6)
            .map(|i| {
                let node: Vec<&str> = UNIVERSE
                    .iter()
                    .copied()
                    .filter(|_| rng.below(2) == 0)
                    .collect();
                let mut a = agent_with(
                    &format!("spiffe://example.org/sigil/agent/t/{round}/{i}"),
                    &node,
                );
                a.banned = rng.below(6) == 0;
                a
            })
            .collect();
        let names: Vec<String> = (0..10)
            .map(|i| format!("spiffe://example.org/n{i}"))
            .collect();
        let mut ids = Vec::new();
        for i in 0..60 {
            let spiffe_id = &names[rng.below(names.len())];
            let mut entry = if rng.below(3) == 0 {
                let mut selectors: Vec<String> = (0..1 + rng.below(3))
                    .map(|_| UNIVERSE[rng.below(UNIVERSE.len())].to_owned())
                    .collect();
                if rng.below(4) == 0 {
                    let a = &agents[rng.below(agents.len())];
                    selectors.push(format!("spiffe_id:{}", a.spiffe_id));
                }
                let selectors: Vec<&str> = selectors.iter().map(String::as_str).collect();
                alias(spiffe_id, &selectors)
            } else {
                let parent = match rng.below(3) {
                    0 => agents[rng.below(agents.len())].spiffe_id.to_string(),
                    _ => names[rng.below(names.len())].clone(),
                };
                wire(spiffe_id, &parent, &i.to_string())
            };
            if rng.below(10) == 0 {
                entry.expires_at = 1;
            }
            if let Ok(created) = r.create(&[entry]).await.remove(0) {
                ids.push(created.id.clone());
            }
        }
        // Some deletions, so that the index also sheds entries.
        for _ in 0..10 {
            let id = ids.swap_remove(rng.below(ids.len()));
            r.delete(&[id]).await.remove(0).unwrap();
        }

        let all = all_entries(r).await;
        let now = crate::clock::now_unix();
        for a in &agents {
            let fast: BTreeSet<String> = r.entitled(a).iter().map(|e| e.id.clone()).collect();
            assert_eq!(fast, brute_force(&all, a, now), "round {round}, {a:?}");
            let direct = r.read(|index| index.entitled(&a.spiffe_id, BTreeSet::new(), now));
            if !a.banned && fast.len() > direct.len() {
                through_aliases += 1;
            }
            assert_eq!(
                r.entitled(a).len(),
                fast.len(),
                "an entry entitled twice in round {round}"
            );
        }
    }
    assert!(through_aliases >= 10, "{through_aliases}");
}
