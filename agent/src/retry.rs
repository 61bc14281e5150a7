//! Retry helpers: exponential backoff, and a filter that keeps a failure
//! repeating every second from flooding the log.

use std::time::Duration;

/// Exponential backoff: `initial`, doubling up to `max`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before the next attempt; each call doubles the following one.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Starts again from the initial delay, after a success.
    pub(crate) fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// How a failure should be logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Report {
    /// Log it as a warning.
    Warn,
    /// The same failure has been warned about enough; log it at debug level.
    /// Carries how many times in a row it has happened.
    Quiet(u64),
}

/// Warns about the first [`RepeatedErrors::WARN_LIMIT`] identical failures in
/// a row, and only counts the ones after that.
#[derive(Debug, Default)]
pub(crate) struct RepeatedErrors {
    last: Option<String>,
    count: u64,
}

impl RepeatedErrors {
    /// Identical failures warned about before going quiet.
    pub(crate) const WARN_LIMIT: u64 = 3;

    /// Records a failure and says how to log it.
    pub(crate) fn observe(&mut self, message: &str) -> Report {
        if self.last.as_deref() == Some(message) {
            self.count += 1;
        } else {
            self.last = Some(message.to_owned());
            self.count = 1;
        }
        if self.count <= Self::WARN_LIMIT {
            Report::Warn
        } else {
            Report::Quiet(self.count)
        }
    }

    /// Forgets past failures, after a success.
    pub(crate) fn reset(&mut self) {
        self.last = None;
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        let delays: Vec<_> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(200));
    }

    #[test]
    fn identical_errors_go_quiet_after_three_and_a_new_one_warns_again() {
        let mut r = RepeatedErrors::default();
        let reports: Vec<_> = (0..5).map(|_| r.observe("down")).collect();
        assert_eq!(
            reports,
            [
                Report::Warn,
                Report::Warn,
                Report::Warn,
                Report::Quiet(4),
                Report::Quiet(5)
            ]
        );
        assert_eq!(r.observe("other"), Report::Warn);
        r.reset();
        assert_eq!(r.observe("other"), Report::Warn);
    }
}
