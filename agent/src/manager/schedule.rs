//! When an SVID is renewed.
//!
//! Each SVID is renewed at `issued + lifetime × (0.5 − jitter)`, with
//! `jitter` drawn uniformly from `[0, 0.1)`, so SVIDs issued together do not
//! all come due at the same instant. The server back-dates `notBefore` by
//! [`BACKDATE`] to absorb clock skew; `issued` is the time it signed, and
//! `lifetime` runs from there to `notAfter`, so a short-lived SVID is not
//! renewed early by the back-dated part. The scheduler then signs, in one batch,
//! every SVID due within [`BATCH_WINDOW`] of the earliest.

use std::time::{Duration, SystemTime};

use sigil::x509::BACKDATE;
use tokio::time::Instant;

/// SVIDs due within this much of now are renewed in the same batch.
pub(crate) const BATCH_WINDOW: Duration = Duration::from_secs(1);

/// The shortest time between receiving an SVID and renewing it, so that an
/// SVID with a tiny lifetime cannot make the agent sign in a tight loop.
pub(crate) const MIN_RENEWAL_DELAY: Duration = Duration::from_secs(5);

/// The largest part of the lifetime subtracted from one half.
pub(crate) const MAX_JITTER: f64 = 0.1;

/// The longest the scheduler sleeps before it reads the wall clock again, so
/// a clock step or a suspended machine delays a renewal by at most this.
pub(crate) const MAX_SLEEP: Duration = Duration::from_secs(60);

/// A jitter drawn uniformly from `[0, MAX_JITTER)`.
pub(crate) fn jitter() -> f64 {
    fastrand::f64() * MAX_JITTER
}

/// The renewal time of an SVID valid from `not_before` to `not_after`,
/// received at `now`, with the given jitter in `[0, MAX_JITTER)`.
pub(crate) fn renewal_time(
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    jitter: f64,
) -> SystemTime {
    let issued = (not_before + BACKDATE).min(not_after);
    let lifetime = not_after.duration_since(issued).unwrap_or(Duration::ZERO);
    let fraction = (0.5 - jitter.clamp(0.0, MAX_JITTER)).max(0.0);
    let planned = issued + lifetime.mul_f64(fraction);
    let earliest = (now + MIN_RENEWAL_DELAY).min(not_after);
    planned.max(earliest)
}

/// The tokio instant at which the wall clock, reading `now`, will read `at`.
pub(crate) fn instant_at(at: SystemTime, now: SystemTime) -> Instant {
    let wait = at.duration_since(now).unwrap_or(Duration::ZERO);
    Instant::now() + wait.min(MAX_SLEEP)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn renewal_falls_between_40_and_50_percent_of_the_lifetime() {
        // Signed at 1_000 for an hour; notBefore back-dated.
        let (nb, na) = (t(1_000) - BACKDATE, t(1_000 + 3_600));
        assert_eq!(renewal_time(nb, na, t(1_000), 0.0), t(1_000 + 1_800));
        let latest_jitter = MAX_JITTER - f64::EPSILON;
        let earliest = renewal_time(nb, na, t(1_000), latest_jitter);
        assert!(earliest > t(1_000 + 1_439) && earliest <= t(1_000 + 1_440));
        for _ in 0..1_000 {
            let at = renewal_time(nb, na, t(1_000), jitter());
            assert!(at > t(1_000 + 1_439) && at <= t(1_000 + 1_800), "{at:?}");
        }
    }

    #[test]
    fn the_back_dated_part_does_not_shorten_a_short_lifetime() {
        // A 20 s SVID: renewed 10 s after signing, not 5 s.
        let (nb, na) = (t(1_000) - BACKDATE, t(1_020));
        assert_eq!(renewal_time(nb, na, t(1_000), 0.0), t(1_010));
    }

    #[test]
    fn a_tiny_lifetime_does_not_renew_at_once() {
        let (nb, na) = (t(1_000) - BACKDATE, t(1_012));
        assert_eq!(renewal_time(nb, na, t(1_004), 0.0), t(1_009));
        // Never after expiry, though.
        assert_eq!(renewal_time(nb, na, t(1_010), 0.0), t(1_012));
    }
}
