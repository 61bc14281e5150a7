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
