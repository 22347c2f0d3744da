//! The embedded backend: one fjall database in the data directory.
//!
//! fjall is a crash-safe LSM engine with a write-ahead journal and atomic
//! batches across keyspaces: a batch committed with `SyncAll` is on disk when
//! `commit` returns, which is what a ✓ promises. Keyspaces:
//!
//! | keyspace     | key                              | value            |
//! |--------------|----------------------------------|------------------|
//! | `users`      | user id                          | `UserRecord`     |
//! | `phones`     | E.164 phone                      | user id          |
//! | `codes`      | E.164 phone                      | `CodeRecord`     |
//! | `queues`     | user, device, seq                | `pb::QueueEntry` |
//! | `queue_meta` | user, device                     | highest reserved seq (u64) |
//! | `dedup-<day>`| to user, from device, client id  | `DedupRecord`    |
//! | `device_keys`| user, device                     | `DeviceKeysRecord` |
//! | `otks`       | user, device, index              | `pb::SignedKey`  |
//! | `link_codes` | code                             | `LinkCodeRecord` |
//! | `mail`       | owner user, id                   | `MailRecord`     |
//! | `payloads`   | owner, seq                       | `PayloadRecord`  |
//! | `groups`     | group id                         | `GroupRecord`    |
//! | `group_meta` | group id                         | highest reserved group seq (u64) |
//! | `memberships`| user, group                      | (empty)          |
//!
//! Every batch is first appended to the store's own log (`log/` in the
//! database directory, see `store/log.rs`), and a synced batch is durable
//! once that log is synced: one fsync per batch, as before. Queue entries
//! then live in memory (`hot`) until they are acked, which for an online
//! device is milliseconds later, so most never reach the LSM: no memtable
//! insert, no tombstone, no flush or compaction. Everything else is applied
//! to fjall without a sync of its own, and only after the log's sync, so
//! fjall never holds a write the log lacks. A checkpoint (log segment full,
//! expiry sweep) moves the entries still in memory into fjall and starts a
//! new segment; the one before stays until the next checkpoint has synced
//! fjall, so no sync of fjall happens under the log lock. At shutdown a
//! checkpoint persists fjall and deletes every old segment. Opening replays
//! the segments left, at most two (every logged write is a put or a
//! removal, so replaying one twice is harmless), and checkpoints at once.
//!
//! Dedup records live in one keyspace per UTC day of their `accepted_ms`
//! (`dedup-20786`). Expiry drops whole keyspaces once their last possible
//! record is older than the window: no per-record time index and no
//! tombstones, which cost two inserts and two deletions per message before.
//! A lookup asks the records held in memory, then the day keyspaces newest
//! first (a miss in an older day is mostly a bloom filter check).
//!
//! Like queue entries, dedup records logged since the last checkpoint are
//! held in memory (`held_dedup`), not written to fjall one batch at a time:
//! one record per message, read only when a client retries, made the
//! memtable insert a sixth of the server's CPU on the send path and its
//! flushes the worst of the latency tail. A checkpoint sorts them and
//! ingests each day's as one table (fjall writes and syncs the table
//! directly, with no journal and no memtable).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use prost::Message;
use switchboard_proto::pb;

mod accounts;
mod dedup;
mod groups;
mod hot;
mod keys;
mod layout;
mod log;
mod mail;
mod payloads;
mod queues;

use super::{
    AccountOp, Accounts, CodeRecord, Dedup, DedupKey, DedupOp, DedupRecord, DeviceKey,
    DeviceKeysRecord, GroupId, GroupOp, GroupRecord, Groups, KeyOp, Keys, LinkCodeRecord, MailOp,
    MailRecord, Mailboxes, Op, PayloadId, PayloadOp, PayloadRecord, Payloads, QueueOp, Queues,
    Store, StoreError, StoredEntry, UserId, UserRecord,
};
use hot::Hot;
use log::{self as wal, Kind, Log, RawOp};

/// The embedded store.
///
/// fjall refuses every write after a failed journal write or sync (it
/// "poisons" the database), as it must: the journal's tail is unknown. The
/// store recovers by reopening the database, which replays the journal and
/// drops the torn tail, once the disk accepts writes again (e.g. space was
/// freed). Until then every call fails with [`StoreError::Engine`] and
/// nothing is acknowledged.
pub struct EmbeddedStore {
    dir: std::path::PathBuf,
    /// The open database. Writers of this lock are the reopen path only.
    state: RwLock<State>,
}

struct State {
    db: Option<Arc<Db>>,
    /// Last failed reopen, to retry at most every [`REOPEN_INTERVAL`].
    last_attempt: Option<Instant>,
}

/// Journal kept before memtables are flushed to tables. Recovery after a
/// crash replays the journal, so this bounds restart time (fjall's default
/// of 512 MiB made restarts take many seconds).
const MAX_JOURNAL_BYTES: u64 = 64 * 1024 * 1024;

/// Their nice value: the lowest priority. On a saturated core a flush took
/// about 0.2 s of the shard's and the connections' time every few seconds,
/// which showed as the p99 of the whole run (docs/BENCHMARKS.md).
const BACKGROUND_NICE: i32 = 19;
/// Memtable size per keyspace before it is flushed to a table (fjall's
/// default is 64 MiB). Queue entries are written and deleted soon after, so
/// a memtable is mostly dead entries; a smaller one keeps the skiplist
/// shallow (inserts were the largest store cost at 16 MiB: saturation 9.9k
/// → 11.3k msgs/s at 4 MiB). At 1 MiB the frequent memtable and journal
/// rotations stalled a few commits for 250–500 ms (p99 at 4,500 msgs/s:
/// 320 ms against 18 ms at 4 MiB). See docs/BENCHMARKS.md.
const MAX_MEMTABLE_BYTES: u64 = 4 * 1024 * 1024;

/// The span of one dedup keyspace: a UTC day.
pub const DEDUP_BUCKET_MS: u64 = 86_400_000;
/// Name prefix of the dedup day keyspaces.
const DEDUP_PREFIX: &str = "dedup-";
/// Keyspaces of the layout before day buckets, migrated on open.
const LEGACY_DEDUP: &str = "dedup";
const LEGACY_DEDUP_TIME: &str = "dedup_time";
/// Records moved per batch when migrating the legacy dedup keyspaces.
const MIGRATE_BATCH: usize = 4096;

/// Log bytes after which a checkpoint starts a new segment. Bounds both
/// the memory of the entries held in memory and the replay at startup
/// (the current segment and the one before it).
const LOG_SEGMENT_BYTES: u64 = 32 * 1024 * 1024;
/// Up to this many dedup records held, a checkpoint writes them in its
/// batch under the log lock (about 1-2 µs each) instead of ingesting them
/// as a table of their own first (a file, a sync and later a compaction,
/// for every checkpoint of a quiet server).
const DEDUP_LOCKED_MAX: usize = 2_000;
/// Directory of the log inside the database directory.
const LOG_DIR: &str = "log";

/// Keyspaces as logged (`RawOp::target`).
const T_USERS: u8 = 0;
const T_PHONES: u8 = 1;
const T_CODES: u8 = 2;
const T_QUEUES: u8 = 3;
const T_QUEUE_META: u8 = 4;
const T_DEDUP: u8 = 5;
const T_DEVICE_KEYS: u8 = 6;
const T_OTKS: u8 = 7;
const T_LINK_CODES: u8 = 8;
const T_MAIL: u8 = 9;
const T_PAYLOADS: u8 = 10;
const T_GROUPS: u8 = 11;
const T_GROUP_META: u8 = 12;
const T_MEMBERSHIPS: u8 = 13;

/// Time between attempts to reopen a failed database.
const REOPEN_INTERVAL: Duration = Duration::from_millis(500);
/// How long a reopen waits for in-flight calls to let go of the old handle.
const REOPEN_DRAIN: Duration = Duration::from_secs(2);

/// One open fjall database and its keyspaces.
struct Db {
    db: Database,
    users: Keyspace,
    phones: Keyspace,
    codes: Keyspace,
    queues: Keyspace,
    queue_meta: Keyspace,
    /// Dedup records by day of acceptance (`accepted_ms / DEDUP_BUCKET_MS`).
    dedup_days: RwLock<BTreeMap<u64, Keyspace>>,
    device_keys: Keyspace,
    otks: Keyspace,
    link_codes: Keyspace,
    mail: Keyspace,
    payloads: Keyspace,
    groups: Keyspace,
    group_meta: Keyspace,
    memberships: Keyspace,
    /// The log. Held from a batch's append until it is applied, and by
    /// checkpoints, so a checkpoint never retires a batch not yet applied.
    log: Mutex<Log>,
    /// Queue entries logged since the last checkpoint and not removed. A
    /// lock of its own, held briefly: reads never wait for a log fsync.
    hot: Mutex<Hot>,
    /// `hot.len()`, for the gauge read from the async runtime.
    hot_len: AtomicU64,
    /// Dedup records logged since the last checkpoint (or since the
    /// current one began ingesting). Locked after `hot`.
    held_dedup: Mutex<HeldDedup>,
    /// The records a running checkpoint is ingesting without the log
    /// lock; lookups ask here after `held_dedup`.
    frozen_dedup: RwLock<Option<Arc<HeldDedup>>>,
    /// Held for a whole checkpoint and by dedup expiry, taken before the
    /// log lock: one checkpoint at a time, and no day is dropped while its
    /// records are being ingested.
    checkpointing: Mutex<()>,
    /// Wakes the background checkpointer (`start_checkpointer`); unset
    /// until it runs, and commits then checkpoint themselves.
    checkpoint_wanted: std::sync::OnceLock<std::sync::mpsc::SyncSender<()>>,
}

/// How a checkpoint ends, once the queue entries are in fjall.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Finish {
    /// fjall is synced and every segment before a new one deleted.
    Everything,
    /// A new segment starts and the current one stays until the next
    /// checkpoint (see `checkpoint_keeping_current`). With `carry_dedup`,
    /// the dedup records held stay held (they are all in the current
    /// segment), for the next checkpoint to ingest.
    KeepCurrent { carry_dedup: bool },
}

/// Dedup records by key (`layout::dedup`): their day and encoded record.
/// The keys hold client-chosen ids, hence std's hasher.
type HeldDedup = std::collections::HashMap<Vec<u8>, (u64, Bytes)>;

fn engine(e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine(e.to_string())
}

fn decode<M: Message + Default>(what: &'static str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt {
        what,
        detail: e.to_string(),
    })
}

fn u64_value(what: &'static str, bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            what,
            detail: format!("expected 8 bytes, got {}", bytes.len()),
        })
}

impl EmbeddedStore {
    /// Opens (or creates) the database under `dir`.
    ///
    /// # Errors
    /// [`StoreError::Engine`] if the directory cannot be opened or recovered.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = Arc::new(Db::open(dir)?);
        Db::start_checkpointer(&db);
        Ok(Self {
            dir: dir.to_owned(),
            state: RwLock::new(State {
                db: Some(db),
                last_attempt: None,
            }),
        })
    }

    /// The open database, reopening a failed one when it is time to try.
    fn db(&self) -> Result<Arc<Db>, StoreError> {
        {
            let state = self
                .state
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(db) = &state.db {
                return Ok(db.clone());
            }
            if state
                .last_attempt
                .is_some_and(|t| t.elapsed() < REOPEN_INTERVAL)
            {
                return Err(StoreError::Engine("store unavailable; reopening".into()));
            }
        }
        let mut state = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(db) = &state.db {
            return Ok(db.clone());
        }
        state.last_attempt = Some(Instant::now());
        let db = Arc::new(Db::open(&self.dir)?);
        Db::start_checkpointer(&db);
        tracing::warn!(dir = %self.dir.display(), "store reopened after a failure");
        state.db = Some(db.clone());
        Ok(db)
    }

    /// Takes a database whose writes failed out of service; the next call
    /// reopens it.
    fn retire(&self, failed: Arc<Db>) {
        let mut state = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !state.db.as_ref().is_some_and(|db| Arc::ptr_eq(db, &failed)) {
            return; // another thread already did
        }
        state.db = None;
        state.last_attempt = None;
        drop(state);
        // Reopening needs the old handle gone (it holds the directory lock);
        // other threads drop their clones as their calls finish.
        let started = Instant::now();
        while Arc::strong_count(&failed) > 1 && started.elapsed() < REOPEN_DRAIN {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(failed);
    }
}

impl Drop for EmbeddedStore {
    /// Waits (bounded) for a running background checkpoint to let go of
    /// the database, so that the directory can be opened again as soon as
    /// this returns (a restart in the same process, as tests do).
    fn drop(&mut self) {
        let state = self
            .state
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(db) = state.db.take() {
            let started = Instant::now();
            while Arc::strong_count(&db) > 1 && started.elapsed() < REOPEN_DRAIN {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

impl Db {
    fn open(dir: &Path) -> Result<Self, StoreError> {
        let started = Instant::now();
        let db = open_database(dir)?;
        let opened_at = started.elapsed();
        let (log, recovered) = Log::open(&dir.join(LOG_DIR)).map_err(engine)?;
        let read_at = started.elapsed();
        let ks = |name: &str| open_keyspace(&db, name);
        let mut dedup_days = BTreeMap::new();
        for name in db.list_keyspace_names() {
            if let Some(day) = name
                .strip_prefix(DEDUP_PREFIX)
                .and_then(|d| d.parse::<u64>().ok())
            {
                dedup_days.insert(day, ks(&name)?);
            }
        }
        let this = Self {
            users: ks("users")?,
            phones: ks("phones")?,
            codes: ks("codes")?,
            queues: ks("queues")?,
            queue_meta: ks("queue_meta")?,
            dedup_days: RwLock::new(dedup_days),
            device_keys: ks("device_keys")?,
            otks: ks("otks")?,
            link_codes: ks("link_codes")?,
            mail: ks("mail")?,
            payloads: ks("payloads")?,
            groups: ks("groups")?,
            group_meta: ks("group_meta")?,
            memberships: ks("memberships")?,
            log: Mutex::new(log),
            hot: Mutex::new(Hot::default()),
            held_dedup: Mutex::new(HeldDedup::new()),
            frozen_dedup: RwLock::new(None),
            checkpointing: Mutex::new(()),
            checkpoint_wanted: std::sync::OnceLock::new(),
            hot_len: AtomicU64::new(0),
            db,
        };
        if recovered.torn {
            // After a clean stop too: a reused segment file keeps its older
            // records behind the new ones.
            tracing::debug!(
                "the store log had bytes after its last intact record \
                 (a write cut by a crash, or a reused file's older records); ignored"
            );
        }
        {
            let records = recovered.records.len();
            let bytes: usize = recovered.records.iter().map(Vec::len).sum();
            for record in recovered.records {
                let ops = wal::decode(&record).ok_or(StoreError::Corrupt {
                    what: "log record",
                    detail: format!("{} bytes", record.len()),
                })?;
                this.apply(ops, true)?;
            }
            let applied_at = started.elapsed();
            // Many dedup records are ingested as tables rather than batched:
            // a batch of a two-segment replay's 100,000-200,000 records took
            // 0.3-0.5 s here, and made fjall's journal, replayed at the next
            // open, that much longer.
            this.checkpoint()?;
            if records > 0 {
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                tracing::info!(
                    records,
                    bytes,
                    open_db_ms = ms(opened_at),
                    read_log_ms = ms(read_at - opened_at),
                    apply_ms = ms(applied_at - read_at),
                    checkpoint_ms = ms(started.elapsed() - applied_at),
                    "store log replayed"
                );
            }
        }
        this.migrate_legacy_dedup()?;
        Ok(this)
    }

    fn lock_log(&self) -> MutexGuard<'_, Log> {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_hot(&self) -> MutexGuard<'_, Hot> {
        self.hot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_held_dedup(&self) -> MutexGuard<'_, HeldDedup> {
        self.held_dedup
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The keyspace a logged write goes to.
    fn target(&self, target: u8, day: u64) -> Result<Keyspace, StoreError> {
        Ok(match target {
            T_USERS => self.users.clone(),
            T_PHONES => self.phones.clone(),
            T_CODES => self.codes.clone(),
            T_QUEUES => self.queues.clone(),
            T_QUEUE_META => self.queue_meta.clone(),
            T_DEDUP => return self.dedup_day(day.saturating_mul(DEDUP_BUCKET_MS)),
            T_DEVICE_KEYS => self.device_keys.clone(),
            T_OTKS => self.otks.clone(),
            T_LINK_CODES => self.link_codes.clone(),
            T_MAIL => self.mail.clone(),
            T_PAYLOADS => self.payloads.clone(),
            T_GROUPS => self.groups.clone(),
            T_GROUP_META => self.group_meta.clone(),
            T_MEMBERSHIPS => self.memberships.clone(),
            other => {
                return Err(StoreError::Corrupt {
                    what: "log record",
                    detail: format!("unknown keyspace {other}"),
                });
            }
        })
    }

    /// Applies logged writes: queue entries to `hot`, dedup records to
    /// `held_dedup`, the rest to fjall (without a sync: the log has them).
    /// In `replay`, a removed queue entry is also removed from fjall, where
    /// a checkpoint cut short by a crash may have put it.
    fn apply(&self, ops: Vec<RawOp>, replay: bool) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        let mut hot = self.lock_hot();
        let mut held_dedup: Option<MutexGuard<'_, HeldDedup>> = None;
        for op in ops {
            if op.target == T_DEDUP && op.kind == Kind::Put {
                held_dedup
                    .get_or_insert_with(|| self.lock_held_dedup())
                    .insert(op.key, (op.day, op.value));
                continue;
            }
            if op.target == T_QUEUES
                && let Ok(key) = <[u8; 20]>::try_from(op.key.as_slice())
            {
                match op.kind {
                    Kind::Put => {
                        hot.insert(&key, op.value);
                        continue;
                    }
                    Kind::Remove => {
                        // An entry put in the stretch replayed is in fjall
                        // only if a checkpoint moved it there before a
                        // crash. Most never were: a tombstone for each (a
                        // two-segment replay removes hundreds of thousands)
                        // made the replay slower and fjall's journal, which
                        // the next open replays in turn, longer.
                        if hot.remove(&key)
                            && (!replay || !self.queues.contains_key(key).map_err(engine)?)
                        {
                            continue;
                        }
                    }
                    Kind::RemovePrefix => {}
                }
            }
            let ks = self.target(op.target, op.day)?;
            match op.kind {
                Kind::Put => batch.insert(&ks, op.key, op.value.as_ref()),
                Kind::Remove => batch.remove(&ks, op.key),
                Kind::RemovePrefix => {
                    if op.target == T_QUEUES {
                        hot.remove_prefix(&op.key);
                    }
                    for guard in ks.prefix(&op.key) {
                        let k = guard.key().map_err(engine)?;
                        batch.remove(&ks, k);
                    }
                }
            }
        }
        self.hot_len.store(hot.len() as u64, Ordering::Relaxed);
        drop(held_dedup);
        drop(hot);
        if !batch.is_empty() {
            batch.commit().map_err(engine)?;
        }
        Ok(())
    }

    /// Starts the thread that checkpoints when a commit fills the log's
    /// segment, so that the ingestion of a segment's dedup records (tens
    /// of milliseconds) holds up neither the committing shard nor, through
    /// the log lock, the others. If it cannot start, commits checkpoint
    /// themselves, as they do when it falls behind.
    fn start_checkpointer(db: &Arc<Self>) {
        let (wake, wanted) = std::sync::mpsc::sync_channel::<()>(1);
        let weak = Arc::downgrade(db);
        let spawned = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || {
                // Ends when the database is dropped (with its sender).
                while wanted.recv().is_ok() {
                    let Some(db) = weak.upgrade() else { break };
                    if let Err(e) = db.checkpoint_keeping_current() {
                        tracing::warn!(error = %e, "store log checkpoint failed");
                    }
                    // Commits that found the segment full while this ran
                    // asked again; that checkpoint is done.
                    while wanted.try_recv().is_ok() {}
                }
            });
        match spawned {
            Ok(_) => {
                let _ = db.checkpoint_wanted.set(wake);
            }
            Err(e) => tracing::warn!(error = %e, "cannot start the store's checkpoint thread"),
        }
    }

    fn lock_checkpointing(&self) -> MutexGuard<'_, ()> {
        self.checkpointing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A checkpoint that leaves nothing to replay but the current
    /// segment: fjall is made durable and every older segment deleted. At
    /// open (see `Db::open`) and at shutdown. If they are many, the
    /// dedup records held are first ingested without the log lock.
    fn checkpoint(&self) -> Result<(), StoreError> {
        let _one = self.lock_checkpointing();
        if self.lock_held_dedup().len() > DEDUP_LOCKED_MAX {
            self.freeze_and_ingest()?;
        }
        self.checkpoint_locked(&mut self.lock_log(), Finish::Everything)
    }

    /// The background checkpoint (and the expiry sweep's), which keeps as
    /// little as it can under the log lock, where it holds up every
    /// commit. The current segment
    /// stays, as the previous one, until the next checkpoint; before that
    /// one deletes it, fjall is synced (without the log lock) and the
    /// dedup records logged during this one's ingestion are ingested. So
    /// under the lock there is no sync of fjall and no batch of those
    /// records (6,000-13,000 at 15,000 msgs/s, 5-25 ms of the 10-42 ms
    /// the lock was held; see docs/BENCHMARKS.md). The price is up to two
    /// segments to replay after a crash.
    ///
    /// Phases: ingest the dedup records held (if many), which includes
    /// every one the previous segment holds; sync fjall, which then holds
    /// all of the previous segment; with the log lock, move the queue
    /// entries into fjall and rotate.
    ///
    /// Tried, not kept: more ingestion passes for the records logged
    /// during the first. Each pass took about as long as the first, 400 ms
    /// and more, mostly waiting for the core at the lowest priority, so
    /// as many were logged meanwhile.
    fn checkpoint_keeping_current(&self) -> Result<(), StoreError> {
        let _one = self.lock_checkpointing();
        let froze = self.lock_held_dedup().len() > DEDUP_LOCKED_MAX;
        if froze {
            self.freeze_and_ingest()?;
        }
        let started = Instant::now();
        self.db.persist(PersistMode::SyncAll).map_err(engine)?;
        tracing::debug!(
            ms = started.elapsed().as_secs_f64() * 1e3,
            "store checkpoint: fjall synced"
        );
        // Everything held now was logged after the freeze, so in the
        // current segment, which stays.
        self.checkpoint_locked(
            &mut self.lock_log(),
            Finish::KeepCurrent { carry_dedup: froze },
        )
    }

    /// Clears `frozen_dedup`, returning what it held.
    fn take_frozen(&self) -> Option<Arc<HeldDedup>> {
        self.frozen_dedup
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Freezes the dedup records held now and ingests them into fjall,
    /// without the log lock. Lookups find them in `frozen_dedup` until
    /// `checkpoint_locked` clears it.
    fn freeze_and_ingest(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let frozen = {
            let mut held = self.lock_held_dedup();
            let frozen = Arc::new(std::mem::take(&mut *held));
            // Set before `held` lets go: a lookup finds a record in one of
            // the two.
            *self
                .frozen_dedup
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(frozen.clone());
            frozen
        };
        if let Err(e) = self.ingest_in_background(&frozen) {
            // Back into memory, where the next checkpoint finds them; the
            // log still has them.
            let mut held = self.lock_held_dedup();
            for (k, v) in frozen.iter() {
                held.entry(k.clone()).or_insert_with(|| v.clone());
            }
            drop(self.take_frozen());
            return Err(e);
        }
        tracing::debug!(
            dedup = frozen.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "store checkpoint: dedup records ingested"
        );
        Ok(())
    }

    /// `ingest_dedup` on a thread of the lowest CPU priority, waiting for
    /// it: on a busy core it takes the CPU the shards and connections leave
    /// (the p99 at 12,000 msgs/s went from 62-76 to 20-25 ms). The caller
    /// keeps its priority for the part under the log lock, which a
    /// low-priority thread could hold for long on a saturated core.
    fn ingest_in_background(&self, held: &HeldDedup) -> Result<usize, StoreError> {
        at_low_priority("store-ingest", || self.ingest_dedup(held))
    }

    /// Moves the queue entries held in memory into fjall, and the dedup
    /// records held unless they are carried, then ends as `finish` says.
    /// The caller holds the log lock, so no batch changes memory
    /// meanwhile.
    fn checkpoint_locked(&self, log: &mut Log, finish: Finish) -> Result<(), StoreError> {
        // Unsynced batches too: a segment left behind by a failed deletion,
        // or kept by a rotation, is then whole, and replaying it with the
        // ones after it is a replay of an unbroken stretch of the history.
        let started = Instant::now();
        log.sync().map_err(engine)?;
        let synced_at = started.elapsed();
        // Only batches change `hot`, and they wait for the log lock the
        // caller holds: the copy stays exact until it is cleared below.
        // Reads meanwhile find entries in both places and merge them.
        let moved = self.lock_hot().entries();
        let mut batch = self.db.batch();
        for (k, v) in &moved {
            batch.insert(&self.queues, &k[..], v.as_ref());
        }
        let moved_at = started.elapsed();
        // The dedup records logged since `checkpoint` froze the rest, or
        // all of them if they were few: into the same batch (a table of
        // their own would cost a sync). Without a two-phase caller (at
        // open), all of them: a big batch. Carried records stay held, and
        // in the segment kept.
        let carry = matches!(finish, Finish::KeepCurrent { carry_dedup: true });
        let dedup = if carry {
            0
        } else {
            let held = self.lock_held_dedup();
            for (k, (day, v)) in held.iter() {
                let ks = self.dedup_day(day.saturating_mul(DEDUP_BUCKET_MS))?;
                batch.insert(&ks, k.as_slice(), v.as_ref());
            }
            held.len()
        };
        if !batch.is_empty() {
            batch.commit().map_err(engine)?;
        }
        let committed_at = started.elapsed();
        // A rotation needs no sync here unless dedup records were batched:
        // some may be carried ones from the previous segment, which goes.
        if finish == Finish::Everything || dedup > 0 {
            self.db.persist(PersistMode::SyncAll).map_err(engine)?;
        }
        let persisted_at = started.elapsed();
        // Emptied by swapping and freed elsewhere: freeing the entries of
        // 10,000 devices and thousands of records took 1-7 ms here, under
        // the log lock, and the frozen tens of thousands of records 15 ms.
        let hot = std::mem::take(&mut *self.lock_hot());
        self.hot_len.store(0, Ordering::Relaxed);
        let held = if carry {
            HeldDedup::new()
        } else {
            std::mem::take(&mut *self.lock_held_dedup())
        };
        drop_in_background((hot, held, self.take_frozen()));
        let cleared_at = started.elapsed();
        match finish {
            Finish::Everything => log.retire_older(),
            Finish::KeepCurrent { .. } => log.rotate(),
        }
        .map_err(engine)?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        tracing::debug!(
            entries = moved.len(),
            dedup,
            carried = if carry {
                self.lock_held_dedup().len()
            } else {
                0
            },
            log_sync_ms = ms(synced_at),
            entries_ms = ms(moved_at - synced_at),
            batch_ms = ms(committed_at - moved_at),
            persist_ms = ms(persisted_at - committed_at),
            clear_ms = ms(cleared_at - persisted_at),
            retire_ms = ms(started.elapsed() - cleared_at),
            total_ms = ms(started.elapsed()),
            "store checkpoint"
        );
        Ok(())
    }

    /// Writes dedup records into their day keyspaces, one ingested table
    /// per day (fjall syncs it), and returns how many. Lookups keep finding
    /// them in memory until the checkpoint clears it.
    fn ingest_dedup(&self, held: &HeldDedup) -> Result<usize, StoreError> {
        let mut records: Vec<(u64, &Vec<u8>, &Bytes)> =
            held.iter().map(|(k, (day, v))| (*day, k, v)).collect();
        // Ingestion takes keys in strictly ascending order; the map's keys
        // are unique.
        records.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        for day_records in records.chunk_by(|a, b| a.0 == b.0) {
            let Some(&(day, _, _)) = day_records.first() else {
                continue;
            };
            let ks = self.dedup_day(day.saturating_mul(DEDUP_BUCKET_MS))?;
            let mut ingestion = ks.start_ingestion().map_err(engine)?;
            for (_, k, v) in day_records {
                ingestion.write(k.as_slice(), v.as_ref()).map_err(engine)?;
            }
            ingestion.finish().map_err(engine)?;
        }
        Ok(records.len())
    }

    /// Moves the records of the single `dedup` keyspace of earlier versions
    /// into day keyspaces, then deletes it and its time index. Each batch
    /// is durable before the next, and a record is only ever copied, so a
    /// crash midway just repeats the move on the next open.
    fn migrate_legacy_dedup(&self) -> Result<(), StoreError> {
        if !self.db.keyspace_exists(LEGACY_DEDUP) {
            return Ok(());
        }
        let legacy = open_keyspace(&self.db, LEGACY_DEDUP)?;
        let mut moved = 0usize;
        let mut batch = Vec::with_capacity(MIGRATE_BATCH);
        for guard in legacy.iter() {
            let (k, v) = guard.into_inner().map_err(engine)?;
            let record: DedupRecord = decode("dedup", &v)?;
            let key = layout::parse_dedup(&k).ok_or(StoreError::Corrupt {
                what: "dedup key",
                detail: format!("{} bytes", k.len()),
            })?;
            batch.push(DedupOp::Put { key, record }.into());
            if batch.len() == MIGRATE_BATCH {
                moved += batch.len();
                self.commit(std::mem::take(&mut batch), true)?;
            }
        }
        moved += batch.len();
        self.commit(batch, true)?;
        // Into the day keyspaces before the old ones go.
        self.checkpoint()?;
        self.db.delete_keyspace(legacy).map_err(engine)?;
        if self.db.keyspace_exists(LEGACY_DEDUP_TIME) {
            let index = open_keyspace(&self.db, LEGACY_DEDUP_TIME)?;
            self.db.delete_keyspace(index).map_err(engine)?;
        }
        tracing::info!(records = moved, "dedup records moved to day keyspaces");
        Ok(())
    }

    /// The day keyspace for records accepted at `accepted_ms`, created on
    /// first use.
    fn dedup_day(&self, accepted_ms: u64) -> Result<Keyspace, StoreError> {
        let day = accepted_ms / DEDUP_BUCKET_MS;
        if let Some(ks) = self
            .dedup_days
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&day)
        {
            return Ok(ks.clone());
        }
        let mut days = self
            .dedup_days
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(ks) = days.get(&day) {
            return Ok(ks.clone());
        }
        let ks = open_keyspace(&self.db, &format!("{DEDUP_PREFIX}{day}"))?;
        days.insert(day, ks.clone());
        Ok(ks)
    }
}

/// Opens fjall's database from a thread at [`BACKGROUND_NICE`], so that
/// the workers it starts (memtable flushes, compactions) inherit that
/// priority: they can wait, users' messages cannot. Renicing them by name
/// after the open raced with the workers naming themselves: one of the two
/// kept nice 0, and its compactions took up to half of a saturated core
/// for a third of a second (docs/BENCHMARKS.md, session 13).
fn open_database(dir: &Path) -> Result<Database, StoreError> {
    at_low_priority("store-open", || {
        Database::builder(dir)
            .max_journaling_size(MAX_JOURNAL_BYTES)
            .open()
            .map_err(engine)
    })
}

/// Runs `work` on a thread named `name` at [`BACKGROUND_NICE`] and waits
/// for it. If no thread can be had, runs it here, at this thread's
/// priority.
fn at_low_priority<T: Send>(
    name: &str,
    work: impl Fn() -> Result<T, StoreError> + Sync,
) -> Result<T, StoreError> {
    std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn_scoped(scope, || {
                lower_own_priority();
                work()
            });
        match spawned {
            Ok(running) => running
                .join()
                .unwrap_or_else(|_| Err(StoreError::Engine(format!("the {name} thread panicked")))),
            Err(_) => work(),
        }
    })
}

/// Lowers the calling thread to [`BACKGROUND_NICE`]; it stays working at
/// its priority if it cannot.
fn lower_own_priority() {
    if let Err(e) = crate::os::lower_own_priority(BACKGROUND_NICE) {
        tracing::debug!(error = %e, "cannot lower a background thread's priority");
    }
}

/// Drops `value` on a new thread at [`BACKGROUND_NICE`]. If no thread can
/// be had, the closure, and `value` with it, is dropped here.
fn drop_in_background<T: Send + 'static>(value: T) {
    let _ = std::thread::Builder::new()
        .name("store-free".into())
        .spawn(move || {
            lower_own_priority();
            drop(value);
        });
}

/// A batch's writes as logged, in the batch's order.
fn to_raw(ops: Vec<Op>) -> Vec<RawOp> {
    let mut raw = Vec::with_capacity(ops.len() + 1);
    for op in ops {
        match op {
            Op::Account(op) => accounts::to_raw(op, &mut raw),
            Op::Key(op) => keys::to_raw(op, &mut raw),
            Op::Queue(op) => queues::to_raw(op, &mut raw),
            Op::Dedup(op) => dedup::to_raw(op, &mut raw),
            Op::Mail(op) => mail::to_raw(op, &mut raw),
            Op::Payload(op) => payloads::to_raw(op, &mut raw),
            Op::Group(op) => groups::to_raw(op, &mut raw),
        }
    }
    raw
}

/// A logged put into keyspace `target`.
fn put(target: u8, key: Vec<u8>, value: Bytes) -> RawOp {
    RawOp {
        target,
        day: 0,
        kind: Kind::Put,
        key,
        value,
    }
}

/// A logged removal (of a key, or of every key under a prefix).
fn remove(target: u8, kind: Kind, key: Vec<u8>) -> RawOp {
    RawOp {
        target,
        day: 0,
        kind,
        key,
        value: Bytes::new(),
    }
}

fn open_keyspace(db: &Database, name: &str) -> Result<Keyspace, StoreError> {
    db.keyspace(name, || {
        KeyspaceCreateOptions::default().max_memtable_size(MAX_MEMTABLE_BYTES)
    })
    .map_err(engine)
}

impl Db {
    fn commit(&self, ops: Vec<Op>, sync: bool) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let raw = to_raw(ops);
        let mut log = self.lock_log();
        log.append(&raw).map_err(engine)?;
        if sync {
            log.sync().map_err(engine)?;
        }
        self.apply(raw, false)?;
        if log.len() < LOG_SEGMENT_BYTES {
            return Ok(());
        }
        // A full segment: the checkpoint thread's work, unless there is
        // none or it has fallen a whole segment behind.
        if let Some(wake) = self.checkpoint_wanted.get()
            && log.len() < 2 * LOG_SEGMENT_BYTES
        {
            // Full: a wake-up is already waiting.
            let _ = wake.try_send(());
            return Ok(());
        }
        // Not while a checkpoint runs (it takes the log lock next); the
        // lock order is checkpoint, then log.
        let Ok(_one) = self.checkpointing.try_lock() else {
            return Ok(());
        };
        if let Err(e) = self.checkpoint_locked(&mut log, Finish::Everything) {
            // The batch is durable and applied; a failed checkpoint leaves
            // entries in both places or segments to replay, both harmless.
            // The next segment-full commit or sweep tries again.
            tracing::warn!(error = %e, "store log checkpoint failed");
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.checkpoint()
    }
}

impl Store for EmbeddedStore {
    fn commit(&self, ops: Vec<Op>, sync: bool) -> Result<(), StoreError> {
        let db = self.db()?;
        let result = db.commit(ops, sync);
        if result.is_err() {
            // The journal's tail is unknown now (fjall poisons itself):
            // retire this handle; the next call reopens and recovers.
            self.retire(db);
        }
        result
    }

    fn flush(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        let result = db.flush();
        if result.is_err() {
            self.retire(db);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, ts: u64) -> StoredEntry {
        let e = pb::QueueEntry {
            seq,
            server_ts_ms: ts,
            body: None,
        };
        StoredEntry {
            seq,
            bytes: e.encode_to_vec().into(),
        }
    }

    #[test]
    fn queue_roundtrip_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let a = DeviceKey { user: 1, device: 1 };
        let b = DeviceKey { user: 2, device: 1 };
        let ops = vec![
            Op::Queue(QueueOp::Enqueue {
                device: a,
                entry: entry(1, 10),
            }),
            Op::Queue(QueueOp::Enqueue {
                device: a,
                entry: entry(2, 20),
            }),
            Op::Queue(QueueOp::Enqueue {
                device: a,
                entry: entry(3, 30),
            }),
            Op::Queue(QueueOp::Enqueue {
                device: b,
                entry: entry(1, 5),
            }),
        ];
        store.commit(ops, true).unwrap();
        assert_eq!(store.reserved_seq(a).unwrap(), 0, "entries reserve nothing");
        store
            .commit(
                vec![Op::Queue(QueueOp::ReserveSeqs {
                    device: a,
                    upto: 64,
                })],
                true,
            )
            .unwrap();
        assert_eq!(store.reserved_seq(a).unwrap(), 64);
        let got: Vec<u64> = store
            .read_queue(a, 1, 10)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(got, vec![2, 3]);
        let expired = store.expired_entries(25, 100).unwrap();
        assert_eq!(expired, vec![(a, 1), (a, 2), (b, 1)]);
        store
            .commit(
                vec![Op::Queue(QueueOp::Dequeue { device: a, seq: 2 })],
                false,
            )
            .unwrap();
        assert_eq!(store.read_queue(a, 0, 10).unwrap().len(), 2);
        store
            .commit(vec![Op::Queue(QueueOp::DropQueue(a))], true)
            .unwrap();
        assert!(store.read_queue(a, 0, 10).unwrap().is_empty());
        assert_eq!(store.reserved_seq(a).unwrap(), 0);
    }

    /// Queue entries that only the log holds (no checkpoint since) are
    /// back after a restart, without the ones removed since, and a torn
    /// record at the log's end is ignored.
    #[test]
    fn queue_entries_come_back_from_the_log_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let a = DeviceKey { user: 1, device: 1 };
        let seqs = |store: &EmbeddedStore| -> Vec<u64> {
            store
                .read_queue(a, 0, 10)
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect()
        };
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            let ops = (1..=4)
                .map(|seq| {
                    Op::Queue(QueueOp::Enqueue {
                        device: a,
                        entry: entry(seq, 1_000),
                    })
                })
                .collect();
            store.commit(ops, true).unwrap();
            store
                .commit(
                    vec![Op::Queue(QueueOp::Dequeue { device: a, seq: 2 })],
                    false,
                )
                .unwrap();
            assert_eq!(seqs(&store), vec![1, 3, 4]);
            // Dropped without a checkpoint, as by a crash: fjall has none
            // of these entries, the log has all.
            assert_eq!(store.db().unwrap().queues.len().unwrap(), 0);
        }
        let segment = std::fs::read_dir(dir.path().join(LOG_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .max()
            .unwrap();
        assert!(std::fs::metadata(&segment).unwrap().len() > 0);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&segment)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &[77, 0, 0, 0, 1]))
            .unwrap();

        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(seqs(&store), vec![1, 3, 4]);
        // Opening checkpointed: the entries are in fjall now, and acking one
        // removes it there.
        store
            .commit(
                vec![Op::Queue(QueueOp::Dequeue { device: a, seq: 3 })],
                false,
            )
            .unwrap();
        drop(store);
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(seqs(&store), vec![1, 4]);
        // Entries in fjall and in memory merge in seq order.
        store
            .commit(
                vec![Op::Queue(QueueOp::Enqueue {
                    device: a,
                    entry: entry(5, 1_000),
                })],
                true,
            )
            .unwrap();
        assert_eq!(seqs(&store), vec![1, 4, 5]);
        assert_eq!(store.read_queue(a, 1, 1).unwrap()[0].seq, 4);
        assert!(store.approximate_queue_entries() >= 3);
    }

    /// A replay removes from fjall only the entries a checkpoint moved
    /// there: one moved by a background checkpoint, whose removal reached
    /// the log but not fjall before a crash, stays removed; one put and
    /// removed within the replayed stretch leaves no tombstone.
    #[test]
    fn a_replay_removes_from_fjall_only_what_a_checkpoint_moved_there() {
        let a = DeviceKey { user: 1, device: 1 };
        // Returns the queue after the crash and the number of writes fjall
        // holds for it (every version and tombstone counts).
        let crash_and_reopen = |short_lived: bool| -> (Vec<u64>, usize) {
            let dir = tempfile::tempdir().unwrap();
            {
                let store = EmbeddedStore::open(dir.path()).unwrap();
                let db = store.db().unwrap();
                let enqueue = |seq| {
                    Op::Queue(QueueOp::Enqueue {
                        device: a,
                        entry: entry(seq, 1_000),
                    })
                };
                store.commit(vec![enqueue(1), enqueue(2)], true).unwrap();
                db.checkpoint_keeping_current().unwrap();
                assert_eq!(db.queues.len().unwrap(), 2, "moved to fjall");
                if short_lived {
                    // Lives and dies in the new segment.
                    store.commit(vec![enqueue(3)], true).unwrap();
                    store
                        .commit(
                            vec![Op::Queue(QueueOp::Dequeue { device: a, seq: 3 })],
                            true,
                        )
                        .unwrap();
                }
                // Entry 1's removal is logged, and the crash comes before
                // it is applied to fjall.
                let mut log = db.lock_log();
                log.append(&to_raw(vec![Op::Queue(QueueOp::Dequeue {
                    device: a,
                    seq: 1,
                })]))
                .unwrap();
                log.sync().unwrap();
            }
            let store = EmbeddedStore::open(dir.path()).unwrap();
            let seqs = store.read_queue(a, 0, 10).unwrap();
            let writes = store.db().unwrap().queues.approximate_len();
            (seqs.iter().map(|e| e.seq).collect(), writes)
        };
        let (seqs, writes) = crash_and_reopen(true);
        assert_eq!(seqs, vec![2], "entry 1 stays removed");
        assert_eq!(
            writes,
            crash_and_reopen(false).1,
            "entry 3 left nothing in fjall"
        );
    }

    fn dedup_key(id: &str) -> DedupKey {
        DedupKey {
            to: crate::store::Recipient::User(1),
            from: DeviceKey { user: 2, device: 1 },
            client_msg_id: id.into(),
        }
    }

    fn put_dedup(store: &EmbeddedStore, id: &str, accepted_ms: u64) -> DedupRecord {
        let record = DedupRecord {
            server_ts_ms: accepted_ms + 1,
            accepted_ms,
            voided: false,
            group_seq: 0,
        };
        store
            .commit(
                vec![Op::Dedup(DedupOp::Put {
                    key: dedup_key(id),
                    record: record.clone(),
                })],
                true,
            )
            .unwrap();
        record
    }

    /// A checkpoint writes a few held dedup records in its batch, and
    /// ingests many as a table first (out of the log lock).
    #[test]
    fn checkpoints_batch_a_few_dedup_records_and_ingest_many() {
        const DAY: u64 = 6 * DEDUP_BUCKET_MS;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let tables = |store: &EmbeddedStore| -> usize {
            let db = store.db().unwrap();
            let days = db.dedup_days.read().unwrap();
            days.values().map(fjall::Keyspace::table_count).sum()
        };
        let few = put_dedup(&store, "few", DAY + 1);
        store.flush().unwrap();
        assert_eq!(tables(&store), 0, "a few records go into the batch");
        assert_eq!(store.dedup(&dedup_key("few")).unwrap(), Some(few));

        let n = DEDUP_LOCKED_MAX + 500;
        let ops = (0..n)
            .map(|i| {
                Op::Dedup(DedupOp::Put {
                    key: dedup_key(&format!("many{i}")),
                    record: DedupRecord {
                        server_ts_ms: DAY + 3,
                        accepted_ms: DAY + 2,
                        voided: false,
                        group_seq: 0,
                    },
                })
            })
            .collect();
        store.commit(ops, true).unwrap();
        store.flush().unwrap();
        assert!(tables(&store) >= 1, "many records are ingested as a table");
        let db = store.db().unwrap();
        assert!(db.lock_held_dedup().is_empty());
        assert!(db.frozen_dedup.read().unwrap().is_none());
        drop(db);

        // Queue entries leave memory for fjall too.
        let device = DeviceKey { user: 9, device: 1 };
        let entry = StoredEntry {
            seq: 1,
            bytes: vec![1u8; 16].into(),
        };
        store
            .commit(vec![Op::Queue(QueueOp::Enqueue { device, entry })], true)
            .unwrap();
        assert_eq!(store.db().unwrap().lock_hot().len(), 1);
        store.flush().unwrap();
        assert_eq!(store.db().unwrap().lock_hot().len(), 0);
        assert_eq!(store.read_queue(device, 0, 10).unwrap().len(), 1);

        for i in [0, n / 2, n - 1] {
            let found = store.dedup(&dedup_key(&format!("many{i}"))).unwrap();
            assert_eq!(found.map(|r| r.accepted_ms), Some(DAY + 2));
        }
    }

    /// Dedup records are held in memory until a checkpoint, which ingests
    /// them into their day keyspaces; before it, the log brings them back
    /// after a crash.
    #[test]
    fn dedup_records_reach_fjall_at_checkpoints_and_survive_a_crash_before() {
        const DAY: u64 = DEDUP_BUCKET_MS;
        let dir = tempfile::tempdir().unwrap();
        let in_fjall = |store: &EmbeddedStore| -> usize {
            let db = store.db().unwrap();
            let days = db.dedup_days.read().unwrap();
            days.values().map(|ks| ks.len().unwrap()).sum()
        };
        let (a, b, c);
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            a = put_dedup(&store, "a", 3 * DAY + 1);
            b = put_dedup(&store, "b", 4 * DAY + 2);
            assert_eq!(store.dedup(&dedup_key("a")).unwrap(), Some(a.clone()));
            assert_eq!(in_fjall(&store), 0, "held in memory, not in fjall");
            store.flush().unwrap();
            assert_eq!(in_fjall(&store), 2, "written to their day keyspaces");
            assert!(store.db().unwrap().held_dedup.lock().unwrap().is_empty());
            assert_eq!(store.dedup(&dedup_key("b")).unwrap(), Some(b.clone()));
            // Dropped without a checkpoint, as by a crash: only the log has c.
            c = put_dedup(&store, "c", 4 * DAY + 3);
            assert_eq!(in_fjall(&store), 2);
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        for (id, record) in [("a", a), ("b", b), ("c", c)] {
            assert_eq!(store.dedup(&dedup_key(id)).unwrap(), Some(record), "{id}");
        }
        assert_eq!(in_fjall(&store), 3, "opening replays, then checkpoints");
        assert_eq!(store.dedup(&dedup_key("d")).unwrap(), None);
        // Expiry drops what memory holds of an expired day too.
        put_dedup(&store, "e", 3 * DAY + 9);
        assert_eq!(store.expire_dedup(4 * DAY).unwrap(), 1);
        assert_eq!(store.dedup(&dedup_key("a")).unwrap(), None);
        assert_eq!(store.dedup(&dedup_key("e")).unwrap(), None);
        assert!(store.dedup(&dedup_key("c")).unwrap().is_some());
    }

    /// fjall's workers inherit the lowest priority from the thread that
    /// opens the database, with no window in which they run at the
    /// default.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_databases_workers_run_at_the_lowest_priority() {
        let dir = tempfile::tempdir().unwrap();
        let _store = EmbeddedStore::open(dir.path()).unwrap();
        let mut workers = 0;
        for entry in std::fs::read_dir("/proc/self/task").unwrap() {
            let entry = entry.unwrap();
            let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
                continue; // exited meanwhile
            };
            if !comm.starts_with("fjall:") {
                continue;
            }
            let tid: i32 = entry.file_name().to_str().unwrap().parse().unwrap();
            let tid = rustix::process::Pid::from_raw(tid).unwrap();
            let nice = rustix::process::getpriority_process(Some(tid)).unwrap();
            assert_eq!(nice, BACKGROUND_NICE, "{comm} {tid:?}");
            workers += 1;
        }
        assert!(workers > 0, "no fjall worker found");
    }

    /// The background checkpoint keeps the dedup records logged during its
    /// ingestion in memory and keeps their segment; a crash then brings
    /// them back from it, and the next checkpoint puts them into fjall
    /// before that segment goes.
    #[test]
    fn dedup_records_logged_during_an_ingestion_wait_for_the_next_checkpoint() {
        const DAY: u64 = 7 * DEDUP_BUCKET_MS;
        let dir = tempfile::tempdir().unwrap();
        let in_fjall = |db: &Db, id: &str| -> bool {
            let k = layout::dedup(&dedup_key(id));
            let days = db.dedup_days.read().unwrap();
            days.values().any(|ks| ks.get(&k).unwrap().is_some())
        };
        let segments = || std::fs::read_dir(dir.path().join(LOG_DIR)).unwrap().count();
        // The phases of `checkpoint_keeping_current`, with `id` committed
        // during the ingestion of the records held before it.
        let carry = |store: &EmbeddedStore, db: &Db, id: &str, at: u64| -> DedupRecord {
            put_dedup(store, &format!("{id}-before"), at);
            let _one = db.lock_checkpointing();
            db.freeze_and_ingest().unwrap();
            let record = put_dedup(store, id, at + 1);
            db.db.persist(PersistMode::SyncAll).unwrap();
            let finish = Finish::KeepCurrent { carry_dedup: true };
            db.checkpoint_locked(&mut db.lock_log(), finish).unwrap();
            assert!(in_fjall(db, &format!("{id}-before")), "ingested");
            assert!(!in_fjall(db, id), "carried");
            assert_eq!(db.lock_held_dedup().len(), 1);
            assert_eq!(segments(), 2, "the segment holding it stays");
            record
        };
        let late = {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            let db = store.db().unwrap();
            assert_eq!(segments(), 1);
            let late = carry(&store, &db, "late", DAY);
            assert_eq!(
                store.dedup(&dedup_key("late")).unwrap().as_ref(),
                Some(&late)
            );
            late
            // Dropped without a checkpoint, as by a crash.
        };
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(store.dedup(&dedup_key("late")).unwrap(), Some(late));

        // Without a crash, the next background checkpoint writes and syncs
        // the carried records (few now) before their segment goes.
        let db = store.db().unwrap();
        let late2 = carry(&store, &db, "late2", DAY + 10);
        db.checkpoint_keeping_current().unwrap();
        assert!(in_fjall(&db, "late2"));
        assert!(db.lock_held_dedup().is_empty());
        assert_eq!(segments(), 2);
        assert_eq!(store.dedup(&dedup_key("late2")).unwrap(), Some(late2));
    }

    /// A full log segment is checkpointed by the background thread: the
    /// dedup records reach fjall and the log is retired, and lookups find
    /// every record all along.
    #[test]
    fn a_full_segment_is_checkpointed_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let db = store.db().unwrap();
        assert!(db.checkpoint_wanted.get().is_some(), "the thread runs");
        let records: Vec<DedupRecord> = (0..10)
            .map(|i| put_dedup(&store, &format!("d{i}"), 5 * DEDUP_BUCKET_MS + i))
            .collect();
        let a = DeviceKey { user: 1, device: 1 };
        let big = StoredEntry {
            seq: 0,
            bytes: vec![7u8; 64 * 1024].into(),
        };
        let mut seq = 0;
        while db.lock_log().len() < LOG_SEGMENT_BYTES {
            seq += 1;
            let entry = StoredEntry { seq, ..big.clone() };
            store
                .commit(
                    vec![Op::Queue(QueueOp::Enqueue { device: a, entry })],
                    false,
                )
                .unwrap();
            store
                .commit(vec![Op::Queue(QueueOp::Dequeue { device: a, seq })], false)
                .unwrap();
        }
        let started = Instant::now();
        loop {
            for (i, record) in records.iter().enumerate() {
                let key = dedup_key(&format!("d{i}"));
                assert_eq!(store.dedup(&key).unwrap().as_ref(), Some(record));
            }
            let in_fjall: usize = db
                .dedup_days
                .read()
                .unwrap()
                .values()
                .map(|ks| ks.len().unwrap())
                .sum();
            if in_fjall == records.len() && db.lock_log().len() < LOG_SEGMENT_BYTES {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no checkpoint after the segment filled"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(db.lock_held_dedup().is_empty());
        assert!(db.frozen_dedup.read().unwrap().is_none());
        drop(db);
        drop(store);
        // Dropping waited for the thread: the directory opens again at once.
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(
            store.dedup(&dedup_key("d3")).unwrap().as_ref(),
            Some(&records[3])
        );
    }

    #[test]
    fn dedup_records_expire_by_whole_days() {
        const DAY: u64 = DEDUP_BUCKET_MS;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let old = put_dedup(&store, "old", 10 * DAY + 5);
        let new = put_dedup(&store, "new", 12 * DAY + 7);
        assert_eq!(store.dedup(&dedup_key("old")).unwrap(), Some(old.clone()));
        assert_eq!(store.dedup(&dedup_key("new")).unwrap(), Some(new.clone()));
        assert_eq!(store.dedup(&dedup_key("none")).unwrap(), None);

        // A day goes only once all of it is before the cutoff.
        assert_eq!(store.expire_dedup(10 * DAY + 6).unwrap(), 0);
        assert_eq!(store.expire_dedup(11 * DAY - 1).unwrap(), 0);
        assert_eq!(store.dedup(&dedup_key("old")).unwrap(), Some(old));

        // Day keyspaces survive a reopen.
        drop(store);
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(store.expire_dedup(11 * DAY).unwrap(), 1);
        assert_eq!(store.dedup(&dedup_key("old")).unwrap(), None);
        assert_eq!(store.dedup(&dedup_key("new")).unwrap(), Some(new.clone()));
        drop(store);
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(store.dedup(&dedup_key("old")).unwrap(), None);
        assert_eq!(store.dedup(&dedup_key("new")).unwrap(), Some(new));
        assert_eq!(store.expire_dedup(u64::MAX).unwrap(), 1);
        assert_eq!(store.dedup(&dedup_key("new")).unwrap(), None);
    }

    #[test]
    fn legacy_dedup_keyspace_is_migrated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let record = DedupRecord {
            server_ts_ms: 8,
            accepted_ms: 3 * DEDUP_BUCKET_MS + 1,
            voided: false,
            group_seq: 0,
        };
        {
            // The layout before day keyspaces: one `dedup` keyspace and a
            // time index.
            let db = Database::builder(dir.path()).open().unwrap();
            let dedup = open_keyspace(&db, LEGACY_DEDUP).unwrap();
            let index = open_keyspace(&db, LEGACY_DEDUP_TIME).unwrap();
            for i in 0..(MIGRATE_BATCH + 10) {
                let key = dedup_key(&format!("m{i}"));
                dedup
                    .insert(layout::dedup(&key), record.encode_to_vec())
                    .unwrap();
                let mut t = record.accepted_ms.to_be_bytes().to_vec();
                t.extend_from_slice(&layout::dedup(&key));
                index.insert(t, []).unwrap();
            }
            db.persist(PersistMode::SyncAll).unwrap();
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let db = store.db().unwrap();
        assert!(!db.db.keyspace_exists(LEGACY_DEDUP));
        assert!(!db.db.keyspace_exists(LEGACY_DEDUP_TIME));
        drop(db);
        for i in [0, MIGRATE_BATCH - 1, MIGRATE_BATCH, MIGRATE_BATCH + 9] {
            assert_eq!(
                store.dedup(&dedup_key(&format!("m{i}"))).unwrap(),
                Some(record.clone()),
                "record m{i}"
            );
        }
        assert_eq!(store.expire_dedup(4 * DEDUP_BUCKET_MS).unwrap(), 1);
        assert_eq!(store.dedup(&dedup_key("m0")).unwrap(), None);
    }
}
