//! Wall-clock times as the APIs carry them: seconds since the Unix epoch.

use std::time::{Duration, SystemTime};

/// The current time in seconds since the Unix epoch.
pub(crate) fn now_unix() -> i64 {
    to_unix(SystemTime::now())
}

/// A time in seconds since the Unix epoch (0 for times before it).
pub(crate) fn to_unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The time `secs` seconds after the Unix epoch (the epoch for negative
/// values).
pub(crate) fn from_unix(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// RFC 3339 form of a Unix time, e.g. `2024-05-01T12:00:00Z`.
pub(crate) fn rfc3339(secs: i64) -> String {
    humantime::format_rfc3339_seconds(from_unix(secs)).to_string()
}

/// The source of wall-clock time for schedules that sleep on tokio time.
///
/// [`Clock::System`] reads the system clock. [`Clock::Tokio`] derives wall
/// time from tokio's clock, so that tests on paused tokio time advance both
/// together.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Clock {
    /// The system clock.
    System,
    /// `wall` at `instant`, advancing with tokio's clock.
    #[cfg_attr(not(test), expect(dead_code, reason = "used by tests on paused time"))]
    Tokio {
        /// Wall time at `instant`.
        wall: SystemTime,
        /// The tokio instant matching `wall`.
        instant: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock following tokio's time from now on.
    #[cfg(test)]
    pub(crate) fn tokio() -> Self {
        Self::Tokio {
            wall: SystemTime::now(),
            instant: tokio::time::Instant::now(),
        }
    }

    /// The current wall-clock time.
    pub(crate) fn now(&self) -> SystemTime {
        match self {
            Self::System => SystemTime::now(),
            Self::Tokio { wall, instant } => *wall + instant.elapsed(),
        }
    }

    /// The tokio instant at which this clock shows `at` (now, for times in
    /// the past).
    pub(crate) fn instant_of(&self, at: SystemTime) -> tokio::time::Instant {
        tokio::time::Instant::now() + at.duration_since(self.now()).unwrap_or_default()
    }
}
