//! Tests of the schedule: rotation on tokio time, restarts, and the
//! operator's changes.

use super::*;
use crate::ca::Ca;
use crate::store::SledStore;

const CA_TTL: Duration = Duration::from_secs(180);

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

struct Server {
    ca: Arc<Ca>,
    authorities: Arc<Authorities>,
    stop: crate::shutdown::Trigger,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Opens the store and the schedule, as the server does at start-up,
/// and runs the schedule.
async fn start(dir: &Path, clock: Clock) -> Server {
    let mut server = start_idle(dir, clock).await;
    let (stop, shutdown) = crate::shutdown::channel();
    server.task = Some(tokio::spawn(run(Arc::clone(&server.authorities), shutdown)));
    server.stop = stop;
    server
}

/// Like [`start`], without running the schedule: only the operator
/// changes the journal (and tokio time does not jump to the next step
/// while the store does I/O).
async fn start_idle(dir: &Path, clock: Clock) -> Server {
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.join("store")).unwrap());
    let live = LiveSvids::load(Arc::clone(&store), clock::to_unix(clock.now()))
        .await
        .unwrap();
    let schedule = Schedule::load(store, &dir.join("ca"), &td(), CA_TTL, clock)
        .await
        .unwrap();
    let ca = Arc::new(Ca::new(schedule.published().unwrap(), max_svid_ttl(CA_TTL)));
    let authorities = Authorities::new(schedule, Arc::clone(&ca), Arc::new(live));
    let (stop, _) = crate::shutdown::channel();
    Server {
        ca,
        authorities,
        stop,
        task: None,
    }
}

async fn stop(server: Server) {
    server.stop.fire();
    if let Some(task) = server.task {
        task.await.unwrap();
    }
    drop(server.authorities);
    drop(server.ca);
}

async fn restart(server: Server, dir: &Path, clock: Clock) -> Server {
    let idle = server.task.is_none();
    let before = server.ca.current();
    stop(server).await;
    let server = if idle {
        start_idle(dir, clock).await
    } else {
        start(dir, clock).await
    };
    let after = server.ca.current();
    assert_eq!(
        after.active_id, before.active_id,
        "the active authority survives"
    );
    assert_eq!(after.sequence, before.sequence, "the sequence survives");
    assert_eq!(after.bundle.authorities(), before.bundle.authorities());
    server
}

/// Waits until the published state satisfies `done` (publications may
/// coalesce, so it may already); returns it with
/// the seconds elapsed since `t0`, rounded up.
async fn until(
    changes: &mut tokio::sync::watch::Receiver<()>,
    ca: &Ca,
    clock: Clock,
    t0: SystemTime,
    done: impl Fn(&Published) -> bool,
) -> (Arc<Published>, u64) {
    loop {
        let current = ca.current();
        if done(&current) {
            // Steps fall on whole seconds of the wall clock; `t0` need not.
            let elapsed = clock.now().duration_since(t0).unwrap().as_secs_f64().ceil() as u64;
            return (current, elapsed);
        }
        changes.changed().await.unwrap();
    }
}

fn keys_on_disk(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("ca"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".key.pem"))
        .collect();
    names.sort();
    names
}

#[tokio::test(start_paused = true)]
async fn a_full_cycle_with_a_restart_at_each_stage() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::tokio();
    let t0 = clock.now();
    let mut server = start(dir.path(), clock).await;

    // Start: one active authority, alone in the bundle.
    let first = server.ca.current();
    assert_eq!(first.bundle.authorities().len(), 1);
    assert_eq!(first.bundle.authorities()[0], *first.active.cert());
    let first_id = first.active_id.clone();
    assert_eq!(keys_on_disk(dir.path()), [format!("{first_id}.key.pem")]);
    // Files of an authority that never reached the journal go away.
    std::fs::write(dir.path().join("ca/0badc0de.key.pem"), "stray").unwrap();
    server = restart(server, dir.path(), clock).await;
    assert_eq!(keys_on_disk(dir.path()), [format!("{first_id}.key.pem")]);

    // At half of its life the next one is prepared and published.
    let mut changes = server.ca.subscribe();
    let (prepared, at) = until(&mut changes, &server.ca, clock, t0, |p| {
        p.bundle.authorities().len() == 2
    })
    .await;
    assert_eq!(at, 90);
    assert_eq!(prepared.active_id, first_id, "still signing with the first");
    assert_eq!(prepared.bundle.authorities().len(), 2);
    assert_eq!(prepared.sequence, first.sequence + 1);
    let second = prepared.bundle.authorities()[1].clone();
    assert_eq!(keys_on_disk(dir.path()).len(), 2);
    server = restart(server, dir.path(), clock).await;

    // With a sixth of its life left, the second one signs.
    let mut changes = server.ca.subscribe();
    let (activated, at) = until(&mut changes, &server.ca, clock, t0, |p| {
        p.active_id != first_id
    })
    .await;
    assert_eq!(at, 150);
    assert_eq!(*activated.active.cert(), second);
    assert_eq!(
        activated.bundle.authorities().len(),
        2,
        "both stay published"
    );
    assert_eq!(
        activated.sequence, prepared.sequence,
        "the bundle did not change"
    );
    let second_id = activated.active_id.clone();
    server = restart(server, dir.path(), clock).await;

    // Once every SVID the first signed (at most 30 s) has expired, it
    // leaves the bundle; the next one is prepared at the same moment.
    let mut changes = server.ca.subscribe();
    let first_cert = first.active.cert().clone();
    let (retired, at) = until(&mut changes, &server.ca, clock, t0, |p| {
        !p.bundle.authorities().contains(&first_cert)
    })
    .await;
    assert_eq!(at, 180);
    assert_eq!(retired.active_id, second_id);
    assert_eq!(retired.bundle.authorities()[0], second);
    assert!(!keys_on_disk(dir.path()).contains(&format!("{first_id}.key.pem")));
    let (third, at) = until(&mut changes, &server.ca, clock, t0, |p| {
        p.bundle.authorities().len() == 2
    })
    .await;
    assert_eq!(at, 180);
    assert_eq!(third.bundle.authorities()[0], second);
    assert_eq!(
        third.sequence,
        activated.sequence + 2,
        "one retired, one prepared"
    );
    assert_eq!(third.active_id, second_id);
    server = restart(server, dir.path(), clock).await;

    server.stop.fire();
    server.task.unwrap().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn operators_prepare_activate_taint_and_revoke_and_it_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::tokio();
    let mut server = start_idle(dir.path(), clock).await;
    let first = server.ca.current();
    let a = first.active_id.clone();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = server
        .authorities
        .operate(&Operation::Prepare)
        .await
        .unwrap();
    assert_eq!(b.state, AuthorityState::Prepared);
    assert_eq!(server.ca.current().bundle.authorities().len(), 2);
    let again = server
        .authorities
        .operate(&Operation::Prepare)
        .await
        .unwrap_err();
    assert_eq!(
        again.to_string(),
        format!(
            "X.509 authority {:?} is already prepared; activate it first",
            b.id
        )
    );
    let refused = server
        .authorities
        .operate(&Operation::Taint(a.clone()))
        .await
        .unwrap_err();
    assert_eq!(
        refused.to_string(),
        format!(
            "X.509 authority {a:?} is the active one and cannot be tainted; activate another first"
        )
    );
    let refused = server
        .authorities
        .operate(&Operation::Activate(a.clone()))
        .await
        .unwrap_err();
    assert_eq!(
        refused.to_string(),
        format!("X.509 authority {a:?} is active, not prepared")
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    let active = server
        .authorities
        .operate(&Operation::Activate(b.id.clone()))
        .await
        .unwrap();
    assert_eq!(active.state, AuthorityState::Active);
    assert_eq!(server.ca.current().active_id, b.id);
    assert_eq!(server.ca.current().bundle.authorities().len(), 2);

    // An SVID signed by the first authority, live until 20 s from now.
    let now = clock::to_unix(clock.now());
    server
        .authorities
        .live()
        .record("spiffe://example.org/agent", &a, [("e1".into(), now + 20)])
        .await
        .unwrap();
    let tainted = server
        .authorities
        .operate(&Operation::Taint(a.clone()))
        .await
        .unwrap();
    assert_eq!(tainted.state, AuthorityState::Tainted);
    assert_eq!(server.ca.current().tainted, [unhex(&a).unwrap()]);
    assert_eq!(server.ca.current().bundle.authorities().len(), 2);
    let revoke = Operation::Revoke {
        id: a.clone(),
        force: false,
    };
    let refused = server.authorities.operate(&revoke).await.unwrap_err();
    assert_eq!(
        refused.to_string(),
        format!(
            "X.509 authority {a:?} still has 1 live SVIDs on 1 agents; revoke with force to revoke anyway"
        )
    );
    server = restart(server, dir.path(), clock).await;
    assert_eq!(server.ca.current().tainted, [unhex(&a).unwrap()]);
    let refused = server.authorities.operate(&revoke).await.unwrap_err();
    assert!(
        refused.to_string().contains("still has 1 live SVIDs"),
        "{refused}"
    );

    // Once it expired, the revocation goes through.
    tokio::time::sleep(Duration::from_secs(21)).await;
    let sequence = server.ca.current().sequence;
    let revoked = server.authorities.operate(&revoke).await.unwrap();
    assert_eq!(revoked.state, AuthorityState::Revoked);
    let current = server.ca.current();
    assert_eq!(
        current.bundle.authorities(),
        [current.active.cert().clone()]
    );
    assert_eq!(current.sequence, sequence + 1);
    assert_eq!(current.tainted, [unhex(&a).unwrap()]);
    assert!(!keys_on_disk(dir.path()).contains(&format!("{a}.key.pem")));

    server = restart(server, dir.path(), clock).await;
    let (journal, certs) = server.authorities.journal().await;
    assert_eq!(journal.get(&a).unwrap().state, AuthorityState::Revoked);
    assert!(!certs.contains_key(&a));
    assert_eq!(journal.active().unwrap().id, b.id);
    stop(server).await;
}

#[test]
fn authority_ids_decode_from_hex() {
    assert_eq!(unhex("00ff10"), Some(vec![0, 255, 16]));
    assert_eq!(unhex("0"), None);
    assert_eq!(unhex("zz"), None);
}

#[tokio::test(start_paused = true)]
async fn a_server_down_through_an_activation_catches_up_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::tokio();
    let t0 = clock.now();
    let server = start(dir.path(), clock).await;
    let mut changes = server.ca.subscribe();
    let (prepared, at) = until(&mut changes, &server.ca, clock, t0, |p| {
        p.bundle.authorities().len() == 2
    })
    .await;
    assert_eq!(at, 90);
    stop(server).await;

    // Down from 90 s to 160 s: past the activation at 150 s.
    tokio::time::sleep(Duration::from_secs(70)).await;
    let server = start(dir.path(), clock).await;
    let current = server.ca.current();
    assert_eq!(*current.active.cert(), prepared.bundle.authorities()[1]);
    assert_eq!(current.bundle.authorities().len(), 2);
    stop(server).await;
}

#[tokio::test]
async fn a_ca_of_earlier_versions_becomes_the_active_authority() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    super::super::create_private_dir(&ca_dir).unwrap();
    let old = super::super::new_authority(&td(), SystemTime::now(), CA_TTL).unwrap();
    super::super::write_files(&ca_dir.join("cert.pem"), &ca_dir.join("key.pem"), &old).unwrap();
    let server = start(dir.path(), Clock::System).await;
    let current = server.ca.current();
    assert_eq!(current.active.cert(), old.cert());
    assert!(!ca_dir.join("key.pem").exists());
    server.stop.fire();
    server.task.unwrap().await.unwrap();
}

#[tokio::test]
async fn an_expired_ca_of_earlier_versions_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    super::super::create_private_dir(&ca_dir).unwrap();
    let long_ago = SystemTime::now() - Duration::from_secs(7200);
    let old = super::super::new_authority(&td(), long_ago, CA_TTL).unwrap();
    super::super::write_files(&ca_dir.join("cert.pem"), &ca_dir.join("key.pem"), &old).unwrap();
    let server = start(dir.path(), Clock::System).await;
    let current = server.ca.current();
    assert_ne!(current.active.cert(), old.cert());
    assert_eq!(
        current.bundle.authorities(),
        [current.active.cert().clone()]
    );
    assert!(current.active.not_after() > SystemTime::now());
    server.stop.fire();
    server.task.unwrap().await.unwrap();
}

#[test]
fn long_svid_lifetimes_are_capped() {
    let day = Duration::from_secs(86_400);
    assert_eq!(
        cap_svid_ttl("agent_svid_ttl", day, day),
        Duration::from_secs(14_400)
    );
    assert_eq!(
        cap_svid_ttl("agent_svid_ttl", Duration::from_secs(60), day),
        Duration::from_secs(60)
    );
}
