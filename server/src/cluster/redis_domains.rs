//! The Redis Cluster domains of cluster mode: [`Queues`], [`Dedup`],
//! [`Mailboxes`] and [`Payloads`].
//!
//! **Layout.** Every key of one user (or group) carries the hash tag
//! `{u:<id>}`, so its queues, queue counters, usage, dedup records, mail
//! and payloads share one hash slot, and one script in that slot
//! (`apply.lua`) writes them all or none: the atomic unit the traits state
//! (one user; the recipient for dedup, together with its queues).
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<p>{u:U}:q:D` | sorted set | device D's queue: score seq, member 16 hex digits of `server_ts_ms` then the encoded entry |
//! | `<p>{u:U}:n:D` | string | the highest reserved seq |
//! | `<p>{u:U}:use` | hash | `e<D>` entries, `b<D>` bytes of each queue |
//! | `<p>{u:T}:d:<user>:<device>:<client id>` | string | a dedup record (T: the recipient user or group) |
//! | `<p>{u:O}:mail` | hash | mail id → mail record |
//! | `<p>{u:O}:p:<seq>` | string | a payload |
//!
//! **Global scans without SCAN.** The sweeps need "every queue with an old
//! entry", "every dedup record older than", "all mail". Each hash slot has
//! its own index keys, tagged with a string that hashes to that slot
//! ([`SlotTags`]), so the script that writes a user's keys keeps the index
//! of the user's slot exact in the same atomic step: `<p>{<tag>}:qix`
//! (sorted set "user:device" → oldest entry's timestamp), `:qn` (entries
//! in the slot), `:dix` (dedup key → accepted time), `:mix` (owners with
//! mail), `:pix` (payload → created time). A scan reads the 16,384 index
//! keys in one pipeline per master.
//!
//! **Durability.** A synced commit returns once every script has run and,
//! with `min_replicas` > 0, `WAIT` has confirmed that many replicas of each
//! master written (Redis's own `appendfsync` covers the master's disk; see
//! docs/OPERATIONS.md). Across slots the scripts run in
//! [`Op::domain_rank`] order, as `Store::commit` allows.
//!
//! The traits are synchronous and called from shard threads; the
//! connection is the `redis` crate's blocking cluster connection behind a
//! mutex.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use redis::cluster::{ClusterClient, ClusterConnection, cluster_pipe};
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{Script, Value};
use switchboard_proto::pb;

use crate::store::{
    Dedup, DedupKey, DedupOp, DedupRecord, DeviceKey, MailOp, MailRecord, Mailboxes, Op, PayloadId,
    PayloadOp, PayloadRecord, Payloads, QueueOp, Queues, StoreError, StoredEntry, UserId,
};

/// Hash slots of a Redis Cluster.
const SLOTS: u16 = 16_384;

/// Commands per pipeline of a scan over every slot's index.
const SCAN_CHUNK: usize = 4096;

/// How long a synced commit waits for its replicas before failing.
const WAIT_TIMEOUT_MS: u64 = 2_000;

fn engine(e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine(format!("Redis: {e}"))
}

fn corrupt(what: &'static str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what,
        detail: detail.to_string(),
    }
}

fn decode<M: Message + Default>(what: &'static str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| corrupt(what, e))
}

/// For each hash slot, a short string that hashes to it: the tag of that
/// slot's index keys.
struct SlotTags {
    by_slot: HashMap<Slot, String>,
    in_order: Vec<String>,
}

impl SlotTags {
    fn get() -> &'static SlotTags {
        static TAGS: OnceLock<SlotTags> = OnceLock::new();
        TAGS.get_or_init(|| {
            let mut by_slot = HashMap::with_capacity(usize::from(SLOTS));
            let mut n = 0u64;
            while by_slot.len() < usize::from(SLOTS) {
                let tag = n.to_string();
                by_slot.entry(Slot::for_key(&tag)).or_insert(tag);
                n += 1;
            }
            let in_order = (0..SLOTS)
                .filter_map(|s| Slot::new(s).and_then(|slot| by_slot.get(&slot).cloned()))
                .collect();
            SlotTags { by_slot, in_order }
        })
    }

    /// The tag of the slot that `key` hashes to.
    fn of(&self, key: &str) -> &str {
        self.by_slot
            .get(&Slot::for_key(key))
            .map_or("", String::as_str)
    }
}

/// Key names, under a prefix (`sb:` in a deployment; tests use one per
/// store so they share a cluster).
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn user(&self, id: u64) -> String {
        format!("{}{{u:{id}}}", self.prefix)
    }
    fn queue(&self, d: DeviceKey) -> String {
        format!("{}:q:{}", self.user(d.user), d.device)
    }
    fn counter(&self, d: DeviceKey) -> String {
        format!("{}:n:{}", self.user(d.user), d.device)
    }
    fn usage(&self, user: UserId) -> String {
        format!("{}:use", self.user(user))
    }
    fn dedup(&self, k: &DedupKey) -> String {
        format!(
            "{}:d:{}:{}:{}",
            self.user(k.to.id()),
            k.from.user,
            k.from.device,
            k.client_msg_id
        )
    }
    fn mail(&self, owner: UserId) -> String {
        format!("{}:mail", self.user(owner))
    }
    fn payload(&self, id: PayloadId) -> String {
        format!("{}:p:{}", self.user(id.owner), id.seq)
    }
    /// An index key (`qix`, `qn`, `dix`, `mix`, `pix`) of the slot of
    /// `owner`'s keys.
    fn index(&self, owner: u64, which: &str) -> String {
        let tag = SlotTags::get().of(&format!("{{u:{owner}}}"));
        self.index_of_tag(tag, which)
    }
    fn index_of_tag(&self, tag: &str, which: &str) -> String {
        format!("{}{{{tag}}}:{which}", self.prefix)
    }
}

/// One slot's share of a batch: the script's keys and arguments.
#[derive(Default)]
struct Unit {
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
    /// Net queue entries this unit adds, for the approximate count.
    entries: i64,
}

impl Unit {
    fn key(&mut self, k: String) -> &mut Self {
        self.keys.push(k);
        self
    }
    fn arg(&mut self, a: impl Into<Vec<u8>>) -> &mut Self {
        self.args.push(a.into());
        self
    }
}

/// Queues, dedup, mail and payloads in a Redis Cluster.
pub struct RedisDomains {
    conn: Mutex<ClusterConnection>,
    keys: Keys,
    script: Script,
    min_replicas: u32,
    /// Entries stored, as counted at open plus this process's writes.
    entries: AtomicI64,
}

impl std::fmt::Debug for RedisDomains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDomains")
            .field("prefix", &self.keys.prefix)
            .field("min_replicas", &self.min_replicas)
            .finish_non_exhaustive()
    }
}

impl RedisDomains {
    /// Connects to the cluster whose seed nodes are `urls`
    /// (comma-separated `redis://host:port`), keeping every key under
    /// `prefix`. A synced commit waits for `min_replicas` replicas.
    ///
    /// # Errors
    /// [`StoreError::Engine`] when no seed node answers as a cluster.
    pub fn open(urls: &str, prefix: &str, min_replicas: u32) -> Result<Self, StoreError> {
        let seeds: Vec<&str> = urls
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let client = ClusterClient::builder(seeds)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            .retries(3)
            .build()
            .map_err(engine)?;
        let conn = client.get_connection().map_err(engine)?;
        let store = Self {
            conn: Mutex::new(conn),
            keys: Keys {
                prefix: prefix.to_owned(),
            },
            script: Script::new(include_str!("apply.lua")),
            min_replicas,
            entries: AtomicI64::new(0),
        };
        let counts = store.scan_slots(|tag| {
            let mut c = redis::cmd("GET");
            c.arg(store.keys.index_of_tag(tag, "qn"));
            c
        })?;
        let total: i64 = counts
            .iter()
            .filter_map(|v| redis::from_redis_value_ref::<Option<i64>>(v).ok().flatten())
            .sum();
        store.entries.store(total, Ordering::Relaxed);
        Ok(store)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, ClusterConnection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        cmd.query(&mut *self.conn()).map_err(engine)
    }

    /// Runs `cmd_for(tag)` for every slot's tag, in slot order, pipelined.
    fn scan_slots(&self, cmd_for: impl Fn(&str) -> redis::Cmd) -> Result<Vec<Value>, StoreError> {
        let tags = &SlotTags::get().in_order;
        let mut out = Vec::with_capacity(tags.len());
        let mut conn = self.conn();
        for chunk in tags.chunks(SCAN_CHUNK) {
            let mut pipe = cluster_pipe();
            for tag in chunk {
                pipe.add_command(cmd_for(tag));
            }
            let values: Vec<Value> = pipe.query(&mut conn).map_err(engine)?;
            out.extend(values);
        }
        Ok(out)
    }

    /// Every member of every slot's `which` sorted-set index with a score
    /// below `before`, at most `limit` in all: `(member, score)`.
    fn index_below(
        &self,
        which: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<(String, f64)>, StoreError> {
        let values = self.scan_slots(|tag| {
            let mut c = redis::cmd("ZRANGE");
            c.arg(self.keys.index_of_tag(tag, which))
                .arg("-inf")
                .arg(format!("({before}"))
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                .arg(i64::try_from(limit).unwrap_or(-1))
                .arg("WITHSCORES");
            c
        })?;
        let mut out = Vec::new();
        for v in values {
            let pairs: Vec<(String, f64)> = redis::from_redis_value(v).map_err(engine)?;
            out.extend(pairs);
            if out.len() >= limit {
                out.truncate(limit);
                break;
            }
        }
        Ok(out)
    }

    /// Adds `op`'s share to the unit of its slot (creating it), returning
    /// whether it was one of these domains' ops.
    fn stage(&self, op: &Op, units: &mut Vec<(u8, Slot, Unit)>) -> Result<bool, StoreError> {
        let k = &self.keys;
        let owner = match op {
            Op::Queue(
                QueueOp::Enqueue { device, .. }
                | QueueOp::ReserveSeqs { device, .. }
                | QueueOp::Dequeue { device, .. }
                | QueueOp::DropQueue(device),
            ) => device.user,
            Op::Dedup(DedupOp::Put { key, .. }) => key.to.id(),
            Op::Mail(MailOp::Put { owner, .. } | MailOp::Delete { owner, .. }) => *owner,
            Op::Payload(PayloadOp::Put { id, .. } | PayloadOp::Delete(id)) => id.owner,
            _ => return Ok(false),
        };
        let rank = op.domain_rank();
        let slot = Slot::for_key(format!("{{u:{owner}}}"));
        let pos = match units.iter().position(|(r, s, _)| *r == rank && *s == slot) {
            Some(pos) => pos,
            None => {
                units.push((rank, slot, Unit::default()));
                units.len() - 1
            }
        };
        let Some((_, _, unit)) = units.get_mut(pos) else {
            return Ok(true);
        };
        let member = |d: &DeviceKey| format!("{}:{}", d.user, d.device);
        match op {
            Op::Queue(QueueOp::Enqueue { device, entry }) => {
                let decoded: pb::QueueEntry = decode("queue entry", &entry.bytes)?;
                let mut stored = format!("{:016x}", decoded.server_ts_ms).into_bytes();
                stored.extend_from_slice(&entry.bytes);
                unit.key(k.queue(*device))
                    .key(k.usage(device.user))
                    .key(k.index(owner, "qix"))
                    .key(k.index(owner, "qn"))
                    .arg("enq")
                    .arg(device.device.to_string())
                    .arg(member(device))
                    .arg(entry.seq.to_string())
                    .arg(stored);
                unit.entries += 1;
            }
            Op::Queue(QueueOp::Dequeue { device, seq }) => {
                unit.key(k.queue(*device))
                    .key(k.usage(device.user))
                    .key(k.index(owner, "qix"))
                    .key(k.index(owner, "qn"))
                    .arg("deq")
                    .arg(device.device.to_string())
                    .arg(member(device))
                    .arg(seq.to_string());
                unit.entries -= 1;
            }
            Op::Queue(QueueOp::DropQueue(device)) => {
                unit.key(k.queue(*device))
                    .key(k.counter(*device))
                    .key(k.usage(device.user))
                    .key(k.index(owner, "qix"))
                    .key(k.index(owner, "qn"))
                    .arg("drop")
                    .arg(device.device.to_string())
                    .arg(member(device));
            }
            Op::Queue(QueueOp::ReserveSeqs { device, upto }) => {
                unit.key(k.counter(*device))
                    .arg("res")
                    .arg(upto.to_string());
            }
            Op::Dedup(DedupOp::Put { key, record }) => {
                unit.key(k.dedup(key))
                    .key(k.index(owner, "dix"))
                    .arg("dput")
                    .arg(record.encode_to_vec())
                    .arg(record.accepted_ms.to_string());
            }
            Op::Mail(MailOp::Put { owner, id, record }) => {
                unit.key(k.mail(*owner))
                    .key(k.index(*owner, "mix"))
                    .arg("mput")
                    .arg(id.to_string())
                    .arg(record.encode_to_vec())
                    .arg(owner.to_string());
            }
            Op::Mail(MailOp::Delete { owner, id }) => {
                unit.key(k.mail(*owner))
                    .key(k.index(*owner, "mix"))
                    .arg("mdel")
                    .arg(id.to_string())
                    .arg(owner.to_string());
            }
            Op::Payload(PayloadOp::Put { id, record }) => {
                unit.key(k.payload(*id))
                    .key(k.index(owner, "pix"))
                    .arg("pput")
                    .arg(record.encode_to_vec())
                    .arg(record.created_ms.to_string())
                    .arg(format!("{}:{}", id.owner, id.seq));
            }
            Op::Payload(PayloadOp::Delete(id)) => {
                unit.key(k.payload(*id))
                    .key(k.index(owner, "pix"))
                    .arg("pdel")
                    .arg(format!("{}:{}", id.owner, id.seq));
            }
            _ => {}
        }
        Ok(true)
    }

    /// Applies these domains' ops of a batch: one script per hash slot and
    /// domain rank, lower ranks first; with `sync`, then `WAIT`s for the
    /// replicas of every master written.
    ///
    /// # Errors
    /// [`StoreError::Engine`] if a script or a `WAIT` fails; the scripts
    /// before it stay applied (a prefix, as `Store::commit` allows).
    pub fn apply(&self, ops: &[Op], sync: bool) -> Result<(), StoreError> {
        let mut units: Vec<(u8, Slot, Unit)> = Vec::new();
        for op in ops {
            self.stage(op, &mut units)?;
        }
        units.sort_by_key(|(rank, _, _)| *rank);
        let mut conn = self.conn();
        for (_, _, unit) in &units {
            let mut invocation = self.script.prepare_invoke();
            for key in &unit.keys {
                invocation.key(key);
            }
            for arg in &unit.args {
                invocation.arg(arg.as_slice());
            }
            invocation.invoke::<i64>(&mut *conn).map_err(engine)?;
            self.entries.fetch_add(unit.entries, Ordering::Relaxed);
        }
        if sync && self.min_replicas > 0 {
            let mut waited: Vec<Slot> = Vec::new();
            for (_, slot, _) in &units {
                if waited.contains(slot) {
                    continue;
                }
                waited.push(*slot);
                let mut wait = redis::cmd("WAIT");
                wait.arg(self.min_replicas).arg(WAIT_TIMEOUT_MS);
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_slot(*slot, SlotAddr::Master),
                ));
                let value = conn.route_command(&wait, route).map_err(engine)?;
                let acked: i64 = redis::from_redis_value(value).map_err(engine)?;
                if acked < i64::from(self.min_replicas) {
                    return Err(engine(format!(
                        "WAIT: {acked} of {} replicas acknowledged within {WAIT_TIMEOUT_MS} ms",
                        self.min_replicas
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Splits an index member `"<a>:<b>"` into its two numbers.
fn pair(member: &str) -> Result<(u64, u64), StoreError> {
    member
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| corrupt("slot index", member))
}

impl Queues for RedisDomains {
    fn reserved_seq(&self, device: DeviceKey) -> Result<u64, StoreError> {
        let mut c = redis::cmd("GET");
        c.arg(self.keys.counter(device));
        Ok(self.query::<Option<u64>>(&c)?.unwrap_or(0))
    }

    fn read_queue(
        &self,
        device: DeviceKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut c = redis::cmd("ZRANGE");
        c.arg(self.keys.queue(device))
            .arg(format!("({after}"))
            .arg("+inf")
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .arg("WITHSCORES");
        let rows: Vec<(Vec<u8>, f64)> = self.query(&c)?;
        rows.into_iter()
            .map(|(member, score)| {
                let bytes = member
                    .get(16..)
                    .ok_or_else(|| corrupt("queue entry", "shorter than its timestamp"))?;
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let seq = score as u64;
                Ok(StoredEntry {
                    seq,
                    bytes: Bytes::copy_from_slice(bytes),
                })
            })
            .collect()
    }

    fn queue_usage(&self, device: DeviceKey) -> Result<(u64, u64), StoreError> {
        let mut c = redis::cmd("HMGET");
        c.arg(self.keys.usage(device.user))
            .arg(format!("e{}", device.device))
            .arg(format!("b{}", device.device));
        let (entries, bytes): (Option<u64>, Option<u64>) = self.query(&c)?;
        Ok((entries.unwrap_or(0), bytes.unwrap_or(0)))
    }

    fn expired_entries(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<(DeviceKey, u64)>, StoreError> {
        let mut out = Vec::new();
        for (member, _) in self.index_below("qix", before_ms, limit)? {
            let (user, device) = pair(&member)?;
            let device = DeviceKey {
                user,
                device: u32::try_from(device).map_err(|e| corrupt("slot index", e))?,
            };
            let mut after = 0;
            'queue: loop {
                let page = self.read_queue(device, after, 256)?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                for entry in &page {
                    let decoded: pb::QueueEntry = decode("queue entry", &entry.bytes)?;
                    if decoded.server_ts_ms >= before_ms {
                        break 'queue;
                    }
                    out.push((device, entry.seq));
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    fn oldest_entries(
        &self,
        buckets: usize,
        bucket_of: &dyn Fn(UserId) -> usize,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        let mut oldest: Vec<Option<u64>> = vec![None; buckets];
        for (member, score) in self.index_below("qix", u64::MAX, usize::MAX)? {
            let (user, _) = pair(&member)?;
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let ts = score as u64;
            if let Some(slot) = oldest.get_mut(bucket_of(user)) {
                *slot = Some(slot.map_or(ts, |t| t.min(ts)));
            }
        }
        Ok(oldest)
    }

    fn approximate_queue_entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed).max(0).cast_unsigned()
    }
}

impl Dedup for RedisDomains {
    fn dedup(&self, key: &DedupKey) -> Result<Option<DedupRecord>, StoreError> {
        let mut c = redis::cmd("GET");
        c.arg(self.keys.dedup(key));
        self.query::<Option<Vec<u8>>>(&c)?
            .map(|b| decode("dedup record", &b))
            .transpose()
    }

    fn expire_dedup(&self, before_ms: u64) -> Result<usize, StoreError> {
        let old = self.index_below("dix", before_ms, usize::MAX)?;
        let mut conn = self.conn();
        for (name, _) in &old {
            let index = self.keys.index_of_tag(SlotTags::get().of(name), "dix");
            self.script
                .key(name)
                .key(index)
                .arg("dexp")
                .arg(before_ms)
                .invoke::<i64>(&mut *conn)
                .map_err(engine)?;
        }
        Ok(old.len())
    }
}

impl Mailboxes for RedisDomains {
    fn mail(&self) -> Result<Vec<(UserId, u64, MailRecord)>, StoreError> {
        let owners = self.scan_slots(|tag| {
            let mut c = redis::cmd("SMEMBERS");
            c.arg(self.keys.index_of_tag(tag, "mix"));
            c
        })?;
        let mut out = Vec::new();
        for v in owners {
            let owners: Vec<u64> = redis::from_redis_value(v).map_err(engine)?;
            for owner in owners {
                let mut c = redis::cmd("HGETALL");
                c.arg(self.keys.mail(owner));
                let all: Vec<(u64, Vec<u8>)> = self.query(&c)?;
                for (id, record) in all {
                    out.push((owner, id, decode("mail record", &record)?));
                }
            }
        }
        Ok(out)
    }
}

impl Payloads for RedisDomains {
    fn payload(&self, id: PayloadId) -> Result<Option<PayloadRecord>, StoreError> {
        let mut c = redis::cmd("GET");
        c.arg(self.keys.payload(id));
        self.query::<Option<Vec<u8>>>(&c)?
            .map(|b| decode("payload", &b))
            .transpose()
    }

    fn expired_payloads(&self, before_ms: u64, limit: usize) -> Result<Vec<PayloadId>, StoreError> {
        self.index_below("pix", before_ms, limit)?
            .into_iter()
            .map(|(member, _)| {
                let (owner, seq) = pair(&member)?;
                Ok(PayloadId { owner, seq })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it() {
        let tags = SlotTags::get();
        assert_eq!(tags.in_order.len(), usize::from(SLOTS));
        for (i, tag) in tags.in_order.iter().enumerate() {
            let slot = Slot::new(u16::try_from(i).unwrap_or(0));
            assert_eq!(Some(Slot::for_key(tag)), slot);
        }
        // A user's keys and its slot's index keys share the slot.
        let keys = Keys {
            prefix: "sb:".into(),
        };
        let user = 0x0a11_ce00_0000_0001;
        assert_eq!(
            Slot::for_key(keys.queue(DeviceKey { user, device: 3 })),
            Slot::for_key(keys.index(user, "qix"))
        );
    }
}
