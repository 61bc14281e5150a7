//! Wall-clock time for certificate validity, behind a trait so that tests
//! can tie it to paused tokio time.

use std::time::SystemTime;

/// The current wall-clock time.
pub(crate) trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that advances with tokio time, so paused-time tests see
/// certificates expire.
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokioClock {
    start: SystemTime,
    started: tokio::time::Instant,
}

#[cfg(test)]
impl TokioClock {
    /// A clock reading `start` now.
    pub(crate) fn starting_at(start: SystemTime) -> Self {
        Self {
            start,
            started: tokio::time::Instant::now(),
        }
    }
}

#[cfg(test)]
impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.start + self.started.elapsed()
    }
}
