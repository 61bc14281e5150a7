//! Scheduled rotation of the X.509 signing authority: a state machine over
//! the [journal](super::journal), driven by tokio time, that persists every
//! step in the store before the services see it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil::TrustDomain;
use sigil::bundle::X509Bundle;
use sigil::x509::Authority;

use super::journal::{AuthorityRecord, AuthorityState, Event, Journal};
use super::{Ca, CaError, Published};
use crate::clock::{self, Clock};
use crate::shutdown::Shutdown;
use crate::store::Store;

/// The longest the schedule sleeps before it reads the wall clock again, so
/// that a wall clock that jumps is noticed.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// How long to wait before retrying a failed step.
const RETRY_DELAY: Duration = Duration::from_secs(30);

/// Most steps applied at once when catching up (a server that was down
/// through several steps).
const MAX_CATCH_UP: usize = 16;

/// The longest SVID lifetime the schedule allows for authorities living
/// `ca_ttl`: a sixth of it.
pub(crate) fn max_svid_ttl(ca_ttl: Duration) -> Duration {
    ca_ttl / 6
}

/// `ttl` capped at [`max_svid_ttl`], with a warning naming `setting` when
/// it is capped.
pub(crate) fn cap_svid_ttl(setting: &str, ttl: Duration, ca_ttl: Duration) -> Duration {
    let max = max_svid_ttl(ca_ttl);
    if ttl > max {
        tracing::warn!(
            setting,
            configured = %humantime::format_duration(ttl),
            capped_to = %humantime::format_duration(max),
            ca_ttl = %humantime::format_duration(ca_ttl),
            "SVID lifetime longer than a sixth of ca_ttl; capped so that authorities can rotate"
        );
        max
    } else {
        ttl
    }
}

/// The journal, the authorities' keys, and where they are kept.
#[derive(Debug)]
pub(crate) struct Schedule {
    store: Arc<dyn Store>,
    dir: PathBuf,
    td: TrustDomain,
    ca_ttl: Duration,
    clock: Clock,
    journal: Journal,
    authorities: HashMap<String, Arc<Authority>>,
}

impl Schedule {
    /// Reads the journal and the authorities' files, and applies every step
    /// that is due, so that there is an active authority.
    pub(crate) async fn load(
        store: Arc<dyn Store>,
        dir: &Path,
        td: &TrustDomain,
        ca_ttl: Duration,
        clock: Clock,
    ) -> Result<Self, CaError> {
        super::create_private_dir(dir)?;
        let journal = store.get_ca_journal().await?.unwrap_or_default();
        let mut authorities = HashMap::new();
        for record in &journal.authorities {
            let authority = super::load_saved(dir, &record.id, td)?;
            authorities.insert(record.id.clone(), Arc::new(authority));
        }
        let mut schedule = Self {
            store,
            dir: dir.to_owned(),
            td: td.clone(),
            ca_ttl,
            clock,
            journal,
            authorities,
        };
        if schedule.journal.authorities.is_empty() {
            schedule.start_journal().await?;
        }
        for _ in 0..MAX_CATCH_UP {
            let now = schedule.clock.now();
            let (at, event) = schedule.journal.next_event(clock::to_unix(now));
            if at > clock::to_unix(now) {
                break;
            }
            schedule.apply(event, now).await?;
        }
        schedule.remove_strays();
        if let Some(active) = schedule.journal.active() {
            tracing::info!(
                authority.id = %active.id,
                expires_at = %clock::rfc3339(active.not_after),
                authorities = schedule.journal.authorities.len(),
                "loaded the signing authority"
            );
        }
        Ok(schedule)
    }

    /// Removes the files of authorities not in the journal: created by a
    /// step that did not complete.
    fn remove_strays(&self) {
        let Ok(files) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for file in files.flatten() {
            let name = file.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            let id = name
                .strip_suffix(".key.pem")
                .or_else(|| name.strip_suffix(".cert.pem"));
            if let Some(id) = id.filter(|id| !self.authorities.contains_key(*id)) {
                match std::fs::remove_file(file.path()) {
                    Ok(()) => tracing::debug!(authority.id = %id, "removed a stray authority file"),
                    Err(e) => tracing::warn!(
                        path = %file.path().display(),
                        error = %e,
                        "cannot remove a stray authority file"
                    ),
                }
            }
        }
    }

    /// Starts an empty journal, with the CA kept by earlier versions as the
    /// active authority if there is one that has not expired.
    async fn start_journal(&mut self) -> Result<(), CaError> {
        let now = self.clock.now();
        self.journal.sequence = u64::try_from(clock::to_unix(now)).unwrap_or(1);
        let Some((authority, not_before)) = super::load_legacy(&self.dir, &self.td)? else {
            return Ok(());
        };
        if authority.not_after() <= now {
            tracing::warn!(
                expired_at = %clock::rfc3339(clock::to_unix(authority.not_after())),
                "the stored CA has expired; creating a new one (agents must attest again)"
            );
            return Ok(());
        }
        let record = self.record_of(&authority, now)?;
        // Certificates are back-dated by BACKDATE from their creation.
        let backdate = i64::try_from(sigil::x509::BACKDATE.as_secs()).unwrap_or(0);
        let created_at = i64::try_from(not_before)
            .unwrap_or(0)
            .saturating_add(backdate);
        super::save(&self.dir, &record.id, &authority)?;
        let mut journal = Journal {
            // Agents already hold this bundle with this sequence.
            sequence: not_before.saturating_sub(1),
            authorities: Vec::new(),
        };
        let record = AuthorityRecord {
            created_at,
            ..record
        };
        journal.activate(record.clone(), created_at, 0);
        self.commit(journal).await?;
        self.authorities.insert(record.id, Arc::new(authority));
        super::remove_legacy(&self.dir);
        Ok(())
    }

    /// The next step and the wall-clock time it is due.
    pub(crate) fn next_event(&self) -> (SystemTime, Event) {
        let (at, event) = self.journal.next_event(clock::to_unix(self.clock.now()));
        (clock::from_unix(at), event)
    }

    /// The signing authority and the bundle, as the services use them.
    pub(crate) fn published(&self) -> Result<Published, CaError> {
        let active = self.journal.active().ok_or(CaError::NoActive)?;
        let authority = self.authorities.get(&active.id).ok_or(CaError::NoActive)?;
        let certs = self
            .journal
            .authorities
            .iter()
            .filter_map(|r| self.authorities.get(&r.id))
            .map(|a| a.cert().clone())
            .collect();
        Ok(Published {
            active_id: active.id.clone(),
            active: Arc::clone(authority),
            bundle: X509Bundle::new(self.td.clone(), certs),
            sequence: self.journal.sequence,
        })
    }

    /// Applies one step at `now`: persists it in the store, then keeps it.
    pub(crate) async fn apply(&mut self, event: Event, now: SystemTime) -> Result<(), CaError> {
        let now_unix = clock::to_unix(now);
        let mut journal = self.journal.clone();
        let mut created = None;
        match &event {
            Event::Prepare => {
                let (record, authority) = self.create(now)?;
                journal.prepare(record.clone());
                created = Some((record, authority));
            }
            Event::Activate => {
                let next = match journal.prepared() {
                    Some(prepared) if prepared.not_after > now_unix => prepared.clone(),
                    _ => {
                        let (record, authority) = self.create(now)?;
                        created = Some((record.clone(), authority));
                        record
                    }
                };
                let max = i64::try_from(max_svid_ttl(self.ca_ttl).as_secs()).unwrap_or(i64::MAX);
                journal.activate(next, now_unix, max);
            }
            Event::Retire(id) => {
                journal.retire(id);
            }
        }
        self.commit(journal).await?;
        if let Some((record, authority)) = created {
            self.authorities.insert(record.id, authority);
        }
        match event {
            Event::Prepare => {
                if let Some(prepared) = self.journal.prepared() {
                    tracing::info!(
                        authority.id = %prepared.id,
                        expires_at = %clock::rfc3339(prepared.not_after),
                        bundle.sequence = self.journal.sequence,
                        "prepared the next signing authority and published it in the bundle"
                    );
                }
            }
            Event::Activate => {
                if let Some(active) = self.journal.active() {
                    tracing::info!(
                        authority.id = %active.id,
                        expires_at = %clock::rfc3339(active.not_after),
                        bundle.sequence = self.journal.sequence,
                        "activated a new signing authority"
                    );
                }
            }
            Event::Retire(id) => {
                self.authorities.remove(&id);
                if let Err(e) = super::remove_saved(&self.dir, &id) {
                    tracing::warn!(authority.id = %id, error = %e, "cannot remove a retired authority's files");
                }
                tracing::info!(
                    authority.id = %id,
                    bundle.sequence = self.journal.sequence,
                    "retired an authority from the bundle"
                );
            }
        }
        Ok(())
    }

    /// Stores `journal` durably, then keeps it.
    async fn commit(&mut self, journal: Journal) -> Result<(), CaError> {
        self.store.put_ca_journal(&journal).await?;
        self.store.flush().await?;
        self.journal = journal;
        Ok(())
    }

    /// Creates a new authority and writes its files.
    fn create(&self, now: SystemTime) -> Result<(AuthorityRecord, Arc<Authority>), CaError> {
        let authority = super::new_authority(&self.td, now, self.ca_ttl)?;
        let record = self.record_of(&authority, now)?;
        super::save(&self.dir, &record.id, &authority)?;
        Ok((record, Arc::new(authority)))
    }

    fn record_of(
        &self,
        authority: &Authority,
        now: SystemTime,
    ) -> Result<AuthorityRecord, CaError> {
        let id = super::authority_id(authority.cert()).ok_or_else(|| CaError::Invalid {
            path: self.dir.clone(),
            reason: "an authority certificate cannot be parsed".into(),
        })?;
        Ok(AuthorityRecord {
            id,
            state: AuthorityState::Prepared,
            created_at: clock::to_unix(now),
            not_after: clock::to_unix(authority.not_after()),
            activated_at: None,
            deactivated_at: None,
            retire_at: None,
        })
    }
}

/// Runs the schedule until `shutdown`: sleeps until the next step, applies
/// it, and publishes the result to `ca`.
pub(crate) async fn run(mut schedule: Schedule, ca: Arc<Ca>, mut shutdown: Shutdown) {
    loop {
        let (at, event) = schedule.next_event();
        let now = schedule.clock.now();
        if at > now {
            let wake = schedule
                .clock
                .instant_of(at)
                .min(tokio::time::Instant::now() + MAX_WAIT);
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = shutdown.wait() => return,
            }
            continue;
        }
        let applied = schedule.apply(event.clone(), now).await;
        let published = applied.and_then(|()| schedule.published());
        match published {
            Ok(published) => ca.publish(published),
            Err(e) => {
                tracing::warn!(event = ?event, error = %e, "cannot rotate the signing authority; will retry");
                tokio::select! {
                    () = tokio::time::sleep(RETRY_DELAY) => {}
                    () = shutdown.wait() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    const CA_TTL: Duration = Duration::from_secs(180);

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    struct Server {
        ca: Arc<Ca>,
        stop: crate::shutdown::Trigger,
        task: tokio::task::JoinHandle<()>,
    }

    /// Opens the store and the schedule, as the server does at start-up,
    /// and runs the schedule.
    async fn start(dir: &Path, clock: Clock) -> Server {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.join("store")).unwrap());
        let schedule = Schedule::load(store, &dir.join("ca"), &td(), CA_TTL, clock)
            .await
            .unwrap();
        let ca = Arc::new(Ca::new(schedule.published().unwrap(), max_svid_ttl(CA_TTL)));
        let (stop, shutdown) = crate::shutdown::channel();
        let task = tokio::spawn(run(schedule, Arc::clone(&ca), shutdown));
        Server { ca, stop, task }
    }

    async fn restart(server: Server, dir: &Path, clock: Clock) -> Server {
        let before = server.ca.current();
        server.stop.fire();
        server.task.await.unwrap();
        drop(server.ca);
        let server = start(dir, clock).await;
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
        server.task.await.unwrap();
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
        server.stop.fire();
        server.task.await.unwrap();
        drop(server.ca);

        // Down from 90 s to 160 s: past the activation at 150 s.
        tokio::time::sleep(Duration::from_secs(70)).await;
        let server = start(dir.path(), clock).await;
        let current = server.ca.current();
        assert_eq!(*current.active.cert(), prepared.bundle.authorities()[1]);
        assert_eq!(current.bundle.authorities().len(), 2);
        server.stop.fire();
        server.task.await.unwrap();
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
        server.task.await.unwrap();
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
        server.task.await.unwrap();
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
}
