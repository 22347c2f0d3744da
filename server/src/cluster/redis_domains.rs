//! The Redis Cluster domains of cluster mode: [`Queues`], [`Dedup`],
//! [`Mailboxes`] and [`Payloads`].
//!
//! **Layout.** Every key carries the hash tag of its owner's partition
//! (`{p:<n>}`, [`super::partition`]): a user's (or group's) queues, queue
//! counters, usage, dedup records, mail and payloads, its partition's
//! indexes and the partition's owner key share one hash slot, and one
//! script in that slot (`apply.lua`) checks the owner and writes them all
//! or none: the atomic unit the traits state (one user; the recipient for
//! dedup, together with its queues), here a whole partition.
//!
//! | key (`P` = `<prefix>{p:<n>}`) | type | holds |
//! |---|---|---|
//! | `P:owner` | string | the owning node's token (fencing) |
//! | `P:q:U:D` | sorted set | device D of user U's queue: score seq, member 16 hex digits of `server_ts_ms` then the encoded entry |
//! | `P:n:U:D` | string | the highest reserved seq |
//! | `P:use:U` | hash | `b<D>`: the bytes of device D's queue (its entries are the queue's `ZCARD`) |
//! | `P:d:T:U:D:<client id>` | string | a dedup record (T: the recipient user or group) |
//! | `P:mail:O` | hash | mail id → mail record |
//! | `P:p:O:<seq>` | string | a payload |
//! | `P:qix` | sorted set | "U:D" → the timestamp of that queue's oldest entry |
//! | `P:qn` | string | entries in the partition's queues |
//! | `P:dix`, `P:pix` | sorted sets | dedup key → accepted time; "O:seq" → payload created time |
//! | `P:mix` | set | owners with mail |
//!
//! **Global scans without SCAN.** The sweeps ("every queue with an old
//! entry", "every dedup record older than", "all mail") read the indexes
//! of the partitions this node owns, one pipeline per master; the scripts
//! keep the indexes exact in the same atomic step as the writes.
//!
//! **One commit.** A batch's ops are grouped by partition and by
//! [`Op::domain_rank`]; each rank is one pipeline of scripts (one round
//! trip per master written), lower ranks first, as `Store::commit`
//! allows. With `sync` and `min_replicas` > 0, a `WAIT` to the master of
//! each slot written then confirms that many replicas hold the writes; Redis's own `appendfsync` covers the master's disk
//! (docs/OPERATIONS.md, "Cluster mode").
//!
//! The traits are synchronous and called from shard threads; each call
//! takes one of a few of the `redis` crate's blocking cluster connections
//! (one per shard and one more for sweeps, [`Conn`]).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use redis::Value;
use redis::cluster::{ClusterClient, ClusterConnection, cluster_pipe};
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use switchboard_proto::pb;

use super::partition::{self, Ownership, PARTITIONS};
use crate::store::{
    Dedup, DedupKey, DedupOp, DedupRecord, DeviceKey, MailOp, MailRecord, Mailboxes, Op, PayloadId,
    PayloadOp, PayloadRecord, Payloads, QueueOp, Queues, StoreError, StoredEntry, UserId,
};
use crate::telemetry as tm;

/// The script of one partition's writes.
const APPLY: &str = include_str!("apply.lua");

/// [`APPLY`]'s SHA-1, for `EVALSHA`: a commit sends 40 bytes instead of
/// the 4 KB body, which Redis would otherwise hash on every call (measured
/// on a lone redis-server: 83k EVAL/s against 281k EVALSHA/s).
static APPLY_SHA: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| redis::Script::new(APPLY).get_hash().to_owned());

/// `apply.lua` with its arguments to come: by hash, or with its body (which
/// also caches it on that master).
fn apply_cmd(body: bool) -> redis::Cmd {
    if body {
        let mut c = redis::cmd("EVAL");
        c.arg(APPLY);
        c
    } else {
        let mut c = redis::cmd("EVALSHA");
        c.arg(APPLY_SHA.as_str());
        c
    }
}

fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
        || e.to_string().contains("NOSCRIPT")
}

/// Commands per pipeline of a scan over every partition's index.
const SCAN_CHUNK: usize = 4096;

/// Expired dedup records removed per pipeline.
const EXPIRE_CHUNK: usize = 512;

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

/// Key names, under a prefix (`sb:` in a deployment; tests use one per
/// store so they share a cluster).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }
    /// The prefix and hash tag of partition `p`'s keys.
    fn tag(&self, p: u32) -> String {
        format!("{}{{p:{p}}}", self.prefix)
    }
    fn of(&self, id: u64) -> String {
        self.tag(partition::of_id(id))
    }
    /// Partition `p`'s owner key.
    pub(crate) fn owner(&self, p: u32) -> String {
        format!("{}:owner", self.tag(p))
    }
    /// A limit counter (`name`: limit, key and window).
    pub(crate) fn limit(&self, name: &str) -> String {
        format!("{}lim:{name}", self.prefix)
    }
    /// The liveness key of the node holding `token`.
    pub(crate) fn alive(&self, token: &str) -> String {
        format!("{}alive:{token}", self.prefix)
    }
    fn queue(&self, d: DeviceKey) -> String {
        format!("{}:q:{}:{}", self.of(d.user), d.user, d.device)
    }
    fn counter(&self, d: DeviceKey) -> String {
        format!("{}:n:{}:{}", self.of(d.user), d.user, d.device)
    }
    fn usage(&self, user: UserId) -> String {
        format!("{}:use:{user}", self.of(user))
    }
    fn dedup(&self, k: &DedupKey) -> String {
        let to = k.to.id();
        format!(
            "{}:d:{to}:{}:{}:{}",
            self.of(to),
            k.from.user,
            k.from.device,
            k.client_msg_id
        )
    }
    fn mail(&self, owner: UserId) -> String {
        format!("{}:mail:{owner}", self.of(owner))
    }
    fn payload(&self, id: PayloadId) -> String {
        format!("{}:p:{}:{}", self.of(id.owner), id.owner, id.seq)
    }
    /// An index key (`qix`, `qn`, `dix`, `mix`, `pix`) of partition `p`.
    fn index(&self, p: u32, which: &str) -> String {
        format!("{}:{which}", self.tag(p))
    }
}

/// One partition's share of a batch (of one rank): the script's keys and
/// arguments after the owner check.
struct Unit {
    rank: u8,
    partition: u32,
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
    conn: Conn,
    keys: Keys,
    ownership: Arc<Ownership>,
    min_replicas: u32,
    /// Which master serves each slot, for one `WAIT` per master.
    masters: Mutex<Masters>,
    /// Entries stored, as counted at open plus this process's writes.
    entries: AtomicI64,
    /// See [`RedisDomains::script_loads`].
    script_loads: AtomicU64,
}

impl std::fmt::Debug for RedisDomains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDomains")
            .field("prefix", &self.keys.prefix)
            .field("min_replicas", &self.min_replicas)
            .finish_non_exhaustive()
    }
}

/// A few blocking cluster connections, each replaced after a connection
/// error: the `redis` crate's connection to a node that died stays broken
/// (every call answers "broken pipe") even after its replica took over.
///
/// A call takes a free connection (or waits for one), so the shard threads
/// of a node commit side by side instead of in turn, and a long sweep does
/// not hold up the others. A commit keeps its connection from its first
/// write to its `WAIT`, which confirms the writes made on that connection.
pub struct Conn {
    client: ClusterClient,
    pool: Box<[Mutex<ClusterConnection>]>,
    /// Per connection: a call found it broken.
    broken: Box<[AtomicBool]>,
    /// Where the next call starts looking for a free connection.
    next: AtomicUsize,
}

impl Conn {
    /// Opens `size` (at least one) connections to the cluster whose seed
    /// nodes are `urls` (comma-separated `redis://host:port`).
    ///
    /// # Errors
    /// [`StoreError::Engine`] when no seed node answers as a cluster.
    pub fn open(urls: &str, size: usize) -> Result<Self, StoreError> {
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
        let pool = (0..size.max(1))
            .map(|_| Ok(Mutex::new(client.get_connection().map_err(engine)?)))
            .collect::<Result<Box<[_]>, StoreError>>()?;
        Ok(Self {
            client,
            broken: pool.iter().map(|_| AtomicBool::new(false)).collect(),
            pool,
            next: AtomicUsize::new(0),
        })
    }

    /// A free connection, or the next one once it is free; replaced first
    /// if a call found the connections broken (if the cluster cannot be
    /// reached now, the old one is kept and the call fails again, to be
    /// retried).
    pub fn lock(&self) -> MutexGuard<'_, ClusterConnection> {
        let (at, mut conn) = super::take(&self.pool, &self.next);
        let broken = &self.broken[at];
        if broken.swap(false, Ordering::Relaxed) {
            match self.client.get_connection() {
                Ok(fresh) => {
                    *conn = fresh;
                    tracing::info!("reconnected to the Redis Cluster");
                }
                Err(e) => {
                    broken.store(true, Ordering::Relaxed);
                    tracing::warn!(error = %e, "cannot reconnect to the Redis Cluster");
                }
            }
        }
        conn
    }

    /// `e` as a store error; a connection error marks every connection
    /// for replacement (a dead master broke all of them).
    pub fn fail(&self, e: redis::RedisError) -> StoreError {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error()
        {
            for b in &self.broken {
                b.store(true, Ordering::Relaxed);
            }
        }
        engine(e)
    }
}

impl RedisDomains {
    /// Connects to the cluster whose seed nodes are `urls`, keeping every
    /// key under `prefix`, writing as `ownership` (only to the partitions
    /// it owns; the engine refuses the rest), over `connections`
    /// connections used side by side (one per shard thread and one for the
    /// sweeps). A synced commit waits for `min_replicas` replicas.
    ///
    /// # Errors
    /// [`StoreError::Engine`] when no seed node answers as a cluster.
    pub fn open(
        urls: &str,
        prefix: &str,
        min_replicas: u32,
        ownership: Arc<Ownership>,
        connections: usize,
    ) -> Result<Self, StoreError> {
        let store = Self {
            conn: Conn::open(urls, connections)?,
            keys: Keys::new(prefix),
            ownership,
            min_replicas,
            entries: AtomicI64::new(0),
            script_loads: AtomicU64::new(0),
            masters: Mutex::new(Masters::default()),
        };
        let counts = store.scan(&(0..PARTITIONS).collect::<Vec<_>>(), |p| {
            let mut c = redis::cmd("GET");
            c.arg(store.keys.index(p, "qn"));
            c
        })?;
        let total: i64 = counts
            .iter()
            .filter_map(|v| redis::from_redis_value_ref::<Option<i64>>(v).ok().flatten())
            .sum();
        store.entries.store(total, Ordering::Relaxed);
        Ok(store)
    }

    fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let result = cmd.query(&mut *self.conn.lock());
        result.map_err(|e| self.conn.fail(e))
    }

    /// Runs `cmd_for(p)` for each of `partitions`, in order, pipelined.
    fn scan(
        &self,
        partitions: &[u32],
        cmd_for: impl Fn(u32) -> redis::Cmd,
    ) -> Result<Vec<Value>, StoreError> {
        let mut out = Vec::with_capacity(partitions.len());
        let mut conn = self.conn.lock();
        for chunk in partitions.chunks(SCAN_CHUNK) {
            let mut pipe = cluster_pipe();
            for p in chunk {
                pipe.add_command(cmd_for(*p));
            }
            let values: Vec<Value> = pipe.query(&mut conn).map_err(|e| self.conn.fail(e))?;
            out.extend(values);
        }
        Ok(out)
    }

    /// Members of the `which` sorted-set index of every partition this
    /// node owns with a score below `before`, at most `limit` in all:
    /// `(member, score)`.
    fn index_below(
        &self,
        which: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<(String, f64)>, StoreError> {
        let values = self.scan(&self.ownership.owned(), |p| {
            let mut c = redis::cmd("ZRANGE");
            c.arg(self.keys.index(p, which))
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

    /// The unit of `rank` and `partition` in `units` (created if new).
    fn unit<'u>(&self, units: &'u mut Vec<Unit>, rank: u8, partition: u32) -> &'u mut Unit {
        let pos = units
            .iter()
            .position(|u| u.rank == rank && u.partition == partition)
            .unwrap_or_else(|| {
                units.push(Unit {
                    rank,
                    partition,
                    keys: vec![self.keys.owner(partition)],
                    args: vec![self.ownership.token().as_bytes().to_vec()],
                    entries: 0,
                });
                units.len() - 1
            });
        &mut units[pos]
    }

    /// Adds `op`'s share to the unit of its partition and rank, returning
    /// whether it was one of these domains' ops.
    fn stage(&self, op: &Op, units: &mut Vec<Unit>) -> Result<bool, StoreError> {
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
        let p = partition::of_id(owner);
        let member = |d: &DeviceKey| format!("{}:{}", d.user, d.device);
        // Decode before taking the unit, so a corrupt entry adds nothing.
        let stored_entry = match op {
            Op::Queue(QueueOp::Enqueue { entry, .. }) => {
                let decoded: pb::QueueEntry = decode("queue entry", &entry.bytes)?;
                let mut stored = format!("{:016x}", decoded.server_ts_ms).into_bytes();
                stored.extend_from_slice(&entry.bytes);
                Some(stored)
            }
            _ => None,
        };
        let unit = self.unit(units, op.domain_rank(), p);
        match op {
            Op::Queue(QueueOp::Enqueue { device, entry }) => {
                unit.key(k.queue(*device))
                    .key(k.usage(device.user))
                    .key(k.index(p, "qix"))
                    .key(k.index(p, "qn"))
                    .arg("enq")
                    .arg(device.device.to_string())
                    .arg(member(device))
                    .arg(entry.seq.to_string())
                    .arg(stored_entry.unwrap_or_default());
                unit.entries += 1;
            }
            Op::Queue(QueueOp::Dequeue { device, seq }) => {
                unit.key(k.queue(*device))
                    .key(k.usage(device.user))
                    .key(k.index(p, "qix"))
                    .key(k.index(p, "qn"))
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
                    .key(k.index(p, "qix"))
                    .key(k.index(p, "qn"))
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
                    .key(k.index(p, "dix"))
                    .arg("dput")
                    .arg(record.encode_to_vec())
                    .arg(record.accepted_ms.to_string());
            }
            Op::Mail(MailOp::Put { owner, id, record }) => {
                unit.key(k.mail(*owner))
                    .key(k.index(p, "mix"))
                    .arg("mput")
                    .arg(id.to_string())
                    .arg(record.encode_to_vec())
                    .arg(owner.to_string());
            }
            Op::Mail(MailOp::Delete { owner, id }) => {
                unit.key(k.mail(*owner))
                    .key(k.index(p, "mix"))
                    .arg("mdel")
                    .arg(id.to_string())
                    .arg(owner.to_string());
            }
            Op::Payload(PayloadOp::Put { id, record }) => {
                unit.key(k.payload(*id))
                    .key(k.index(p, "pix"))
                    .arg("pput")
                    .arg(record.encode_to_vec())
                    .arg(record.created_ms.to_string())
                    .arg(format!("{}:{}", id.owner, id.seq));
            }
            Op::Payload(PayloadOp::Delete(id)) => {
                unit.key(k.payload(*id))
                    .key(k.index(p, "pix"))
                    .arg("pdel")
                    .arg(format!("{}:{}", id.owner, id.seq));
            }
            _ => {}
        }
        Ok(true)
    }

    /// Of `slots`, one per master (by a slot map at most [`MASTERS_TTL`]
    /// old); all of them when the map cannot be read.
    fn one_slot_per_master(&self, conn: &mut ClusterConnection, slots: Vec<Slot>) -> Vec<Slot> {
        if slots.len() <= 1 {
            return slots;
        }
        let mut masters = self
            .masters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if masters.at.is_none_or(|at| at.elapsed() > MASTERS_TTL) {
            metrics::counter!(tm::REDIS_ROUND_TRIPS).increment(1);
            let reply = redis::cmd("CLUSTER").arg("SLOTS").query::<Value>(conn);
            match reply.ok().as_ref().and_then(parse_cluster_slots) {
                Some(of) => {
                    masters.of = of;
                    masters.at = Some(std::time::Instant::now());
                }
                None => {
                    masters.at = None;
                    return slots;
                }
            }
        }
        let mut seen: Vec<u16> = Vec::new();
        slots
            .into_iter()
            .filter(|slot| match masters.of.get(slot) {
                Some(m) if seen.contains(m) => false,
                Some(m) => {
                    seen.push(*m);
                    true
                }
                None => true,
            })
            .collect()
    }

    /// Applies these domains' ops of a batch: one script per partition and
    /// domain rank, each rank one pipeline, lower ranks first; with `sync`,
    /// then one `WAIT` for the replicas.
    ///
    /// # Errors
    /// [`StoreError::Engine`] if a script fails (a partition this node
    /// does not own is refused as "fenced") or the replicas do not
    /// confirm in time; the ranks before it stay applied (a prefix, as
    /// `Store::commit` allows).
    pub fn apply(&self, ops: &[Op], sync: bool) -> Result<(), StoreError> {
        let mut units: Vec<Unit> = Vec::new();
        for op in ops {
            self.stage(op, &mut units)?;
        }
        if units.is_empty() {
            return Ok(());
        }
        units.sort_by_key(|u| u.rank);
        let mut conn = self.conn.lock();
        for rank in units.chunk_by(|a, b| a.rank == b.rank) {
            self.run_scripts(&mut conn, |body| {
                let mut pipe = cluster_pipe();
                for unit in rank {
                    let mut eval = apply_cmd(body);
                    eval.arg(unit.keys.len());
                    for key in &unit.keys {
                        eval.arg(key);
                    }
                    for arg in &unit.args {
                        eval.arg(arg.as_slice());
                    }
                    pipe.add_command(eval);
                }
                pipe
            })?;
            for unit in rank {
                self.entries.fetch_add(unit.entries, Ordering::Relaxed);
            }
        }
        if sync && self.min_replicas > 0 {
            // One WAIT per master written: WAIT confirms every write made
            // before it on the connection to that master, whatever its
            // slot.
            let mut slots: Vec<Slot> = Vec::new();
            for unit in &units {
                let slot = Slot::for_key(self.keys.owner(unit.partition));
                if !slots.contains(&slot) {
                    slots.push(slot);
                }
            }
            let slots = self.one_slot_per_master(&mut conn, slots);
            for slot in slots {
                let mut wait = redis::cmd("WAIT");
                wait.arg(self.min_replicas).arg(WAIT_TIMEOUT_MS);
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_slot(slot, SlotAddr::Master),
                ));
                metrics::counter!(tm::REDIS_ROUND_TRIPS).increment(1);
                let value = conn
                    .route_command(&wait, route)
                    .map_err(|e| self.conn.fail(e))?;
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

impl RedisDomains {
    /// Runs the pipeline of `apply.lua` calls that `build` makes: by hash,
    /// and if a master does not have the script cached (it restarted, or
    /// is a promoted replica: the cache is neither persisted nor
    /// replicated), the whole pipeline again with the body. Every op of
    /// the script is idempotent, so the calls that had gone through leave
    /// the same state when repeated.
    fn run_scripts(
        &self,
        conn: &mut ClusterConnection,
        build: impl Fn(bool) -> redis::cluster::ClusterPipeline,
    ) -> Result<(), StoreError> {
        metrics::counter!(tm::REDIS_ROUND_TRIPS).increment(1);
        match build(false).query::<Vec<Value>>(conn) {
            Ok(_) => return Ok(()),
            Err(e) if is_noscript(&e) => {}
            Err(e) => return Err(self.conn.fail(e)),
        }
        self.script_loads.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(tm::REDIS_ROUND_TRIPS).increment(1);
        metrics::counter!(tm::REDIS_SCRIPT_LOADS).increment(1);
        build(true)
            .query::<Vec<Value>>(conn)
            .map(|_| ())
            .map_err(|e| self.conn.fail(e))
    }

    /// Commits whose script pipeline had to be sent again with the
    /// script's body (a master lacked it).
    pub fn script_loads(&self) -> u64 {
        self.script_loads.load(Ordering::Relaxed)
    }
}

/// Which master serves each slot, as `CLUSTER SLOTS` said at `at`.
#[derive(Default)]
struct Masters {
    of: crate::FastMap<Slot, u16>,
    at: Option<std::time::Instant>,
}

/// How long a slot map is trusted. Failovers move all of a master's slots
/// together (so slots that shared a master still share one); only a
/// resharding splits them, and a commit in the second after a slot moved
/// could then skip the `WAIT` of its new master (its write is still on
/// that master's AOF).
const MASTERS_TTL: Duration = Duration::from_secs(1);

/// The master (`host:port`) of each slot in a `CLUSTER SLOTS` reply.
fn parse_cluster_slots(reply: &Value) -> Option<crate::FastMap<Slot, u16>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut names: Vec<String> = Vec::new();
    let mut of = crate::FastMap::default();
    for range in ranges {
        let Value::Array(fields) = range else {
            return None;
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            return None;
        };
        let host = match master.first()? {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::SimpleString(s) => s.clone(),
            _ => return None,
        };
        let Some(Value::Int(port)) = master.get(1) else {
            return None;
        };
        let name = format!("{host}:{port}");
        let idx = match names.iter().position(|n| *n == name) {
            Some(i) => i,
            None => {
                names.push(name);
                names.len() - 1
            }
        };
        let idx = u16::try_from(idx).ok()?;
        for n in *start..=*end {
            of.insert(Slot::new(u16::try_from(n).ok()?)?, idx);
        }
    }
    Some(of)
}

/// The partition in a key's hash tag (`...{p:<n>}...`).
fn partition_in(key: &str) -> Option<u32> {
    let start = key.find("{p:")? + 3;
    let len = key.get(start..)?.find('}')?;
    key.get(start..start + len)?.parse().ok()
}

/// Splits an index member `"<a>:<b>"` into its two numbers.
fn pair(member: &str) -> Result<(u64, u64), StoreError> {
    member
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| corrupt("partition index", member))
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
        // Both keys are in the device's partition: one slot, one round trip.
        let mut pipe = cluster_pipe();
        pipe.cmd("ZCARD").arg(self.keys.queue(device));
        pipe.cmd("HGET")
            .arg(self.keys.usage(device.user))
            .arg(format!("b{}", device.device));
        let (entries, bytes): (u64, Option<u64>) = pipe
            .query(&mut self.conn.lock())
            .map_err(|e| self.conn.fail(e))?;
        Ok((entries, bytes.unwrap_or(0)))
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
                device: u32::try_from(device).map_err(|e| corrupt("partition index", e))?,
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
        // A pipeline per chunk, the connection given back between chunks:
        // a day's records are many, and commits go on meanwhile.
        for chunk in old.chunks(EXPIRE_CHUNK) {
            let mut parts = Vec::with_capacity(chunk.len());
            for (name, _) in chunk {
                let Some(p) = partition_in(name) else {
                    return Err(corrupt("dedup index", name));
                };
                parts.push((p, name));
            }
            self.run_scripts(&mut self.conn.lock(), |body| {
                let mut pipe = cluster_pipe();
                for (p, name) in &parts {
                    let mut eval = apply_cmd(body);
                    eval.arg(3)
                        .arg(self.keys.owner(*p))
                        .arg(name.as_str())
                        .arg(self.keys.index(*p, "dix"))
                        .arg(self.ownership.token())
                        .arg("dexp")
                        .arg(before_ms);
                    pipe.add_command(eval);
                }
                pipe
            })?;
        }
        Ok(old.len())
    }
}

impl Mailboxes for RedisDomains {
    fn mail(&self) -> Result<Vec<(UserId, u64, MailRecord)>, StoreError> {
        let owners = self.scan(&self.ownership.owned(), |p| {
            let mut c = redis::cmd("SMEMBERS");
            c.arg(self.keys.index(p, "mix"));
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
    fn a_users_keys_share_its_partitions_tag() {
        let keys = Keys::new("sb:");
        let user = 0x0a11_ce00_0000_0001;
        let p = partition::of_id(user);
        let tag = format!("{{p:{p}}}");
        for key in [
            keys.queue(DeviceKey { user, device: 3 }),
            keys.usage(user),
            keys.mail(user),
            keys.index(p, "qix"),
            keys.owner(p),
        ] {
            assert!(key.contains(&tag), "{key}");
            assert_eq!(partition_in(&key), Some(p));
        }
    }

    #[test]
    fn cluster_slots_give_each_slot_its_master() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(8191),
                node("127.0.0.1", 7000),
                node("127.0.0.1", 7003),
            ]),
            Value::Array(vec![
                Value::Int(8192),
                Value::Int(16383),
                node("127.0.0.1", 7001),
            ]),
        ]);
        let of = parse_cluster_slots(&reply).expect("parsed");
        assert_eq!(of.len(), 16384);
        let (a, b, c) = (Slot::new(0), Slot::new(8191), Slot::new(8192));
        let master = |s: Option<Slot>| s.and_then(|s| of.get(&s).copied());
        assert_eq!(master(a), master(b));
        assert_ne!(master(b), master(c));
        assert!(parse_cluster_slots(&Value::Int(3)).is_none());
    }
}
