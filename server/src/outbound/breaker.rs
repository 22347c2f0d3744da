//! A circuit breaker: after `failure_threshold` failures in a row, calls are
//! refused at once for `open_for`; then one trial call is let through
//! (half-open), whose outcome closes or reopens the circuit.
//!
//! Time is passed in, so the states are tested without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; failures are being counted.
    Closed,
    /// Calls are refused until the cool-down ends.
    Open,
    /// One trial call is allowed; its outcome decides.
    HalfOpen,
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { trial_in_flight: bool },
}

/// A call refused because the circuit is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// How long until a trial call will be allowed.
    pub retry_after: Duration,
}

/// A circuit breaker shared by every caller of one remote endpoint.
#[derive(Debug)]
pub struct Breaker {
    failure_threshold: u32,
    open_for: Duration,
    state: Mutex<State>,
}

impl Breaker {
    /// A closed breaker that opens after `failure_threshold` (at least 1)
    /// failures in a row and stays open for `open_for`.
    #[must_use]
    pub fn new(failure_threshold: u32, open_for: Duration) -> Self {
        Self {
            failure_threshold: failure_threshold.max(1),
            open_for,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a plain value, valid even if a holder panicked.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks to make one call at `now`.
    ///
    /// # Errors
    /// [`Refused`] while the circuit is open, or half-open with its trial
    /// call still running.
    pub fn allow(&self, now: Instant) -> Result<(), Refused> {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Ok(()),
            State::Open { until } if now < until => Err(Refused {
                retry_after: until - now,
            }),
            State::Open { .. } => {
                *state = State::HalfOpen {
                    trial_in_flight: true,
                };
                Ok(())
            }
            State::HalfOpen {
                trial_in_flight: true,
            } => Err(Refused {
                retry_after: self.open_for,
            }),
            State::HalfOpen {
                trial_in_flight: false,
            } => {
                *state = State::HalfOpen {
                    trial_in_flight: true,
                };
                Ok(())
            }
        }
    }

    /// As [`Breaker::allow`] but changes nothing: refuses only while open
    /// with the cool-down still running.
    ///
    /// # Errors
    /// [`Refused`] while the circuit is open.
    pub fn peek(&self, now: Instant) -> Result<(), Refused> {
        match *self.lock() {
            State::Open { until } if now < until => Err(Refused {
                retry_after: until - now,
            }),
            _ => Ok(()),
        }
    }

    /// Reports that an allowed call succeeded: the circuit closes.
    pub fn record_success(&self) {
        *self.lock() = State::Closed { failures: 0 };
    }

    /// Reports that an allowed call failed at `now`.
    pub fn record_failure(&self, now: Instant) {
        let mut state = self.lock();
        let open = State::Open {
            until: now + self.open_for,
        };
        *state = match *state {
            State::Closed { failures } if failures + 1 < self.failure_threshold => State::Closed {
                failures: failures + 1,
            },
            // A late failure of a call allowed before the circuit opened
            // does not extend the cool-down.
            State::Open { until } => State::Open { until },
            State::Closed { .. } | State::HalfOpen { .. } => open,
        };
    }

    /// The current state (for metrics and tests).
    #[must_use]
    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_secs(30);

    #[test]
    fn opens_after_the_threshold_of_failures_in_a_row() {
        let b = Breaker::new(3, OPEN_FOR);
        let t = Instant::now();
        for _ in 0..2 {
            b.allow(t).unwrap();
            b.record_failure(t);
            assert_eq!(b.state(), BreakerState::Closed);
        }
        b.allow(t).unwrap();
        b.record_failure(t);
        assert_eq!(b.state(), BreakerState::Open);
        let refused = b.allow(t + Duration::from_secs(10)).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(20));
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = Breaker::new(3, OPEN_FOR);
        let t = Instant::now();
        b.record_failure(t);
        b.record_failure(t);
        b.record_success();
        b.record_failure(t);
        b.record_failure(t);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn half_open_allows_one_trial_that_closes_or_reopens() {
        let b = Breaker::new(1, OPEN_FOR);
        let t = Instant::now();
        b.record_failure(t);
        assert_eq!(b.state(), BreakerState::Open);
        let later = t + OPEN_FOR;
        b.allow(later).unwrap();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.allow(later).is_err(), "only one trial at a time");
        b.record_failure(later);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.allow(later + Duration::from_secs(1)).is_err());

        let again = later + OPEN_FOR;
        b.allow(again).unwrap();
        b.record_success();
        assert_eq!(b.state(), BreakerState::Closed);
        b.allow(again).unwrap();
    }
}
