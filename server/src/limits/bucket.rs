//! Token buckets: one for a single owner, and a keyed set of them shared by
//! every connection task (per user, per pair of users, per IP address).
//!
//! Time is passed in (`Instant`), so the arithmetic is tested without
//! sleeping.

use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::FastMap;

/// How many requests a limit allows per window: a bucket of `count` tokens
/// that refills at `count` per `window`, so a burst of `count` is allowed
/// and the sustained rate is `count / window`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Bucket size, and tokens added per window.
    pub count: u32,
    /// The window.
    pub window: Duration,
}

impl Rate {
    /// `count` per minute.
    #[must_use]
    pub const fn per_minute(count: u32) -> Self {
        Self {
            count,
            window: Duration::from_secs(60),
        }
    }

    /// `count` per hour.
    #[must_use]
    pub const fn per_hour(count: u32) -> Self {
        Self {
            count,
            window: Duration::from_secs(3600),
        }
    }

    /// `count` per second.
    #[must_use]
    pub const fn per_second(count: u32) -> Self {
        Self {
            count,
            window: Duration::from_secs(1),
        }
    }

    fn per_sec(&self) -> f64 {
        f64::from(self.count) / self.window.as_secs_f64().max(1e-9)
    }
}

/// A token bucket with a single owner (no locking).
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    #[must_use]
    pub fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate.count),
            last: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_sec()).min(f64::from(rate.count));
        self.last = now;
    }

    /// Takes one token, or says in how many milliseconds one will be there.
    ///
    /// # Errors
    /// The wait in milliseconds (at least 1) when the bucket is empty.
    pub fn take(&mut self, rate: Rate, now: Instant) -> Result<(), u64> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let per_sec = rate.per_sec();
            if per_sec <= 0.0 {
                return Err(rate.window.as_millis().try_into().unwrap_or(u64::MAX));
            }
            // Truncation is fine: the value is a small positive wait.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let ms = (((1.0 - self.tokens) / per_sec) * 1000.0).ceil() as u64;
            Err(ms.max(1))
        }
    }

    /// Gives a token back (a request that took one was not done after all).
    pub fn give_back(&mut self, rate: Rate) {
        self.tokens = (self.tokens + 1.0).min(f64::from(rate.count));
    }

    /// Whether the bucket has refilled completely by `now`: it then behaves
    /// exactly like a new one and may be forgotten.
    #[must_use]
    pub fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let mut b = *self;
        b.refill(rate, now);
        b.tokens >= f64::from(rate.count)
    }
}

/// Stripes of a [`KeyedLimiter`]: connection tasks on different threads
/// rarely take the same lock.
const STRIPES: usize = 64;

/// Keys a limiter tracks at most (over all stripes). A bucket is about 48
/// bytes with its key and map slot, so this caps one limiter near 50 MB.
/// Full buckets are dropped first when a stripe reaches its share (they
/// equal no bucket at all); only if none is full is an arbitrary one
/// forgotten, which can let that one key start over with a full bucket: a
/// bound on memory that costs precision only under a flood of over a
/// million distinct keys in one window.
pub const MAX_TRACKED_KEYS: usize = 1 << 20;

/// A token bucket per key, shared by all connection tasks. Each stripe is a
/// std mutex held for a map lookup and a few arithmetic operations, never
/// across an await.
pub struct KeyedLimiter<K> {
    rate: Rate,
    stripes: Box<[Mutex<FastMap<K, TokenBucket>>]>,
    per_stripe: usize,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// A limiter allowing `rate` per key, tracking at most `max_keys` keys.
    #[must_use]
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            stripes: (0..STRIPES)
                .map(|_| Mutex::new(FastMap::default()))
                .collect(),
            per_stripe: max_keys.div_ceil(STRIPES).max(1),
        }
    }

    /// The limit.
    #[must_use]
    pub fn rate(&self) -> Rate {
        self.rate
    }

    fn stripe(&self, key: &K) -> &Mutex<FastMap<K, TokenBucket>> {
        let hash = foldhash::fast::FixedState::with_seed(0x5b0a_4d11).hash_one(key);
        // The modulo keeps the index in range; truncation only picks a stripe.
        #[allow(clippy::cast_possible_truncation)]
        let i = (hash % STRIPES as u64) as usize;
        &self.stripes[i]
    }

    /// Takes one token of `key`'s bucket.
    ///
    /// # Errors
    /// Milliseconds until a token is available, when there is none.
    pub fn take(&self, key: &K, now: Instant) -> Result<(), u64> {
        let mut map = self
            .stripe(key)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(bucket) = map.get_mut(key) {
            return bucket.take(self.rate, now);
        }
        if map.len() >= self.per_stripe {
            let rate = self.rate;
            map.retain(|_, b| !b.is_full(rate, now));
            if map.len() >= self.per_stripe
                && let Some(victim) = map.keys().next().cloned()
            {
                map.remove(&victim);
            }
        }
        let mut bucket = TokenBucket::full(self.rate, now);
        let taken = bucket.take(self.rate, now);
        map.insert(key.clone(), bucket);
        taken
    }

    /// Gives back a token taken from `key`'s bucket.
    pub fn give_back(&self, key: &K) {
        let mut map = self
            .stripe(key)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(bucket) = map.get_mut(key) {
            bucket.give_back(self.rate);
        }
    }

    /// Keys tracked now (for tests and the memory bound).
    #[must_use]
    pub fn tracked(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
            })
            .sum()
    }
}

use std::hash::BuildHasher as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_a_burst_then_the_rate() {
        let rate = Rate::per_second(3);
        let t0 = Instant::now();
        let mut b = TokenBucket::full(rate, t0);
        for _ in 0..3 {
            b.take(rate, t0).unwrap();
        }
        let wait = b.take(rate, t0).unwrap_err();
        assert!((300..=334).contains(&wait), "{wait}");
        b.take(rate, t0 + Duration::from_millis(340)).unwrap();
        assert!(b.take(rate, t0 + Duration::from_millis(340)).is_err());
        assert!(b.is_full(rate, t0 + Duration::from_secs(2)));
    }

    #[test]
    fn a_refused_request_can_give_its_token_back() {
        let rate = Rate::per_hour(1);
        let t0 = Instant::now();
        let mut b = TokenBucket::full(rate, t0);
        b.take(rate, t0).unwrap();
        b.give_back(rate);
        b.take(rate, t0).unwrap();
        let wait = b.take(rate, t0).unwrap_err();
        assert!(wait > 3_500_000, "{wait}");
    }

    #[test]
    fn keys_have_their_own_buckets() {
        let l = KeyedLimiter::new(Rate::per_minute(2), 1000);
        let t0 = Instant::now();
        l.take(&1u64, t0).unwrap();
        l.take(&1u64, t0).unwrap();
        assert!(l.take(&1u64, t0).is_err());
        l.take(&2u64, t0).unwrap();
        l.give_back(&1u64);
        l.take(&1u64, t0).unwrap();
    }

    #[test]
    fn a_limiter_tracks_a_bounded_number_of_keys_and_forgets_full_ones_first() {
        let bound = STRIPES * 4;
        let l = KeyedLimiter::new(Rate::per_minute(5), bound);
        let t0 = Instant::now();
        for k in 0..10_000u64 {
            let _ = l.take(&k, t0);
        }
        assert!(l.tracked() <= bound, "{}", l.tracked());
        // 20 s later those buckets are full again (one token of five taken,
        // refilling at one per 12 s), and an exhausted key is not: new keys
        // push out the full buckets, never the exhausted one.
        let t1 = t0 + Duration::from_secs(20);
        let hot = u64::MAX;
        for _ in 0..5 {
            l.take(&hot, t1).unwrap();
        }
        for k in 20_000..20_016u64 {
            let _ = l.take(&k, t1);
        }
        assert!(l.take(&hot, t1).is_err(), "the exhausted key was forgotten");
        assert!(l.tracked() <= bound, "{}", l.tracked());
    }
}
