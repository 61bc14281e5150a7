//! Scheduled rotation of the X.509 signing authority: a state machine over
//! the [journal](super::journal), driven by tokio time, that persists every
//! step in the store before the services see it. The operator's changes
//! (prepare, activate, taint, revoke) go through the same schedule, under
//! the same lock, and wake the loop so that it reschedules.

use std::collections::HashMap;
#[cfg(test)]
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil::TrustDomain;
use sigil::x509::Authority;

use rustls_pki_types::CertificateDer;

use super::journal::{AuthorityRecord, AuthorityState, Event, Journal, Refusal};
use super::keys::KeyManager;
use super::live::LiveSvids;
use super::{CaError, Published};
use crate::clock::{self, Clock};
use crate::shutdown::Shutdown;
use crate::store::Store;

mod operator;

use operator::unhex;
pub(crate) use operator::{Authorities, Operation, OperationError};

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

/// Warns about each entry whose `x509_svid_ttl` exceeds `max` (a sixth of
/// ca_ttl): its SVIDs are issued with `max` instead.
pub(crate) fn warn_capped_entries<'a>(
    entries: impl IntoIterator<Item = &'a sigil::Entry>,
    max: Duration,
) {
    for entry in entries {
        if let Some(ttl) = entry.x509_svid_ttl.filter(|ttl| *ttl > max) {
            tracing::warn!(
                entry.id = %entry.id,
                spiffe.id = %entry.spiffe_id,
                x509_svid_ttl = %humantime::format_duration(ttl),
                capped_to = %humantime::format_duration(max),
                "the entry's x509_svid_ttl is longer than a sixth of ca_ttl; its SVIDs are issued with the cap"
            );
        }
    }
}

/// The journal, the authorities' keys, and where they are kept.
#[derive(Debug)]
pub(crate) struct Schedule {
    store: Arc<dyn Store>,
    dir: PathBuf,
    keys: Arc<KeyManager>,
    td: TrustDomain,
    ca_ttl: Duration,
    clock: Clock,
    journal: Journal,
    authorities: HashMap<String, Arc<Authority>>,
}

impl Schedule {
    /// [`Schedule::load_with`] self-signed P-256 authorities kept in files
    /// in `dir`.
    #[cfg(test)]
    pub(crate) async fn load(
        store: Arc<dyn Store>,
        dir: &Path,
        td: &TrustDomain,
        ca_ttl: Duration,
        clock: Clock,
    ) -> Result<Self, CaError> {
        let keys = Arc::new(KeyManager::disk(dir));
        Self::load_with(store, keys, td, ca_ttl, clock).await
    }

    /// Reads the journal and the authorities `keys` keeps, and applies every
    /// step that is due, so that there is an active authority.
    pub(crate) async fn load_with(
        store: Arc<dyn Store>,
        keys: Arc<KeyManager>,
        td: &TrustDomain,
        ca_ttl: Duration,
        clock: Clock,
    ) -> Result<Self, CaError> {
        keys.prepare_dir()?;
        let journal = store.get_ca_journal().await?.unwrap_or_default();
        let (journal, authorities) = keys.load_journal(journal, td)?;
        let mut schedule = Self {
            store,
            dir: keys.dir().to_owned(),
            keys,
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
        // A journal dropped by the key manager leaves its sequence: go on
        // from it.
        self.journal.sequence = u64::try_from(clock::to_unix(now))
            .unwrap_or(1)
            .max(self.journal.sequence.saturating_add(1));
        let Some((authority, not_before)) = self.keys.load_legacy(&self.td)? else {
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
        self.keys.save(&record.id, &authority)?;
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
            .filter(|r| r.state.in_bundle())
            .filter_map(|r| self.authorities.get(&r.id))
            .map(|a| a.cert().clone())
            .collect();
        Ok(Published {
            active_id: active.id.clone(),
            active: Arc::clone(authority),
            bundle: self.keys.bundle(&self.td, certs),
            sequence: self.journal.sequence,
            tainted: self.journal.tainted_ids().filter_map(unhex).collect(),
        })
    }

    /// Applies one step at `now`: persists it in the store, then keeps it.
    pub(crate) async fn apply(&mut self, event: Event, now: SystemTime) -> Result<(), CaError> {
        let now_unix = clock::to_unix(now);
        let mut journal = self.journal.clone();
        let mut created = None;
        match &event {
            Event::Prepare => {
                let (record, authority) = self.create(now).await?;
                journal.prepare(record.clone());
                created = Some((record, authority));
            }
            Event::Activate => {
                let next = match journal.prepared() {
                    Some(prepared) if prepared.not_after > now_unix => prepared.clone(),
                    _ => {
                        let (record, authority) = self.create(now).await?;
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
                if let Err(e) = self.keys.remove(&id) {
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

    /// The journal.
    pub(crate) fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The certificate of authority `id`, unless it was revoked.
    pub(crate) fn certificate(&self, id: &str) -> Option<&CertificateDer<'static>> {
        self.authorities.get(id).map(|a| a.cert())
    }

    /// Applies an operator's change at `now`, persisted before it returns;
    /// returns the authority's record as changed. `live` tells whether a
    /// revoked authority still has live SVIDs.
    pub(crate) async fn operate(
        &mut self,
        operation: &Operation,
        now: SystemTime,
        live: &LiveSvids,
    ) -> Result<AuthorityRecord, OperationError> {
        let now_unix = clock::to_unix(now);
        let mut journal = self.journal.clone();
        let id = match operation {
            Operation::Prepare => {
                if let Some(prepared) = journal.prepared() {
                    return Err(Refusal::AlreadyPrepared(prepared.id.clone()).into());
                }
                let (record, authority) = self.create(now).await?;
                journal.prepare(record.clone());
                self.commit(journal).await?;
                self.authorities.insert(record.id.clone(), authority);
                record.id
            }
            Operation::Activate(id) => {
                let record = journal
                    .get(id)
                    .ok_or_else(|| Refusal::Unknown(id.clone()))?
                    .clone();
                if record.state != AuthorityState::Prepared || record.not_after <= now_unix {
                    return Err(Refusal::NotPrepared(id.clone(), record.state).into());
                }
                let max = i64::try_from(max_svid_ttl(self.ca_ttl).as_secs()).unwrap_or(i64::MAX);
                journal.activate(record, now_unix, max);
                self.commit(journal).await?;
                id.clone()
            }
            Operation::Taint(id) => {
                journal.taint(id, now_unix)?;
                self.commit(journal).await?;
                id.clone()
            }
            Operation::Revoke { id, force } => {
                journal.revoke(id, now_unix)?;
                if !force {
                    let usage = live.usage(now_unix).await.map_err(CaError::from)?;
                    if let Some(usage) = usage.get(id.as_str()).filter(|u| u.svids > 0) {
                        return Err(Refusal::LiveSvids {
                            id: id.clone(),
                            svids: usage.svids,
                            agents: usage.agents.len(),
                        }
                        .into());
                    }
                }
                self.commit(journal).await?;
                self.authorities.remove(id.as_str());
                if let Err(e) = self.keys.remove(id) {
                    tracing::warn!(authority.id = %id, error = %e, "cannot remove a revoked authority's files");
                }
                id.clone()
            }
        };
        let record = self
            .journal
            .get(&id)
            .cloned()
            .ok_or_else(|| Refusal::Unknown(id.clone()))?;
        tracing::info!(
            authority.id = %record.id,
            state = super::journal::state_name(record.state),
            bundle.sequence = self.journal.sequence,
            "X.509 authority changed by the operator"
        );
        Ok(record)
    }

    /// Stores `journal` durably, then keeps it.
    async fn commit(&mut self, journal: Journal) -> Result<(), CaError> {
        self.store.put_ca_journal(&journal).await?;
        self.store.flush().await?;
        self.journal = journal;
        Ok(())
    }

    /// Creates a new authority and has the key manager keep it.
    async fn create(&self, now: SystemTime) -> Result<(AuthorityRecord, Arc<Authority>), CaError> {
        let authority = self.keys.create(&self.td, now, self.ca_ttl).await?;
        let record = self.record_of(&authority, now)?;
        self.keys.save(&record.id, &authority)?;
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
            tainted_at: None,
            revoked_at: None,
        })
    }
}

/// Runs the schedule until `shutdown`: sleeps until the next step (or an
/// operator's change), applies it, and publishes the result.
pub(crate) async fn run(authorities: Arc<Authorities>, mut shutdown: Shutdown) {
    loop {
        let mut schedule = authorities.schedule.lock().await;
        let (at, event) = schedule.next_event();
        let now = schedule.clock.now();
        if at > now {
            let wake = schedule
                .clock
                .instant_of(at)
                .min(tokio::time::Instant::now() + MAX_WAIT);
            drop(schedule);
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = authorities.wake.notified() => {}
                () = shutdown.wait() => return,
            }
            continue;
        }
        let applied = schedule.apply(event.clone(), now).await;
        let published = applied.and_then(|()| schedule.published());
        drop(schedule);
        match published {
            Ok(published) => authorities.ca.publish(published),
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
mod tests;
