//! A store wrapper that injects faults, for tests and chaos drills: failed
//! writes (as from a full or broken disk), slow commits (as from a stalled
//! disk) and panics (as from a bug).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;

use super::{
    Accounts, CodeRecord, Dedup, DedupKey, DedupRecord, DeviceKey, DeviceKeysRecord, GroupId,
    GroupRecord, Groups, Keys, LinkCodeRecord, MailRecord, Mailboxes, Op, PayloadId, PayloadRecord,
    Payloads, QueueOp, Queues, Store, StoreError, StoredEntry, UserId, UserRecord,
};

/// Wraps a store; faults are switched on and off at run time.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    fail_writes: AtomicBool,
    panic_next_commit: AtomicBool,
    failed_commits: AtomicU64,
    commit_delay_us: AtomicU64,
    synced_commits: AtomicU64,
    seq_reservations: AtomicU64,
}

impl FaultyStore {
    /// Wraps `inner` with every fault off.
    #[must_use]
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            fail_writes: AtomicBool::new(false),
            panic_next_commit: AtomicBool::new(false),
            failed_commits: AtomicU64::new(0),
            commit_delay_us: AtomicU64::new(0),
            synced_commits: AtomicU64::new(0),
            seq_reservations: AtomicU64::new(0),
        }
    }

    /// While on, every commit fails as if the disk were full.
    pub fn set_fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
    }

    /// Every commit with writes first waits this long, as on a stalled or
    /// saturated disk; zero switches it off. The shard that commits blocks
    /// meanwhile, exactly as it would on a slow `fsync`.
    pub fn set_commit_delay(&self, delay: std::time::Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.commit_delay_us.store(us, Ordering::SeqCst);
    }

    /// The next commit that stores a queue entry (a message or receipt)
    /// panics, once. Other commits (sweeps, sessions) pass, so a background
    /// write cannot take the injected panic meant for a send.
    pub fn panic_on_next_enqueue(&self) {
        self.panic_next_commit.store(true, Ordering::SeqCst);
    }

    /// Commits refused so far.
    #[must_use]
    pub fn failed_commits(&self) -> u64 {
        self.failed_commits.load(Ordering::SeqCst)
    }

    /// Successful commits with writes that were synced to disk (each one
    /// fsync), to observe group commit.
    pub fn synced_commits(&self) -> u64 {
        self.synced_commits.load(Ordering::SeqCst)
    }

    /// Queue seq reservations ([`QueueOp::ReserveSeqs`]) committed so far.
    pub fn seq_reservations(&self) -> u64 {
        self.seq_reservations.load(Ordering::SeqCst)
    }
}

impl Accounts for FaultyStore {
    fn user(&self, user: UserId) -> Result<Option<UserRecord>, StoreError> {
        self.inner.user(user)
    }
    fn phone(&self, phone: &str) -> Result<Option<UserId>, StoreError> {
        self.inner.phone(phone)
    }
    fn code(&self, phone: &str) -> Result<Option<CodeRecord>, StoreError> {
        self.inner.code(phone)
    }
    fn link_code(&self, code: &str) -> Result<Option<LinkCodeRecord>, StoreError> {
        self.inner.link_code(code)
    }
    fn expired_link_codes(&self, before_ms: u64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.inner.expired_link_codes(before_ms, limit)
    }
}

impl Keys for FaultyStore {
    fn device_keys(&self, device: DeviceKey) -> Result<Option<DeviceKeysRecord>, StoreError> {
        self.inner.device_keys(device)
    }
    fn first_one_time_key(
        &self,
        device: DeviceKey,
        from: u64,
    ) -> Result<Option<(u64, Bytes)>, StoreError> {
        self.inner.first_one_time_key(device, from)
    }
}

impl Queues for FaultyStore {
    fn reserved_seq(&self, device: DeviceKey) -> Result<u64, StoreError> {
        self.inner.reserved_seq(device)
    }
    fn read_queue(
        &self,
        device: DeviceKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        self.inner.read_queue(device, after, limit)
    }
    fn queue_usage(&self, device: DeviceKey) -> Result<(u64, u64), StoreError> {
        self.inner.queue_usage(device)
    }
    fn expired_entries(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<(DeviceKey, u64)>, StoreError> {
        self.inner.expired_entries(before_ms, limit)
    }
    fn oldest_entries(
        &self,
        buckets: usize,
        bucket_of: &dyn Fn(UserId) -> usize,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        self.inner.oldest_entries(buckets, bucket_of)
    }
    fn approximate_queue_entries(&self) -> u64 {
        self.inner.approximate_queue_entries()
    }
}

impl Dedup for FaultyStore {
    fn dedup(&self, key: &DedupKey) -> Result<Option<DedupRecord>, StoreError> {
        self.inner.dedup(key)
    }
    fn expire_dedup(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.inner.expire_dedup(before_ms)
    }
}

impl Mailboxes for FaultyStore {
    fn mail(&self) -> Result<Vec<(UserId, u64, MailRecord)>, StoreError> {
        self.inner.mail()
    }
}

impl Payloads for FaultyStore {
    fn payload(&self, id: PayloadId) -> Result<Option<PayloadRecord>, StoreError> {
        self.inner.payload(id)
    }
    fn expired_payloads(&self, before_ms: u64, limit: usize) -> Result<Vec<PayloadId>, StoreError> {
        self.inner.expired_payloads(before_ms, limit)
    }
}

impl Groups for FaultyStore {
    fn group(&self, group: GroupId) -> Result<Option<GroupRecord>, StoreError> {
        self.inner.group(group)
    }
    fn group_reserved_seq(&self, group: GroupId) -> Result<u64, StoreError> {
        self.inner.group_reserved_seq(group)
    }
    fn user_groups(&self, user: UserId) -> Result<Vec<GroupId>, StoreError> {
        self.inner.user_groups(user)
    }
}

impl Store for FaultyStore {
    fn commit(&self, ops: Vec<Op>, sync: bool) -> Result<(), StoreError> {
        if ops
            .iter()
            .any(|op| matches!(op, Op::Queue(QueueOp::Enqueue { .. })))
            && self.panic_next_commit.swap(false, Ordering::SeqCst)
        {
            panic!("injected panic in commit");
        }
        let delay_us = self.commit_delay_us.load(Ordering::SeqCst);
        if delay_us > 0 && !ops.is_empty() {
            std::thread::sleep(std::time::Duration::from_micros(delay_us));
        }
        if self.fail_writes.load(Ordering::SeqCst) && !ops.is_empty() {
            self.failed_commits.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Engine(
                "injected fault: No space left on device (os error 28)".into(),
            ));
        }
        let reservations = ops
            .iter()
            .filter(|op| matches!(op, Op::Queue(QueueOp::ReserveSeqs { .. })))
            .count() as u64;
        let synced = sync && !ops.is_empty();
        self.inner.commit(ops, sync)?;
        if synced {
            self.synced_commits.fetch_add(1, Ordering::SeqCst);
        }
        self.seq_reservations
            .fetch_add(reservations, Ordering::SeqCst);
        Ok(())
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
}
