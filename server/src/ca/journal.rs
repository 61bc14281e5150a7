//! The authority journal: every X.509 signing authority still in the trust
//! bundle, its state and the times of its life, and the schedule that moves
//! authorities from one state to the next.
//!
//! The schedule, for an active authority living `L` from its creation:
//! - at `L/2` the next authority is prepared (and published in the bundle);
//! - when `L/6` of its life remains, the prepared one becomes active and it
//!   becomes old;
//! - an old authority leaves the bundle at its retirement time: its
//!   deactivation plus the longest SVID lifetime it could have issued,
//!   capped by its notAfter.
//!
//! The operator may also prepare and activate early, taint a non-active
//! authority (agents replace every SVID it signed; it stays in the bundle
//! until its retirement), and revoke a tainted one (it leaves the bundle at
//! once; its record stays until its notAfter so that it can be shown).

use serde::{Deserialize, Serialize};

/// Where an authority is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AuthorityState {
    /// Published in the bundle, not yet signing.
    Prepared,
    /// The signing authority.
    Active,
    /// Replaced; kept in the bundle while SVIDs it signed may be live.
    Old,
    /// Not trusted any more: agents replace the SVIDs it signed; kept in
    /// the bundle until its retirement or revocation.
    Tainted,
    /// Out of the bundle; its key is deleted.
    Revoked,
}

impl AuthorityState {
    /// Whether its certificate is in the bundle.
    pub(crate) fn in_bundle(self) -> bool {
        self != Self::Revoked
    }
}

/// One authority in the journal. Times are seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AuthorityRecord {
    /// Lowercase hex of the certificate's subject key identifier.
    pub(crate) id: String,
    /// Its state.
    pub(crate) state: AuthorityState,
    /// When it was created.
    pub(crate) created_at: i64,
    /// Its certificate's notAfter.
    pub(crate) not_after: i64,
    /// When it became the signing authority.
    pub(crate) activated_at: Option<i64>,
    /// When it stopped being the signing authority.
    pub(crate) deactivated_at: Option<i64>,
    /// When it leaves the bundle (set when it becomes old).
    pub(crate) retire_at: Option<i64>,
    /// When it was tainted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tainted_at: Option<i64>,
    /// When it was revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) revoked_at: Option<i64>,
}

impl AuthorityRecord {
    /// Its lifetime in seconds.
    fn lifetime(&self) -> i64 {
        (self.not_after - self.created_at).max(0)
    }

    /// When its successor is prepared.
    pub(crate) fn prepare_at(&self) -> i64 {
        self.created_at + self.lifetime() / 2
    }

    /// When its successor becomes active.
    pub(crate) fn activate_successor_at(&self) -> i64 {
        self.not_after - self.lifetime() / 6
    }
}

/// The journal: the authorities in the bundle, oldest first, and the
/// bundle's sequence number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Journal {
    /// Incremented on every change of the bundle's authorities.
    pub(crate) sequence: u64,
    /// Oldest first.
    pub(crate) authorities: Vec<AuthorityRecord>,
}

/// A step of the schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// Create the next authority and publish it.
    Prepare,
    /// Make the prepared authority (or, when there is none, a new one) the
    /// signing authority; the current one, if any, becomes old.
    Activate,
    /// Remove an authority from the bundle.
    Retire(String),
}

impl Journal {
    /// The signing authority.
    pub(crate) fn active(&self) -> Option<&AuthorityRecord> {
        self.in_state(AuthorityState::Active)
    }

    /// The prepared authority.
    pub(crate) fn prepared(&self) -> Option<&AuthorityRecord> {
        self.in_state(AuthorityState::Prepared)
    }

    fn in_state(&self, state: AuthorityState) -> Option<&AuthorityRecord> {
        self.authorities.iter().find(|a| a.state == state)
    }

    /// The next step of the schedule and when it is due (it may be in the
    /// past). With a usable active authority there is always one.
    pub(crate) fn next_event(&self, now: i64) -> (i64, Event) {
        let mut next = match self.active() {
            Some(active) if active.not_after > now => match self.prepared() {
                None => (active.prepare_at(), Event::Prepare),
                Some(_) => (active.activate_successor_at(), Event::Activate),
            },
            _ => (now, Event::Activate),
        };
        for record in &self.authorities {
            let retire_at = match record.state {
                AuthorityState::Old | AuthorityState::Tainted => {
                    record.retire_at.unwrap_or(record.not_after)
                }
                // A prepared authority that expired unused is dropped, and
                // so is a revoked one's record.
                AuthorityState::Prepared | AuthorityState::Revoked => record.not_after,
                AuthorityState::Active => continue,
            };
            // On a tie, retire first: the bundle never holds more than
            // needed.
            if retire_at <= next.0 {
                next = (retire_at, Event::Retire(record.id.clone()));
            }
        }
        next
    }

    /// Applies an activation at `now`: `new` (the prepared authority or a
    /// new one) becomes active, the current active one becomes old and
    /// retires after `max_svid_ttl` seconds, capped by its notAfter.
    /// Returns whether the bundle's authorities changed.
    pub(crate) fn activate(&mut self, new: AuthorityRecord, now: i64, max_svid_ttl: i64) -> bool {
        let mut changed = false;
        for record in &mut self.authorities {
            if record.state == AuthorityState::Active {
                record.state = AuthorityState::Old;
                record.deactivated_at = Some(now);
                record.retire_at = Some((now + max_svid_ttl).min(record.not_after));
            }
        }
        let new = AuthorityRecord {
            state: AuthorityState::Active,
            activated_at: Some(now),
            ..new
        };
        if let Some(slot) = self.authorities.iter_mut().find(|a| a.id == new.id) {
            *slot = new;
        } else {
            self.authorities.push(new);
            changed = true;
        }
        if changed {
            self.sequence += 1;
        }
        changed
    }

    /// Adds a prepared authority.
    pub(crate) fn prepare(&mut self, record: AuthorityRecord) {
        self.authorities.push(AuthorityRecord {
            state: AuthorityState::Prepared,
            ..record
        });
        self.sequence += 1;
    }

    /// Removes an authority; returns whether it was there.
    pub(crate) fn retire(&mut self, id: &str) -> bool {
        let Some(index) = self.authorities.iter().position(|a| a.id == id) else {
            return false;
        };
        let removed = self.authorities.remove(index);
        if removed.state.in_bundle() {
            self.sequence += 1;
        }
        true
    }

    /// The authority with this ID.
    pub(crate) fn get(&self, id: &str) -> Option<&AuthorityRecord> {
        self.authorities.iter().find(|a| a.id == id)
    }

    /// The IDs of the authorities whose SVIDs must be replaced: tainted or
    /// revoked.
    pub(crate) fn tainted_ids(&self) -> impl Iterator<Item = &str> {
        self.authorities
            .iter()
            .filter(|a| matches!(a.state, AuthorityState::Tainted | AuthorityState::Revoked))
            .map(|a| a.id.as_str())
    }

    /// Marks authority `id` as tainted at `now`. Only a prepared or old
    /// authority can be: the active one must first be replaced.
    pub(crate) fn taint(&mut self, id: &str, now: i64) -> Result<(), Refusal> {
        let record = self
            .authorities
            .iter_mut()
            .find(|a| a.id == id)
            .ok_or_else(|| Refusal::Unknown(id.to_owned()))?;
        match record.state {
            AuthorityState::Prepared | AuthorityState::Old => {
                record.state = AuthorityState::Tainted;
                record.tainted_at = Some(now);
                Ok(())
            }
            AuthorityState::Active => Err(Refusal::TaintActive(id.to_owned())),
            AuthorityState::Tainted | AuthorityState::Revoked => {
                Err(Refusal::AlreadyTainted(id.to_owned(), record.state))
            }
        }
    }

    /// Revokes tainted authority `id` at `now`: it leaves the bundle.
    pub(crate) fn revoke(&mut self, id: &str, now: i64) -> Result<(), Refusal> {
        let record = self
            .authorities
            .iter_mut()
            .find(|a| a.id == id)
            .ok_or_else(|| Refusal::Unknown(id.to_owned()))?;
        match record.state {
            AuthorityState::Tainted => {
                record.state = AuthorityState::Revoked;
                record.revoked_at = Some(now);
                self.sequence += 1;
                Ok(())
            }
            AuthorityState::Revoked => Err(Refusal::AlreadyRevoked(id.to_owned())),
            state => Err(Refusal::NotTainted(id.to_owned(), state)),
        }
    }
}

/// Why an operator's change of the journal is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// No authority has this ID.
    #[error("no X.509 authority with SKI {0:?}")]
    Unknown(String),
    /// The active authority cannot be tainted.
    #[error(
        "X.509 authority {0:?} is the active one and cannot be tainted; activate another first"
    )]
    TaintActive(String),
    /// Tainted or revoked already.
    #[error("X.509 authority {:?} is already {}", .0, state_name(*.1))]
    AlreadyTainted(String, AuthorityState),
    /// Only a tainted authority can be revoked.
    #[error("X.509 authority {:?} is {}, not tainted; taint it first", .0, state_name(*.1))]
    NotTainted(String, AuthorityState),
    /// Revoked already.
    #[error("X.509 authority {0:?} is already revoked")]
    AlreadyRevoked(String),
    /// Only the prepared authority can be activated.
    #[error("X.509 authority {:?} is {}, not prepared", .0, state_name(*.1))]
    NotPrepared(String, AuthorityState),
    /// There is a prepared authority already.
    #[error("X.509 authority {0:?} is already prepared; activate it first")]
    AlreadyPrepared(String),
    /// It still signed SVIDs that are live.
    #[error(
        "X.509 authority {id:?} still has {svids} live SVIDs on {agents} agents; revoke with force to revoke anyway"
    )]
    LiveSvids {
        /// The authority.
        id: String,
        /// Its live SVIDs.
        svids: usize,
        /// The agents holding them.
        agents: usize,
    },
}

/// The lowercase name of a state, as shown to operators.
pub(crate) fn state_name(state: AuthorityState) -> &'static str {
    match state {
        AuthorityState::Prepared => "prepared",
        AuthorityState::Active => "active",
        AuthorityState::Old => "old",
        AuthorityState::Tainted => "tainted",
        AuthorityState::Revoked => "revoked",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, created_at: i64, lifetime: i64) -> AuthorityRecord {
        AuthorityRecord {
            id: id.into(),
            state: AuthorityState::Prepared,
            created_at,
            not_after: created_at + lifetime,
            activated_at: None,
            deactivated_at: None,
            retire_at: None,
            tainted_at: None,
            revoked_at: None,
        }
    }

    #[test]
    fn only_a_non_active_authority_can_be_tainted_and_only_a_tainted_one_revoked() {
        let mut journal = Journal::default();
        journal.activate(record("a", 0, 180), 0, 30);
        journal.prepare(record("b", 90, 180));
        assert_eq!(
            journal.taint("a", 100),
            Err(Refusal::TaintActive("a".into()))
        );
        assert_eq!(
            journal.taint("zz", 100).unwrap_err().to_string(),
            r#"no X.509 authority with SKI "zz""#
        );
        assert_eq!(
            journal.revoke("b", 100).unwrap_err().to_string(),
            r#"X.509 authority "b" is prepared, not tainted; taint it first"#
        );

        let b = journal.prepared().cloned().unwrap();
        journal.activate(b, 110, 30);
        let sequence = journal.sequence;
        journal.taint("a", 120).unwrap();
        assert_eq!(journal.sequence, sequence, "tainting keeps the bundle");
        assert_eq!(journal.get("a").unwrap().state, AuthorityState::Tainted);
        assert_eq!(journal.get("a").unwrap().tainted_at, Some(120));
        assert_eq!(journal.tainted_ids().collect::<Vec<_>>(), ["a"]);
        assert_eq!(
            journal.taint("a", 121),
            Err(Refusal::AlreadyTainted("a".into(), AuthorityState::Tainted))
        );
        // A tainted authority still retires on schedule.
        assert_eq!(journal.next_event(120), (140, Event::Retire("a".into())));

        journal.revoke("a", 130).unwrap();
        assert_eq!(
            journal.sequence,
            sequence + 1,
            "revocation changes the bundle"
        );
        assert!(!journal.get("a").unwrap().state.in_bundle());
        assert_eq!(journal.tainted_ids().collect::<Vec<_>>(), ["a"]);
        assert_eq!(
            journal.revoke("a", 131),
            Err(Refusal::AlreadyRevoked("a".into()))
        );
        // Its record goes at its notAfter, without another bundle change.
        assert_eq!(journal.next_event(130), (180, Event::Retire("a".into())));
        assert!(journal.retire("a"));
        assert_eq!(journal.sequence, sequence + 1);
    }

    #[test]
    fn an_empty_journal_needs_an_active_authority_now() {
        assert_eq!(Journal::default().next_event(100), (100, Event::Activate));
    }

    #[test]
    fn the_schedule_over_one_cycle() {
        // ca_ttl 180 s, SVIDs at most 30 s.
        let mut journal = Journal::default();
        assert!(journal.activate(record("a", 0, 180), 0, 30));
        assert_eq!(journal.sequence, 1);
        assert_eq!(journal.next_event(0), (90, Event::Prepare));

        journal.prepare(record("b", 90, 180));
        assert_eq!(journal.sequence, 2);
        assert_eq!(journal.next_event(90), (150, Event::Activate));

        let b = journal.prepared().cloned().unwrap();
        assert!(!journal.activate(b, 150, 30));
        assert_eq!(journal.sequence, 2, "activation does not change the bundle");
        assert_eq!(journal.active().unwrap().id, "b");
        let a = &journal.authorities[0];
        assert_eq!(a.state, AuthorityState::Old);
        assert_eq!((a.deactivated_at, a.retire_at), (Some(150), Some(180)));
        assert_eq!(journal.next_event(150), (180, Event::Retire("a".into())));

        assert!(journal.retire("a"));
        assert_eq!(journal.sequence, 3);
        // b: created at 90, lives until 270; its successor at 180.
        assert_eq!(journal.next_event(180), (180, Event::Prepare));
    }

    #[test]
    fn retirement_is_capped_by_not_after() {
        let mut journal = Journal::default();
        journal.activate(record("a", 0, 180), 0, 30);
        journal.activate(record("b", 170, 180), 170, 30);
        assert_eq!(journal.authorities[0].retire_at, Some(180));
    }

    #[test]
    fn an_expired_active_authority_is_replaced_at_once() {
        let mut journal = Journal::default();
        journal.activate(record("a", 0, 180), 0, 30);
        assert_eq!(journal.next_event(500), (500, Event::Activate));
    }

    #[test]
    fn the_journal_round_trips_through_json() {
        let mut journal = Journal::default();
        journal.activate(record("a", 0, 180), 0, 30);
        journal.prepare(record("b", 90, 180));
        let json = serde_json::to_string(&journal).unwrap();
        assert!(json.contains(r#""state":"prepared""#), "{json}");
        assert!(!json.contains("tainted_at"), "{json}");
        let back: Journal = serde_json::from_str(&json).unwrap();
        assert_eq!(back, journal);
        journal.taint("b", 100).unwrap();
        let json = serde_json::to_string(&journal).unwrap();
        assert!(json.contains(r#""state":"tainted""#), "{json}");
        let back: Journal = serde_json::from_str(&json).unwrap();
        assert_eq!(back, journal);
    }
}
