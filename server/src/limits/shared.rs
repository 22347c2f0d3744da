//! Limits counted across the nodes of a cluster.
//!
//! Each node keeps its own token buckets ([`super::Limits`]), so without
//! more a user who spreads requests over N nodes would get N times every
//! limit. A [`Shared`] adds one count per key and fixed window held by the
//! cluster (Redis counters, `cluster::counters`), and refuses a key for the
//! rest of its window once the cluster's total for it passes the limit.
//!
//! The check never waits on the network. A node reports a key's requests
//! to the cluster in steps of `count / 32` (at least 1), pipelined by one
//! thread, and learns the total in the answer; a total over the limit
//! marks the key refused on that node. So a user well under a limit costs
//! one Redis command per `count / 32` requests per node and adds no
//! latency, and a user spread over N nodes gets at most the limit plus, on
//! each node, one step and what that node accepts while one report is on
//! its way (about a millisecond) per window.
//!
//! If the cluster cannot be reached or the report queue is full, the
//! report is kept and sent with the next step: each node's own buckets
//! still hold. Windows are aligned on wall-clock time, the same on every
//! node.

use std::hash::{BuildHasher as _, Hash};
use std::net::IpAddr;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{Limit, Rate, Refused};
use crate::FastMap;
use crate::store::{StoreError, UserId};

/// Requests per report: a limit's count divided by this (at least 1).
const STEP_DIVISOR: u32 = 32;
/// Reports waiting for the reporting thread at most.
const QUEUE: usize = 4_096;
/// Reports sent in one pipeline at most.
const BATCH: usize = 512;
/// Counters outlive their window by this much, for clocks that disagree.
const TTL_MARGIN_MS: u64 = 60_000;

/// One addition to a cluster counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountAdd {
    /// The counter (a limit, a key and a window).
    pub key: String,
    /// How much to add.
    pub n: u32,
    /// Its time to live, set when it is created.
    pub ttl_ms: u64,
}

/// Where the cluster keeps its counts.
pub trait Counters: Send + Sync + 'static {
    /// Adds each of `batch` to its counter and returns the new totals, in
    /// order.
    ///
    /// # Errors
    /// [`StoreError`] when the counters cannot be reached.
    fn add(&self, batch: &[CountAdd]) -> Result<Vec<u64>, StoreError>;
}

/// A key a shared limit counts: its name in the counter's key.
pub trait SharedKey: Hash {
    /// The key as written in the counter's name.
    fn shared_name(&self) -> String;
}

impl SharedKey for UserId {
    fn shared_name(&self) -> String {
        self.to_string()
    }
}

impl SharedKey for (UserId, UserId) {
    fn shared_name(&self) -> String {
        format!("{}:{}", self.0, self.1)
    }
}

impl SharedKey for IpAddr {
    fn shared_name(&self) -> String {
        self.to_string()
    }
}

/// One key's count on this node in the current window.
#[derive(Debug, Clone, Copy)]
struct Entry {
    window: u64,
    /// Requests accepted and not yet reported.
    unreported: u32,
    /// The cluster's total passed the limit in this window.
    refused: bool,
}

type Slot = (Limit, u64);

struct Report {
    slot: Slot,
    window: u64,
    count: u32,
    add: CountAdd,
}

struct Inner {
    entries: Mutex<FastMap<Slot, Entry>>,
    max_keys: usize,
}

impl Inner {
    fn entries(&self) -> MutexGuard<'_, FastMap<Slot, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// This node's view of the cluster-wide counts.
pub struct Shared {
    inner: Arc<Inner>,
    reports: SyncSender<Report>,
    prefix_hash: foldhash::fast::FixedState,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("max_keys", &self.inner.max_keys)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Starts the reporting thread on `counters`, tracking at most
    /// `max_keys` keys (past it, a new key is counted by this node's
    /// buckets only until old windows are dropped). The thread ends when
    /// the `Shared` is dropped.
    ///
    /// # Errors
    /// An I/O error if the thread cannot be spawned.
    pub fn start(counters: Arc<dyn Counters>, max_keys: usize) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            entries: Mutex::new(FastMap::default()),
            max_keys: max_keys.max(1),
        });
        let (reports, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let thread_inner = inner.clone();
        std::thread::Builder::new()
            .name("limit-counts".into())
            .spawn(move || report_loop(&rx, counters.as_ref(), &thread_inner))?;
        Ok(Self {
            inner,
            reports,
            prefix_hash: foldhash::fast::FixedState::with_seed(0x11_3175),
        })
    }

    /// Counts one request of `key` under `limit`, at `now_ms` (wall clock).
    ///
    /// # Errors
    /// [`Refused`] when the cluster's total for the key passed the limit
    /// in this window.
    pub fn check<K: SharedKey>(
        &self,
        limit: Limit,
        rate: Rate,
        key: &K,
        now_ms: u64,
    ) -> Result<(), Refused> {
        let window_ms = u64::try_from(rate.window.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let window = now_ms / window_ms;
        let slot = (limit, self.prefix_hash.hash_one(key));
        let step = (rate.count / STEP_DIVISOR).max(1);
        let n = {
            let mut entries = self.inner.entries();
            if !entries.contains_key(&slot) && entries.len() >= self.inner.max_keys {
                // Past their window, entries count for nothing.
                entries.retain(|_, e| e.window >= window);
                if entries.len() >= self.inner.max_keys {
                    return Ok(());
                }
            }
            let e = entries.entry(slot).or_insert(Entry {
                window,
                unreported: 0,
                refused: false,
            });
            if e.window != window {
                *e = Entry {
                    window,
                    unreported: 0,
                    refused: false,
                };
            }
            if e.refused {
                let retry = (window + 1)
                    .saturating_mul(window_ms)
                    .saturating_sub(now_ms);
                return Err(limit.refuse(retry.max(1)));
            }
            e.unreported += 1;
            if e.unreported < step {
                return Ok(());
            }
            std::mem::take(&mut e.unreported)
        };
        let report = Report {
            slot,
            window,
            count: rate.count,
            add: CountAdd {
                key: format!("{}:{}:{window}", limit.name(), key.shared_name()),
                n,
                ttl_ms: window_ms.saturating_add(TTL_MARGIN_MS),
            },
        };
        if let Err(TrySendError::Full(r) | TrySendError::Disconnected(r)) =
            self.reports.try_send(report)
        {
            // Sent with the key's next step.
            if let Some(e) = self.inner.entries().get_mut(&r.slot)
                && e.window == r.window
            {
                e.unreported += r.add.n;
            }
        }
        Ok(())
    }

    /// Keys tracked now.
    #[must_use]
    pub fn tracked(&self) -> usize {
        self.inner.entries().len()
    }
}

fn report_loop(rx: &Receiver<Report>, counters: &dyn Counters, inner: &Inner) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let adds: Vec<CountAdd> = batch.iter().map(|r| r.add.clone()).collect();
        match counters.add(&adds) {
            Ok(totals) => {
                let mut entries = inner.entries();
                for (r, total) in batch.iter().zip(totals) {
                    if total > u64::from(r.count)
                        && let Some(e) = entries.get_mut(&r.slot)
                        && e.window == r.window
                    {
                        e.refused = true;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot report limit counts to the cluster; each node's own limits still hold");
                // Kept for the keys' next steps.
                let mut entries = inner.entries();
                for r in &batch {
                    if let Some(e) = entries.get_mut(&r.slot)
                        && e.window == r.window
                    {
                        e.unreported += r.add.n;
                    }
                }
            }
        }
        batch.clear();
    }
}

/// Counters in memory, for tests: what two nodes sharing one Redis see.
#[derive(Debug, Default)]
pub struct MemoryCounters(Mutex<FastMap<String, u64>>);

impl MemoryCounters {
    /// The sum of the counters whose names start with `prefix`.
    #[must_use]
    pub fn total_with_prefix(&self, prefix: &str) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| *v)
            .sum()
    }
}

impl Counters for MemoryCounters {
    fn add(&self, batch: &[CountAdd]) -> Result<Vec<u64>, StoreError> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(batch
            .iter()
            .map(|a| {
                let v = map.entry(a.key.clone()).or_insert(0);
                *v += u64::from(a.n);
                *v
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits until `f` holds (reports land on another thread).
    fn eventually(mut f: impl FnMut() -> bool) -> bool {
        for _ in 0..200 {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn two_nodes_share_one_limit() {
        let counters = Arc::new(MemoryCounters::default());
        let a = Shared::start(counters.clone(), 100).unwrap();
        let b = Shared::start(counters.clone(), 100).unwrap();
        let rate = Rate::per_minute(10);
        let now = 60_000 * 1_000;
        for _ in 0..10 {
            a.check(Limit::UserSends, rate, &7u64, now).unwrap();
        }
        // A's reports have landed (they go on A's own thread).
        assert!(eventually(|| {
            counters.0.lock().unwrap().get("sends_per_user:7:1000") == Some(&10)
        }));
        // B has not counted user 7: its first request goes through and
        // reports the 11th; from then on the cluster's total refuses it.
        let mut accepted_on_b = 0;
        let mut refused = None;
        for _ in 0..10 {
            match b.check(Limit::UserSends, rate, &7u64, now + 1) {
                Ok(()) => accepted_on_b += 1,
                Err(r) => {
                    refused = Some(r);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(accepted_on_b, 1);
        let refused = refused.expect("refused once the cluster's total passed the limit");
        assert_eq!(refused.limit, Limit::UserSends);
        assert_eq!(refused.retry_after_ms, 60_000 - 1);
        // A learns it with its next report.
        assert!(eventually(|| {
            a.check(Limit::UserSends, rate, &7u64, now + 2).is_err()
        }));
        // Another user, and the next window, start over.
        b.check(Limit::UserSends, rate, &8u64, now + 3).unwrap();
        b.check(Limit::UserSends, rate, &7u64, now + 60_000)
            .unwrap();
    }

    #[test]
    fn large_limits_report_in_steps() {
        let counters = Arc::new(MemoryCounters::default());
        let a = Shared::start(counters.clone(), 100).unwrap();
        let rate = Rate::per_minute(320);
        for _ in 0..25 {
            a.check(Limit::Lookups, rate, &1u64, 0).unwrap();
        }
        // Steps of 320 / 32 = 10: two reports, 5 requests not yet sent.
        assert!(eventually(|| {
            counters.0.lock().unwrap().get("lookups_per_user:1:0") == Some(&20)
        }));
    }

    #[test]
    fn unreachable_counters_keep_the_count_for_the_next_step() {
        struct Down;
        impl Counters for Down {
            fn add(&self, _: &[CountAdd]) -> Result<Vec<u64>, StoreError> {
                Err(StoreError::Engine("down".into()))
            }
        }
        let a = Shared::start(Arc::new(Down), 100).unwrap();
        let rate = Rate::per_minute(2);
        for _ in 0..5 {
            a.check(Limit::ReadReceipts, rate, &3u64, 0).unwrap();
        }
        assert!(eventually(|| {
            a.inner.entries().values().next().map(|e| e.unreported) == Some(5)
        }));
    }

    #[test]
    fn tracked_keys_are_bounded() {
        let a = Shared::start(Arc::new(MemoryCounters::default()), 3).unwrap();
        let rate = Rate::per_minute(1_000);
        for user in 0..10u64 {
            a.check(Limit::UserSends, rate, &user, 0).unwrap();
        }
        assert_eq!(a.tracked(), 3);
        // A later window frees the old ones.
        a.check(Limit::UserSends, rate, &99u64, 120_000).unwrap();
        assert_eq!(a.tracked(), 1);
    }
}
