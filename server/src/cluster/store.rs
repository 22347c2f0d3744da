//! The cluster store: a whole [`Store`] made of the PostgreSQL domains
//! ([`PgDomains`]: accounts, keys, groups) and the Redis Cluster domains
//! ([`RedisDomains`]: queues, dedup, mail, payloads).
//!
//! A batch is split by domain and written in [`Op::domain_rank`] order, as
//! `Store::commit` allows: the groups' counters first (one PostgreSQL
//! transaction), then the Redis part (one script per hash slot, payloads,
//! mail, then queues and dedup), then the accounts, keys and groups (one
//! transaction). A crash between them leaves a prefix, which the router's
//! batches are built to survive.

use super::postgres::{PgDomains, PgOp};
use super::redis_domains::RedisDomains;
use crate::store::{
    Accounts, CodeRecord, Dedup, DedupKey, DedupRecord, DeviceKey, DeviceKeysRecord, GroupId,
    GroupOp, GroupRecord, Groups, Keys, LinkCodeRecord, MailRecord, Mailboxes, Op, PayloadId,
    PayloadRecord, Payloads, Queues, Store, StoreError, StoredEntry, UserId, UserRecord,
};

/// PostgreSQL and Redis Cluster, as one [`Store`].
#[derive(Debug)]
pub struct ClusterStore {
    pg: PgDomains,
    rest: RedisDomains,
}

impl ClusterStore {
    /// Joins the two.
    #[must_use]
    pub fn new(pg: PgDomains, redis: RedisDomains) -> Self {
        Self { pg, rest: redis }
    }
}

impl Accounts for ClusterStore {
    fn user(&self, user: UserId) -> Result<Option<UserRecord>, StoreError> {
        self.pg.user(user)
    }
    fn users(&self, users: &[UserId]) -> Result<Vec<(UserId, UserRecord)>, StoreError> {
        self.pg.users(users)
    }
    fn phone(&self, phone: &str) -> Result<Option<UserId>, StoreError> {
        self.pg.phone(phone)
    }
    fn code(&self, phone: &str) -> Result<Option<CodeRecord>, StoreError> {
        self.pg.code(phone)
    }
    fn link_code(&self, code: &str) -> Result<Option<LinkCodeRecord>, StoreError> {
        self.pg.link_code(code)
    }
    fn expired_link_codes(&self, before_ms: u64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.pg.expired_link_codes(before_ms, limit)
    }
}

impl Keys for ClusterStore {
    fn device_keys(&self, device: DeviceKey) -> Result<Option<DeviceKeysRecord>, StoreError> {
        self.pg.device_keys(device)
    }
    fn many_device_keys(
        &self,
        devices: &[DeviceKey],
    ) -> Result<Vec<(DeviceKey, DeviceKeysRecord)>, StoreError> {
        self.pg.many_device_keys(devices)
    }
    fn first_one_time_key(
        &self,
        device: DeviceKey,
        from: u64,
    ) -> Result<Option<(u64, bytes::Bytes)>, StoreError> {
        self.pg.first_one_time_key(device, from)
    }
}

impl Groups for ClusterStore {
    fn group(&self, group: GroupId) -> Result<Option<GroupRecord>, StoreError> {
        self.pg.group(group)
    }
    fn group_reserved_seq(&self, group: GroupId) -> Result<u64, StoreError> {
        self.pg.group_reserved_seq(group)
    }
    fn user_groups(&self, user: UserId) -> Result<Vec<GroupId>, StoreError> {
        self.pg.user_groups(user)
    }
}

impl Queues for ClusterStore {
    fn reserved_seq(&self, device: DeviceKey) -> Result<u64, StoreError> {
        self.rest.reserved_seq(device)
    }
    fn read_queue(
        &self,
        device: DeviceKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        self.rest.read_queue(device, after, limit)
    }
    fn queue_usage(&self, device: DeviceKey) -> Result<(u64, u64), StoreError> {
        self.rest.queue_usage(device)
    }
    fn expired_entries(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<(DeviceKey, u64)>, StoreError> {
        self.rest.expired_entries(before_ms, limit)
    }
    fn oldest_entries(
        &self,
        buckets: usize,
        bucket_of: &dyn Fn(UserId) -> usize,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        self.rest.oldest_entries(buckets, bucket_of)
    }
    fn approximate_queue_entries(&self) -> u64 {
        self.rest.approximate_queue_entries()
    }
}

impl Dedup for ClusterStore {
    fn dedup(&self, key: &DedupKey) -> Result<Option<DedupRecord>, StoreError> {
        self.rest.dedup(key)
    }
    fn expire_dedup(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.rest.expire_dedup(before_ms)
    }
}

impl Mailboxes for ClusterStore {
    fn mail(&self) -> Result<Vec<(UserId, u64, MailRecord)>, StoreError> {
        self.rest.mail()
    }
}

impl Payloads for ClusterStore {
    fn payload(&self, id: PayloadId) -> Result<Option<PayloadRecord>, StoreError> {
        self.rest.payload(id)
    }
    fn expired_payloads(&self, before_ms: u64, limit: usize) -> Result<Vec<PayloadId>, StoreError> {
        self.rest.expired_payloads(before_ms, limit)
    }
}

impl Store for ClusterStore {
    fn commit(&self, ops: Vec<Op>, sync: bool) -> Result<(), StoreError> {
        let mut counters = Vec::new();
        let mut rest = Vec::new();
        let mut pg = Vec::new();
        for op in ops {
            match op {
                Op::Group(g @ GroupOp::ReserveSeqs { .. }) => counters.push(PgOp::Group(g)),
                Op::Account(a) => pg.push(PgOp::Account(a)),
                Op::Key(k) => pg.push(PgOp::Key(k)),
                Op::Group(g) => pg.push(PgOp::Group(g)),
                other => rest.push(other),
            }
        }
        self.pg.apply(&counters)?;
        self.rest.apply(&rest, sync)?;
        self.pg.apply(&pg)?;
        metrics::counter!(crate::telemetry::CLUSTER_COMMITS).increment(1);
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        // Every commit is in both engines when it returns.
        Ok(())
    }
}
