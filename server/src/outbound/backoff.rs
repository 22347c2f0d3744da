//! Retry policy: how many attempts, and a jittered exponential delay
//! between them, so that many callers retrying at once spread out instead
//! of hitting a recovering endpoint together.

use std::time::Duration;

use rand::Rng;

/// How a failed call is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// Delay ceiling before the first retry; doubles for each later one.
    pub base_delay: Duration,
    /// No delay is longer than this.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// The ceiling of the delay before retry number `retry` (0 for the first
    /// retry): `base_delay × 2^retry`, capped at `max_delay`.
    #[must_use]
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// The delay before retry number `retry`: uniform between half the
    /// ceiling and the ceiling ("equal jitter": never zero, never in step).
    #[must_use]
    pub fn delay(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(retry);
        let half = ceiling / 2;
        let spread = u64::try_from((ceiling - half).as_micros()).unwrap_or(u64::MAX);
        half + Duration::from_micros(rng.random_range(0..=spread))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 5,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(2),
    };

    #[test]
    fn ceilings_double_up_to_the_cap() {
        assert_eq!(POLICY.ceiling(0), Duration::from_millis(100));
        assert_eq!(POLICY.ceiling(1), Duration::from_millis(200));
        assert_eq!(POLICY.ceiling(3), Duration::from_millis(800));
        assert_eq!(POLICY.ceiling(5), Duration::from_secs(2));
        assert_eq!(POLICY.ceiling(200), Duration::from_secs(2));
    }

    #[test]
    fn delays_stay_within_half_the_ceiling_and_the_ceiling_and_vary() {
        let mut rng = rand::rng();
        for retry in 0..40 {
            let ceiling = POLICY.ceiling(retry);
            let delays: Vec<_> = (0..200).map(|_| POLICY.delay(retry, &mut rng)).collect();
            for d in &delays {
                assert!(*d >= ceiling / 2 && *d <= ceiling, "{d:?} vs {ceiling:?}");
            }
            assert!(delays.iter().any(|d| *d != delays[0]), "jittered");
        }
    }
}
