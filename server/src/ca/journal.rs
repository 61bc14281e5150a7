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
                AuthorityState::Old => record.retire_at.unwrap_or(record.not_after),
                // A prepared authority that expired unused is dropped.
                AuthorityState::Prepared => record.not_after,
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
        let before = self.authorities.len();
        self.authorities.retain(|a| a.id != id);
        let removed = self.authorities.len() != before;
        if removed {
            self.sequence += 1;
        }
        removed
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
        }
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
        let back: Journal = serde_json::from_str(&json).unwrap();
        assert_eq!(back, journal);
    }
}
