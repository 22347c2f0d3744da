//! Limits: every rate limit and quota a client can run into, in one place.
//!
//! Owns the token buckets (`bucket`), connection admission (`admission`),
//! the request limiters shared by every connection task ([`Limits`]) and the
//! names, metrics and errors of each limit ([`Limit`]).
//!
//! Everything a client can repeat is limited per *user* (or per IP address
//! before there is a user), never per connection, so reconnecting resets
//! nothing. Where each limit is enforced:
//! - sends (per user and per sender→recipient pair), READ receipts, phone
//!   lookups, key-bundle fetches and code requests per IP address: here, in
//!   keyed buckets checked by the connection task before the request reaches
//!   a shard, so a flood costs a map lookup and never takes room in a
//!   shard's inbox;
//! - code requests and wrong codes per phone number, one-time keys handed
//!   out per device, and the durable queue quota per device: in the shard
//!   that owns the number or the device (`router::shard`), because they are
//!   part of that owner's durable state or need its queue's size.
//!
//! In cluster mode each node keeps these buckets and also counts every
//! per-user and per-IP request limit in the cluster (`shared`: Redis
//! counters per key and window, reported in steps and never waited on), so
//! spreading requests over several nodes does not multiply a limit. New
//! connections per IP stay per node: they protect that node's accept loop.
//!
//! Each limit is a setting (docs/OPERATIONS.md lists them with their
//! defaults) and counts its refusals in `rate_limited_total{limit}`.

mod admission;
mod bucket;
pub mod shared;

pub use admission::{Admission, Slot};
pub use bucket::{KeyedLimiter, MAX_TRACKED_KEYS, Rate, TokenBucket};
use shared::{Shared, SharedKey};

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::store::UserId;
use crate::telemetry as tm;

/// Which limit refused a request: the metric label and the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// Sends per sending user (all devices and connections together).
    UserSends,
    /// Sends per sender→recipient pair.
    PairSends,
    /// READ receipts per user.
    ReadReceipts,
    /// Phone-number lookups per user.
    Lookups,
    /// Key-bundle fetches per requesting user.
    BundleFetches,
    /// Verification-code requests per IP address.
    CodeRequestsPerIp,
    /// New connections per IP address.
    ConnectionsPerIp,
    /// Verification-code requests per phone number.
    CodeRequestsPerPhone,
    /// Wrong verification codes per phone number per day.
    WrongCodes,
    /// Link codes per user.
    LinkCodes,
    /// One-time keys handed out per device (past it: the fallback key).
    OneTimeKeys,
    /// The recipient device's durable queue is full.
    QueueFull,
    /// The server's connection cap.
    Connections,
    /// Group creations and changes per user.
    GroupChanges,
}

impl Limit {
    /// Every limit, for metrics registered at start.
    pub const ALL: [Limit; 14] = [
        Limit::UserSends,
        Limit::PairSends,
        Limit::ReadReceipts,
        Limit::Lookups,
        Limit::BundleFetches,
        Limit::CodeRequestsPerIp,
        Limit::ConnectionsPerIp,
        Limit::CodeRequestsPerPhone,
        Limit::WrongCodes,
        Limit::LinkCodes,
        Limit::OneTimeKeys,
        Limit::QueueFull,
        Limit::Connections,
        Limit::GroupChanges,
    ];

    /// The `limit` label of `rate_limited_total`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Limit::UserSends => "sends_per_user",
            Limit::PairSends => "sends_per_pair",
            Limit::ReadReceipts => "read_receipts_per_user",
            Limit::Lookups => "lookups_per_user",
            Limit::BundleFetches => "bundle_fetches_per_user",
            Limit::CodeRequestsPerIp => "code_requests_per_ip",
            Limit::ConnectionsPerIp => "connections_per_ip",
            Limit::CodeRequestsPerPhone => "code_requests_per_phone",
            Limit::WrongCodes => "wrong_codes_per_phone",
            Limit::LinkCodes => "link_codes_per_user",
            Limit::OneTimeKeys => "one_time_keys_per_device",
            Limit::QueueFull => "queue_quota",
            Limit::Connections => "max_connections",
            Limit::GroupChanges => "group_changes_per_user",
        }
    }

    /// What a client is told.
    #[must_use]
    pub fn message(self) -> &'static str {
        match self {
            Limit::UserSends => "too many messages sent; slow down",
            Limit::PairSends => "too many messages to this user; slow down",
            Limit::ReadReceipts => "too many read receipts",
            Limit::Lookups => "too many phone number lookups",
            Limit::BundleFetches => "too many key bundle fetches",
            Limit::CodeRequestsPerIp => "too many code requests from this address",
            Limit::ConnectionsPerIp => "too many new connections from this address",
            Limit::CodeRequestsPerPhone => "too many code requests for this number",
            Limit::WrongCodes => "too many wrong codes for this number today",
            Limit::LinkCodes => "too many link codes",
            Limit::GroupChanges => "too many group creations and changes",
            Limit::OneTimeKeys => "too many one-time keys of this device handed out",
            Limit::QueueFull => {
                "the recipient's queue is full; not stored, retry later with the same id"
            }
            Limit::Connections => "the server is at its connection limit",
        }
    }

    /// Counts one refusal.
    pub fn tripped(self) {
        metrics::counter!(tm::RATE_LIMITED, "limit" => self.name()).increment(1);
    }

    /// Counts one refusal and says when to come back.
    #[must_use]
    pub fn refuse(self, retry_after_ms: u64) -> Refused {
        self.tripped();
        Refused {
            limit: self,
            retry_after_ms,
        }
    }
}

/// Registers `rate_limited_total` for every limit at zero, so each series is
/// there from the start.
pub fn register_metrics() {
    for limit in Limit::ALL {
        metrics::counter!(tm::RATE_LIMITED, "limit" => limit.name()).absolute(0);
    }
}

/// The request limits checked by connection tasks (from the configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestLimits {
    /// Sends per user.
    pub sends_per_user: Rate,
    /// Sends per sender→recipient pair.
    pub sends_per_pair: Rate,
    /// READ receipts per user.
    pub read_receipts_per_user: Rate,
    /// Phone lookups per user.
    pub lookups_per_user: Rate,
    /// Key-bundle fetches per requesting user.
    pub bundle_fetches_per_user: Rate,
    /// Code requests per IP address.
    pub code_requests_per_ip: Rate,
    /// New connections per IP address.
    pub connections_per_ip: Rate,
    /// Group creations and changes per user.
    pub group_changes_per_user: Rate,
}

/// A refusal: which limit, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The limit.
    pub limit: Limit,
    /// Milliseconds until the request would be allowed.
    pub retry_after_ms: u64,
}

/// The keyed limiters every connection task shares.
pub struct Limits {
    sends_per_user: KeyedLimiter<UserId>,
    sends_per_pair: KeyedLimiter<(UserId, UserId)>,
    read_receipts: KeyedLimiter<UserId>,
    lookups: KeyedLimiter<UserId>,
    bundle_fetches: KeyedLimiter<UserId>,
    code_requests_per_ip: KeyedLimiter<IpAddr>,
    connections_per_ip: KeyedLimiter<IpAddr>,
    group_changes: KeyedLimiter<UserId>,
    /// The cluster's counts (cluster mode only).
    shared: Option<Shared>,
}

impl Limits {
    /// Limiters for `cfg`.
    #[must_use]
    pub fn new(cfg: &RequestLimits) -> Self {
        Self {
            sends_per_user: KeyedLimiter::new(cfg.sends_per_user, MAX_TRACKED_KEYS),
            sends_per_pair: KeyedLimiter::new(cfg.sends_per_pair, MAX_TRACKED_KEYS),
            read_receipts: KeyedLimiter::new(cfg.read_receipts_per_user, MAX_TRACKED_KEYS),
            lookups: KeyedLimiter::new(cfg.lookups_per_user, MAX_TRACKED_KEYS),
            bundle_fetches: KeyedLimiter::new(cfg.bundle_fetches_per_user, MAX_TRACKED_KEYS),
            code_requests_per_ip: KeyedLimiter::new(cfg.code_requests_per_ip, MAX_TRACKED_KEYS),
            connections_per_ip: KeyedLimiter::new(cfg.connections_per_ip, MAX_TRACKED_KEYS),
            group_changes: KeyedLimiter::new(cfg.group_changes_per_user, MAX_TRACKED_KEYS),
            shared: None,
        }
    }

    /// Counts the request limits in the cluster as well (cluster mode).
    pub fn share(&mut self, shared: Shared) {
        self.shared = Some(shared);
    }

    fn check<K: SharedKey + Eq + Clone>(
        &self,
        limiter: &KeyedLimiter<K>,
        limit: Limit,
        key: &K,
    ) -> Result<(), Refused> {
        self.check_at(limiter, limit, key, Instant::now())
    }

    /// This node's bucket, then the cluster's count.
    fn check_at<K: SharedKey + Eq + Clone>(
        &self,
        limiter: &KeyedLimiter<K>,
        limit: Limit,
        key: &K,
        now: Instant,
    ) -> Result<(), Refused> {
        limiter
            .take(key, now)
            .map_err(|retry_after_ms| limit.refuse(retry_after_ms))?;
        match &self.shared {
            Some(shared) => shared.check(limit, limiter.rate(), key, crate::clock::now_ms()),
            None => Ok(()),
        }
    }

    /// A send from `from` to `to`: counts against the sender and the pair.
    ///
    /// # Errors
    /// [`Refused`] naming the limit that is exhausted (nothing is taken then).
    pub fn send(&self, from: UserId, to: UserId) -> Result<(), Refused> {
        let now = Instant::now();
        self.check_at(&self.sends_per_user, Limit::UserSends, &from, now)?;
        if let Err(refused) =
            self.check_at(&self.sends_per_pair, Limit::PairSends, &(from, to), now)
        {
            self.sends_per_user.give_back(&from);
            return Err(refused);
        }
        Ok(())
    }

    /// A READ receipt from `user`.
    ///
    /// # Errors
    /// [`Refused`] when the user's receipts are exhausted.
    pub fn read_receipt(&self, user: UserId) -> Result<(), Refused> {
        self.check(&self.read_receipts, Limit::ReadReceipts, &user)
    }

    /// A group creation or change by `user`.
    ///
    /// # Errors
    /// [`Refused`] when the user's group changes are exhausted.
    pub fn group_change(&self, user: UserId) -> Result<(), Refused> {
        self.check(&self.group_changes, Limit::GroupChanges, &user)
    }

    /// A phone-number lookup by `user`.
    ///
    /// # Errors
    /// [`Refused`] when the user's lookups are exhausted.
    pub fn lookup(&self, user: UserId) -> Result<(), Refused> {
        self.check(&self.lookups, Limit::Lookups, &user)
    }

    /// A key-bundle fetch by `user`.
    ///
    /// # Errors
    /// [`Refused`] when the user's fetches are exhausted.
    pub fn bundle_fetch(&self, user: UserId) -> Result<(), Refused> {
        self.check(&self.bundle_fetches, Limit::BundleFetches, &user)
    }

    /// A new connection from `ip` (checked before its handshake).
    ///
    /// # Errors
    /// [`Refused`] when the address's new connections are exhausted.
    pub fn connection(&self, ip: IpAddr) -> Result<(), Refused> {
        // Per node only: it protects this node's accept loop.
        self.connections_per_ip
            .take(&ip, Instant::now())
            .map_err(|retry_after_ms| Limit::ConnectionsPerIp.refuse(retry_after_ms))
    }

    /// A verification-code request from `ip`.
    ///
    /// # Errors
    /// [`Refused`] when the address's requests are exhausted.
    pub fn code_request(&self, ip: IpAddr) -> Result<(), Refused> {
        self.check(&self.code_requests_per_ip, Limit::CodeRequestsPerIp, &ip)
    }
}

/// A limit kept as the times of recent events in the owner's durable record
/// (code requests per phone, link codes per user): drops the times older
/// than `rate.window`, then records `now_ms` if fewer than `rate.count`
/// remain.
///
/// # Errors
/// Milliseconds until the oldest recorded event leaves the window.
pub fn take_from_log(times: &mut Vec<u64>, now_ms: u64, rate: Rate) -> Result<(), u64> {
    let window_ms = u64::try_from(rate.window.as_millis()).unwrap_or(u64::MAX);
    times.retain(|t| now_ms.saturating_sub(*t) < window_ms);
    if times.len() >= rate.count as usize {
        let oldest = times.iter().copied().min().unwrap_or(now_ms);
        return Err(oldest
            .saturating_add(window_ms)
            .saturating_sub(now_ms)
            .max(1));
    }
    times.push(now_ms);
    Ok(())
}

/// A per-key counter over a fixed window that starts with its first event
/// (wrong codes per phone per day): `(window start, count)`, kept in the
/// owner's durable record.
#[must_use]
pub fn window_count(start_ms: u64, count: u32, now_ms: u64, window: Duration) -> (u64, u32) {
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    if now_ms.saturating_sub(start_ms) >= window_ms {
        (now_ms, 0)
    } else {
        (start_ms, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_min: u32) -> Limits {
        let r = Rate::per_minute(per_min);
        Limits::new(&RequestLimits {
            sends_per_user: r,
            sends_per_pair: Rate::per_minute(per_min / 2),
            read_receipts_per_user: r,
            lookups_per_user: r,
            bundle_fetches_per_user: r,
            code_requests_per_ip: r,
            connections_per_ip: r,
            group_changes_per_user: r,
        })
    }

    #[test]
    fn sends_count_per_pair_and_per_user() {
        let l = limits(4);
        l.send(1, 2).unwrap();
        l.send(1, 2).unwrap();
        let r = l.send(1, 2).unwrap_err();
        assert_eq!(r.limit, Limit::PairSends);
        // The refused pair send gave the user's token back: two more to
        // another recipient fit in the user's four.
        l.send(1, 3).unwrap();
        l.send(1, 3).unwrap();
        let r = l.send(1, 4).unwrap_err();
        assert_eq!(r.limit, Limit::UserSends);
        assert!(r.retry_after_ms > 0);
        // Another sender is unaffected.
        l.send(5, 2).unwrap();
    }

    #[test]
    fn nodes_sharing_counts_hold_one_limit_together() {
        let counters = std::sync::Arc::new(shared::MemoryCounters::default());
        let node = |counters: std::sync::Arc<shared::MemoryCounters>| {
            let mut l = limits(20);
            l.share(Shared::start(counters, 1_000).unwrap());
            l
        };
        let (a, b) = (node(counters.clone()), node(counters.clone()));
        // Alternating nodes: each one's own bucket allows 20 an hour, 40 in
        // all; the cluster's count stops them together, each after at most
        // one request past the limit (plus one while a refusal is being
        // noted: the count lands before the flag).
        let mut accepted = 0u64;
        for i in 0..40 {
            let l = if i % 2 == 0 { &a } else { &b };
            if l.lookup(1).is_ok() {
                accepted += 1;
            }
            // Each accepted request's report has landed.
            let landed = (0..400).any(|_| {
                let total = counters.total_with_prefix("lookups_per_user:1:");
                total == accepted || {
                    std::thread::sleep(Duration::from_millis(5));
                    false
                }
            });
            assert!(landed);
        }
        assert!((20..=24).contains(&accepted), "{accepted}");
        // Per-node only: new connections per address.
        for _ in 0..20 {
            a.connection(IpAddr::from([10, 0, 0, 1])).unwrap();
            b.connection(IpAddr::from([10, 0, 0, 1])).unwrap();
        }
    }

    #[test]
    fn a_log_allows_count_per_window() {
        let rate = Rate::per_hour(2);
        let mut times = Vec::new();
        take_from_log(&mut times, 1_000, rate).unwrap();
        take_from_log(&mut times, 2_000, rate).unwrap();
        assert_eq!(take_from_log(&mut times, 3_000, rate), Err(3_598_000));
        take_from_log(&mut times, 3_601_000, rate).unwrap();
        assert_eq!(times, vec![2_000, 3_601_000]);
    }

    #[test]
    fn a_window_restarts_once_it_has_passed() {
        let day = Duration::from_secs(86_400);
        assert_eq!(window_count(1000, 7, 2000, day), (1000, 7));
        assert_eq!(
            window_count(1000, 7, 1000 + 86_400_000, day),
            (1000 + 86_400_000, 0)
        );
    }
}
