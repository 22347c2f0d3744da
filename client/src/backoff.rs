//! Reconnect delays: exponential growth with "full jitter" (a uniformly
//! random delay between zero and the exponential ceiling), which spreads a
//! crowd of clients reconnecting after an outage instead of synchronising them.

use std::time::Duration;

/// Default first ceiling: quick enough that a blip is invisible.
pub const DEFAULT_INITIAL: Duration = Duration::from_millis(100);

/// Default largest ceiling: an outage costs a client at most one attempt
/// every 30 s on average, so a fleet cannot hammer a recovering server.
pub const DEFAULT_MAX: Duration = Duration::from_secs(30);

/// Exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backoff {
    /// Ceiling of the first delay.
    pub initial: Duration,
    /// Largest ceiling.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: DEFAULT_INITIAL,
            max: DEFAULT_MAX,
        }
    }
}

impl Backoff {
    /// Ceilings from `initial`, doubling per attempt, up to `max`.
    #[must_use]
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The ceiling for attempt `attempt` (0-based): `initial · 2^attempt`,
    /// capped at `max`.
    #[must_use]
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// A random delay in `[0, ceiling(attempt)]`.
    #[must_use]
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::random_range(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(200));
        assert_eq!(b.ceiling(8), Duration::from_millis(25_600));
        assert_eq!(b.ceiling(9), Duration::from_secs(30));
        assert_eq!(b.ceiling(1000), Duration::from_secs(30));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(30));
        let mut last = Duration::ZERO;
        for attempt in 0..64 {
            let c = b.ceiling(attempt);
            assert!(c >= last && c <= b.max);
            last = c;
        }
    }

    #[test]
    fn delay_stays_within_bounds_and_varies() {
        let b = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(1),
        };
        for attempt in 0..40 {
            for _ in 0..50 {
                assert!(b.delay(attempt) <= b.ceiling(attempt));
            }
        }
        let samples: std::collections::HashSet<_> = (0..50).map(|_| b.delay(20)).collect();
        assert!(samples.len() > 1, "full jitter must vary");
    }

    #[test]
    fn huge_initial_is_capped() {
        let b = Backoff {
            initial: Duration::MAX,
            max: Duration::from_secs(5),
        };
        assert_eq!(b.ceiling(3), Duration::from_secs(5));
        assert!(b.delay(3) <= Duration::from_secs(5));
    }
}
